"""The decode step's projections: the Triton GEMV's launch settings swept, against cuBLAS.

    python bench/tune_linear.py [--models tinyllama,qwen2.5-1.5b,...] [--json out.json] [--md out.md]

Per model shape and projection (qkv, o, gate|up, down, lm head), every setting's time for one
token, measured as a decode step reads weights: a CUDA graph of one GEMV per layer over that
many distinct weight matrices (so L2 holds none of them), divided by the layer count
(triton.testing.do_bench, median of replays), beside cuBLAS (F.linear) timed the same way, so the
defaults in kernels/triton_linear.config are chosen from measurement. The plain product is swept;
with --fused, each projection carries the prologue (norm and residual add, silu(gate) * up) and
epilogue (RoPE) the decode step fuses into it, and is compared with the launches it replaces.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirt.kernels import triton_layers as lay  # noqa: E402
from minirt.kernels import triton_linear as lin  # noqa: E402

# dim, q heads, kv heads, head dim, ffn, vocab, layers
MODELS = {
    "tinyllama": (2048, 32, 4, 64, 5632, 32000, 22),
    "qwen2.5-1.5b": (1536, 12, 2, 128, 8960, 151936, 28),
    "qwen2.5-0.5b": (896, 14, 2, 64, 4864, 151936, 24),
    "smollm2-135m": (576, 9, 3, 64, 1536, 49152, 30),
}
GRID = {"rows": [2, 4, 8, 16, 32], "block_k": [128, 256, 512], "warps": [4, 8], "stages": [1, 3]}


def per_call_us(fn, n: int) -> float:
    """Median time of fn(i) for i in range(n), captured in one CUDA graph, per call, in us."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(n):  # warm-up and compile outside the capture
            fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fn(i)
    return do_bench(graph.replay, warmup=10, rep=25, return_mode="median") * 1e3 / n


def projections(model: str) -> dict:
    """Per projection: (N, K, copies, prologue, fused rope?). The lm head is read once per step."""
    dim, Hq, Hkv, D, ffn, vocab, L = MODELS[model]
    n_head = max(1, min(L, (2 << 30) // (vocab * dim * 2)))
    return {"qkv": ((Hq + 2 * Hkv) * D, dim, L, lin.ADD_NORM, True), "o": (dim, Hq * D, L, lin.PLAIN, False),
            "gate_up": (2 * ffn, dim, L, lin.ADD_NORM, False), "down": (dim, ffn, L, lin.SILU_MUL, False),
            "lm_head": (vocab, dim, n_head, lin.NORM, False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--fused", action="store_true",
                    help="sweep each projection with the prologue/epilogue the decode step fuses into it, against "
                         "the launches it replaces (Triton norm, cuBLAS, Triton RoPE / silu*up)")
    ap.add_argument("--grid", default=json.dumps(GRID), help="the settings swept, as JSON")
    ap.add_argument("--json", default="results/tune_linear.json")
    ap.add_argument("--md", default="results/tune_linear.md")
    args = ap.parse_args()
    grid = json.loads(args.grid)
    dt = torch.bfloat16
    rows, summary = [], []
    for model in args.models.split(","):
        D = MODELS[model][3]
        for proj, (N, K, copies, prologue, rope) in projections(model).items():
            ws = [torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5 for _ in range(copies)]
            x = torch.randn(2 * K if prologue == lin.SILU_MUL else K, device="cuda", dtype=dt)
            delta, nw = torch.randn(K, device="cuda", dtype=dt), torch.ones(K, device="cuda", dtype=dt)
            cos = sin = torch.ones(8, D, device="cuda", dtype=dt)
            position = torch.zeros(1, dtype=torch.int64, device="cuda")
            n_rot = MODELS[model][1] + MODELS[model][2]  # q and k heads are rotated
            fused = args.fused and prologue != lin.PLAIN
            mb = N * K * 2 / 1e6

            def unfused(i):  # what the fused launch replaces: Triton norm / silu*up, cuBLAS, Triton RoPE
                if prologue == lin.SILU_MUL:
                    return F.linear(lay.silu_mul(x), ws[i])
                h = lay.add_rms_norm(x, delta, nw, 1e-5)[1] if prologue == lin.ADD_NORM else lay.rms_norm(x, nw, 1e-5)
                y = F.linear(h, ws[i])[None, None]
                if rope:
                    lay.rope_qkv_(y, cos, sin, position, n_rot, D)
                return y

            def ours(i):
                return lin.gemv(x, ws[i], prologue=prologue if fused else lin.PLAIN, delta=delta, norm_weight=nw,
                                eps=1e-5, rope=(cos, sin, position, n_rot, D) if fused and rope else None)

            x_plain = x[:K]
            cublas = per_call_us(unfused if fused else (lambda i: F.linear(x_plain, ws[i])), copies)
            if not fused:
                x = x_plain
            best = None
            for values in itertools.product(*grid.values()):
                cfg = dict(zip(grid, values))
                lin.config = lambda N, K, c=cfg: (c["rows"], c["block_k"], c["warps"], c["stages"])
                try:
                    us = per_call_us(ours, copies)
                except Exception as e:  # a setting the compiler refuses (e.g. out of registers)
                    print(f"  {model} {proj} {cfg}: {type(e).__name__}", flush=True)
                    continue
                rows.append({"model": model, "proj": proj, "fused": fused, "N": N, "K": K, **cfg, "us": us,
                             "cublas_us": cublas})
                if best is None or us < best["us"]:
                    best = rows[-1]
            line = {"model": model, "proj": proj, "fused": fused, "N": N, "K": K, "MB": mb, "cublas_us": cublas,
                    "cublas_GBs": mb / cublas * 1e3, "best_us": best["us"], "best_GBs": mb / best["us"] * 1e3,
                    "best": {k: best[k] for k in grid}}
            summary.append(line)
            print(f"{model:14s} {proj:8s} {'fused' if fused else 'plain'} N={N:6d} K={K:5d}: cuBLAS "
                  f"{cublas:7.2f} us ({line['cublas_GBs']:5.0f} GB/s), GEMV best {best['us']:7.2f} us "
                  f"({line['best_GBs']:5.0f} GB/s) {line['best']}", flush=True)
            del ws
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bf16"}
    Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2))
    md = [f"Device: {meta['device']}, torch {meta['torch']}, bf16, one token; per call, over distinct weights per layer "
          "(CUDA graph, do_bench median). Fused rows: the GEMV with its prologue/epilogue against the launches it "
          "replaces (Triton norm or silu*up, cuBLAS, Triton RoPE), in the cuBLAS columns.", "",
          "| model | projection | form | N x K | MB | cuBLAS us | cuBLAS GB/s | GEMV best us | GEMV GB/s | best setting |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        b = s["best"]
        md.append(f"| {s['model']} | {s['proj']} | {'fused' if s['fused'] else 'plain'} | {s['N']} x {s['K']} | "
                  f"{s['MB']:.1f} | {s['cublas_us']:.2f} | "
                  f"{s['cublas_GBs']:.0f} | {s['best_us']:.2f} | {s['best_GBs']:.0f} | rows {b['rows']}, block_k "
                  f"{b['block_k']}, warps {b['warps']}, stages {b['stages']} |")
    Path(args.md).write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
