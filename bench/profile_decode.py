"""Where a whole decode step's time goes: per-kernel GPU time of the CUDA-graph-replayed step of the
TinyLlama-shaped model (bench/generate.py), by kernel name.

    python bench/profile_decode.py [--context 1024] [--attention full|exact|pages]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.generate import SYSTEMS, TINYLLAMA, seconds_per_step, synthetic_step  # noqa: E402
from minirt import Transformer, kernels  # noqa: E402
from minirt.llm import LLM  # noqa: E402

NAMES = {"full": "minirt full", "exact": "minirt sparse (exact)", "pages": "minirt sparse (pages)",
         "whole-pages": "minirt sparse (whole pages, k=512)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--attention", default="full", choices=list(NAMES))
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    capacity = args.context + 2 * args.steps + 8
    cfg = replace(TINYLLAMA, max_seq_len=capacity)
    with torch.device("cuda"):
        model = Transformer(cfg).to(torch.bfloat16).eval()
    model.use_kernels(kernels.layer_implementation("cuda"))
    llm = LLM(model, None, Path("tinyllama-shaped-random"))
    step = synthetic_step(llm, args.context, capacity, *SYSTEMS[NAMES[args.attention]])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2):  # the first runs eagerly (kernels compile), the second captures the graph and replays it
        step()
    torch.cuda.synchronize()
    first_two = time.perf_counter() - t0
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / args.steps
    replay = seconds_per_step(step, args.steps) * 1e6  # the same steps unprofiled: the replay's wall time
    print(f"{NAMES[args.attention]}, context {args.context}: {total:.0f} us of kernels per step in "
          f"{sum(e.count for e in events) / args.steps:.0f} launches; {replay:.0f} us per replayed step "
          f"(CUDA events), so {replay - total:.0f} us between kernels; the first two steps (eager, capture) "
          f"took {first_two * 1000:.0f} ms")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:25]:
        print(f"{e.count / args.steps:6.1f} x {e.device_time_total / args.steps:8.1f} us  {e.key[:110]}")


if __name__ == "__main__":
    main()
