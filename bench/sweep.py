"""What the launch-setting sweeps (bench/tune_gather.py, bench/tune_threshold.py, bench/tune_cut.py)
share: their arguments, the run's metadata, the timing of every setting of PAGE_SCAN's, and the
JSON + Markdown table they write."""
from __future__ import annotations

import argparse
import itertools
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


def time_settings(config: dict, settings: dict, run: Callable[[], torch.Tensor], row: dict, results: dict,
                  same: str) -> None:
    """Time run (CUDA graph) under every combination of settings written into config (restored
    after), one row each: row's fields, the setting, us, and under `same` whether run's output
    equals the current setting's (summation order may move a bin)."""
    current = dict(config)
    want = run()
    for values in itertools.product(*settings.values()):
        config.update(zip(settings, values))
        equal = torch.equal(run(), want)
        us = triton.testing.do_bench_cudagraph(run, rep=100) * 1000
        results["rows"].append({**row, **dict(zip(settings, values)), "us": us, same: equal})
        print(*row.values(), values, f"{us:.1f} us", flush=True)
    config.update(current)


def settings_table(results: dict, settings: dict, columns: tuple[str, ...], same: str, same_label: str) -> str:
    """time_settings' rows as Markdown, fastest first within each value of columns, the current
    setting (results' meta) marked."""
    keys = tuple(settings)
    current = tuple(results["meta"]["current"].get(k) for k in keys)
    out = ["| " + " | ".join(columns + keys) + f" | us | {same_label} | |", "|---" * (len(columns) + len(keys) + 3) + "|"]
    for r in sorted(results["rows"], key=lambda r: (*(r[c] for c in columns), r["us"])):
        setting = tuple(r[k] for k in keys)
        out.append("| " + " | ".join(str(r[c]) for c in columns + keys) + f" | {r['us']:.1f} | "
                   f"{'yes' if r[same] else 'no'} | " + ("current (PAGE_SCAN)" if setting == current else "") + " |")
    return "\n".join(out) + "\n"
