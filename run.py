#!/usr/bin/env python3
"""Run a model: python run.py --model TinyLlama --prompt file.txt (see --help)."""
import sys

from minirt.cli import main

if __name__ == "__main__":
    sys.exit(main())
