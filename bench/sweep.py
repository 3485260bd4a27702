"""What the launch-setting sweeps (bench/tune_gather.py, bench/tune_threshold.py) share: their
arguments, the run's metadata, and the JSON + Markdown table they write."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch
import triton

from minirt.config import CondensateConfig

# what both sweep: certified int8-threshold over single keys at eps 1e-2
POLICY = CondensateConfig(selection="int8-threshold", page_size=1, max_dropped_mass=0.01)


def arguments(doc: str, contexts: str, out: str, table: Callable[[dict], str]) -> argparse.Namespace | None:
    """The sweep's arguments, or None once --render has printed an earlier run's table."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--contexts", default=contexts)
    ap.add_argument("--out", default=out)
    ap.add_argument("--render", metavar="JSON", help="print the Markdown table of a run's JSON")
    args = ap.parse_args()
    if args.render:
        print(table(json.loads(Path(args.render).read_text())), end="")
        return None
    return args


def results(current: dict) -> dict:
    """An empty run: the device and software, and the settings the code uses now."""
    return {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                     "current": current}, "rows": []}


def save(run: dict, out: str, table: Callable[[dict], str]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(run, indent=1))
    Path(out).with_suffix(".md").write_text(table(run))
