"""Per-kernel GPU time of one sparse decode step (one layer) at a long context.

    python bench/profile_step.py [--context 1048576] [--selection pages]
    python bench/profile_step.py --selection int8-threshold --page-size 1 --max-dropped-mass 0.01 --peaked

Runs the runtime's decode step under torch.profiler and prints each kernel's GPU time, to show
where a step's time goes (kernel count vs bytes).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.attention import PEAK, POLICY, SHAPES, make_cache  # noqa: E402
from minirt.config import SELECTIONS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=1 << 20)
    ap.add_argument("--selection", default="pages", choices=list(SELECTIONS))
    ap.add_argument("--shape", default=next(iter(SHAPES)), choices=list(SHAPES))
    ap.add_argument("--summary-dtype", default="cache", choices=["cache", "fp8"])
    ap.add_argument("--page-size", type=int, default=POLICY.page_size)
    ap.add_argument("--max-dropped-mass", type=float, default=None, help="certified mode's eps")
    ap.add_argument("--peaked", action="store_true", help=f"queries x {PEAK}: a few keys hold each head's mass")
    args = ap.parse_args()
    Hq, Hkv, D = SHAPES[args.shape]
    policy = replace(POLICY, selection=args.selection, summary_dtype=args.summary_dtype, page_size=args.page_size,
                     max_dropped_mass=args.max_dropped_mass)
    cache = make_cache(Hq, Hkv, D, args.context, policy, torch.float16)
    q = torch.randn(1, Hq, 1, D, device="cuda", dtype=torch.float16) * (PEAK if args.peaked else 1.0)
    kv = torch.randn(2, 1, Hkv, 1, D, device="cuda", dtype=torch.float16)
    for _ in range(5):
        cache.attend(0, q, kv[0], kv[1])
    torch.cuda.synchronize()
    steps = 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            cache.attend(0, q, kv[0], kv[1])
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    print(f"{args.shape}, n={args.context}, selection={args.selection}, page size {args.page_size}, "
          f"eps={args.max_dropped_mass}, summaries={args.summary_dtype}{', peaked queries' if args.peaked else ''}: "
          "kernels per step and GPU time (us/step)")
    for e in sorted(events, key=lambda e: -e.device_time_total):
        print(f"{e.count / steps:5.1f} x  {e.device_time_total / steps:8.1f} us  {e.key[:100]}")
    print(f"total {sum(e.device_time_total for e in events) / steps:.1f} us/step in {sum(e.count for e in events) / steps:.0f} kernels")


if __name__ == "__main__":
    main()
