"""Decode-attention benchmark on one GPU: SDPA (flash, cuDNN), transformers' eager attention, and
minirt's Triton dense decode and condensate sparse decode (exact selection, and page selection
with summaries in the cache dtype and in fp8).

    python bench/attention.py [--contexts 4096,32768,...] [--out results/attention]

Times with triton.testing.do_bench (median; warm-up; it also flushes L2 between calls) while
rotating among input copies that together exceed L2. Every method is timed twice: eager (as
called from Python, launch overhead included) and as a CUDA-graph replay (GPU time; what a
graph-captured decode step costs). Each row gives ms, the bytes the method must move (its model
below), achieved GB/s, and the speedup over SDPA flash in the same mode. Writes JSON + Markdown.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirt.cache import CondensateCache, CondensateConfig  # noqa: E402
from minirt.config import PAPER_POLICY, ModelConfig  # noqa: E402
from minirt.kernels import triton_attention as tri  # noqa: E402
from minirt.kernels import reference  # noqa: E402
from minirt.kernels.reference import step_bounds  # noqa: E402

SHAPES = {"32q/4kv x64 (TinyLlama)": (32, 4, 64), "8q/8kv x64 (paper)": (8, 8, 64)}
POLICY = PAPER_POLICY  # A=4, W=128, k=32; pages of 32, 16x oversampling
WHOLE_K = 512  # whole-page selection's budget: 16 pages of 32, the keys "pages" scores at 16x oversampling
# certified mode: exact scores of every key, a device-side sort per head, at most 4096 keys, and
# dense attention for the fallback (computed every step: a static graph has no branches)
CERTIFIED_EPS, CERTIFIED_K = 0.01, 4096
PEAK = 8.0
L2_BYTES = 50 * 2**20


def bench(fn, inputs: list) -> float:
    from triton.testing import do_bench

    it = itertools.cycle(inputs)
    return do_bench(lambda: fn(next(it)), warmup=50, rep=200, return_mode="median")


def graphed(fn, inputs: list):
    """Capture fn(inp) for each input in a CUDA graph; returns a list of replay closures."""
    graphs = []
    for inp in inputs:
        fn(inp)  # warm-up outside capture (Triton compiles here)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(inp)
        graphs.append(g)
    return graphs


def page_bin_bytes(Hkv: int, n: int, page_size: int) -> int:
    """Threshold selection's int16 page bins of every KV head, written by its scan and read by attention."""
    return 2 * Hkv * math.ceil(n / page_size) * 2


def sparse_bytes(n: int, Hkv: int, D: int, el: int, policy: CondensateConfig, summary_el: int,
                 fallback: float = 1.0, attended: int | None = None) -> int:
    """KV bytes one decode step of one layer reads; fallback: the fraction of KV groups that fall
    back to full attention (certified mode reads their keys and values again); attended: the
    distant keys per KV head a threshold selection kept (measured)."""
    A, W, k, P = policy.anchor, policy.window, policy.top_k, policy.page_size
    pages = math.ceil(n / P)
    candidates = max(0, n - A - W)  # positions neither anchor nor window: the most top-k can attend
    k = min(k, candidates) if attended is None else attended
    if policy.whole_pages:  # page min/max, then the chosen pages' keys and values (and the tail's fp32 sums)
        k = min(candidates, reference.whole_pages(policy.top_k, P) * P)
        tail = 2 * Hkv * pages * D * 4 if policy.tail else 0
        return 2 * Hkv * (A + W + k + 1) * D * el + 2 * Hkv * pages * D * summary_el + tail
    attend = 2 * Hkv * (A + W + k + 1) * D * el  # K and V of the attended set, and the appended one
    scored = Hkv * n * (D + 4) if policy.shadowed else Hkv * n * D * el  # int8 keys + fp32 scales
    if policy.selection == "int8-threshold":
        scored += page_bin_bytes(Hkv, n, P)
    if policy.certified:  # every key scored, the list attended, and the fallback groups' whole cache
        return attend + scored + round(fallback * 2 * Hkv * n * D * el)
    if policy.selection in ("exact", "int8"):
        return attend + scored  # every key scored once (the top-k candidates are a few KB)
    chosen = min(pages, math.ceil(k * policy.page_oversample / P)) * P
    return attend + 2 * Hkv * pages * D * summary_el + Hkv * chosen * D * el  # page min/max, then the chosen pages' keys


def make_cache(Hq: int, Hkv: int, D: int, n: int, policy: CondensateConfig, dtype) -> CondensateCache:
    cfg = ModelConfig(family="llama", vocab_size=2, dim=Hq * D, n_layers=1, n_heads=Hq, n_kv_heads=Hkv,
                      head_dim=D, ffn_dim=1, max_seq_len=n + 1, rotary_dim=D)
    cache = CondensateCache(cfg, policy, capacity=n + 1, device="cuda", dtype=dtype)
    cache.k.normal_()
    cache.v.normal_()
    cache.hold(n)  # ring and page summaries from the history
    cache.begin(1)  # the decode step at position n: its bounds, on the device
    return cache


def run_shape(name: str, Hq: int, Hkv: int, D: int, n: int, dtype, use_graphs: bool, only: str = "") -> list[dict]:
    el = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * Hkv * n * D * el
    copies = max(2, math.ceil(3 * L2_BYTES / kv_bytes)) if kv_bytes < 4 * L2_BYTES else 1
    torch.manual_seed(n)  # the same queries and caches whichever methods --only picks
    qs = [torch.randn(1, Hq, D, device="cuda", dtype=dtype) for _ in range(copies)]
    kvs = [(torch.randn(1, Hkv, n, D, device="cuda", dtype=dtype), torch.randn(1, Hkv, n, D, device="cuda", dtype=dtype))
           for _ in range(copies)]
    inputs = list(zip(qs, kvs))
    rows = []

    def add(method: str, fn, method_inputs: list, nbytes: int, note: str = ""):
        for mode in ("eager", "graph") if use_graphs else ("eager",):
            try:
                ms = bench(fn, method_inputs) if mode == "eager" else bench(lambda g: g.replay(), graphed(fn, method_inputs))
                row_note = note
            except RuntimeError as e:
                ms, row_note = None, f"not run: {str(e).splitlines()[0][:80]}"
            rows.append({"shape": name, "context": n, "method": method, "mode": mode, "ms": ms, "bytes": nbytes,
                         "GB/s": None if ms is None else nbytes / ms / 1e6, "note": row_note})

    # correctness of our dense kernel against SDPA on this very input before timing it
    q0, (k0, v0) = inputs[0]
    ref = F.scaled_dot_product_attention(q0[:, :, None], k0, v0, enable_gqa=True)[:, :, 0]
    ours = tri.decode_attention(q0, k0, v0)[0]
    err = float((ours.float() - ref.float()).norm() / ref.float().norm())
    assert err < 1e-2, f"dense kernel disagrees with SDPA: rel err {err}"

    for method, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        def sdpa(inp, backend=backend):
            q, (k, v) = inp
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
        add(method, sdpa, inputs, kv_bytes)
    from transformers.models.llama.modeling_llama import eager_attention_forward
    module = SimpleNamespace(num_key_value_groups=Hq // Hkv, training=False)

    def hf(inp):
        q, (k, v) = inp
        return eager_attention_forward(module, q[:, :, None], k, v, None, scaling=D ** -0.5)
    add("transformers-eager-attention", hf, inputs, kv_bytes)
    bounds = step_bounds(n, 0, n, "cuda")  # the step's lengths, on the device (as the runtime's decode step has them)
    add("minirt-dense-triton", lambda inp: tri.decode_attention(inp[0], *inp[1], bounds), inputs, kv_bytes,
        f"rel err vs SDPA {err:.1e}")

    variants = {"exact": replace(POLICY, summary_dtype="cache"),
                "pages": replace(POLICY, selection="pages", summary_dtype="cache"),
                "pages-fp8": replace(POLICY, selection="pages", summary_dtype="fp8"),
                f"whole-pages-fp8-k{WHOLE_K}": replace(POLICY, selection="whole-pages", top_k=WHOLE_K, summary_dtype="fp8"),
                f"certified-eps{CERTIFIED_EPS:g}-k{CERTIFIED_K}": replace(POLICY, top_k=CERTIFIED_K,
                                                                        max_dropped_mass=CERTIFIED_EPS),
                f"certified-int8-eps{CERTIFIED_EPS:g}-k{CERTIFIED_K}": replace(
                    POLICY, selection="int8", top_k=CERTIFIED_K, max_dropped_mass=CERTIFIED_EPS),
                f"certified-int8-threshold-eps{CERTIFIED_EPS:g}": replace(
                    POLICY, selection="int8-threshold", page_size=1, max_dropped_mass=CERTIFIED_EPS),
                f"certified-int8-threshold-eps{CERTIFIED_EPS:g}-tail": replace(
                    POLICY, selection="int8-threshold", page_size=1, max_dropped_mass=CERTIFIED_EPS, tail=True)}
    for variant, policy in variants.items():
        # Certified modes also with peaked queries (q x PEAK): random keys and queries spread each
        # head's mass over the whole context, so every head falls back; peaked, a few keys hold it.
        for peak in (1.0, PEAK) if policy.certified else (1.0,):
            method = f"minirt-sparse-{variant}" + ("-peaked" if peak > 1 else "")
            if only not in method:
                continue
            torch.manual_seed(n)
            caches = [make_cache(Hq, Hkv, D, n, policy, dtype) for _ in range(min(copies, 2))]
            new_kv = torch.randn(2, 1, Hkv, 1, D, device="cuda", dtype=dtype)
            # The runtime's own decode step for one layer: append position n (the position stays n, so
            # every call rewrites it), update ring and page summary, select, attend.
            step = lambda inp: inp[1].attend(0, inp[0][:, :, None], new_kv[0], new_kv[1])  # noqa: E731
            step_qs = [q * peak for q in qs]
            note, fallback, attended = "", 1.0, None
            if policy.certified:  # one step first: which heads and KV groups fall back
                step((step_qs[0], caches[0]))
                fall = ~(caches[0].dropped[0] < policy.max_dropped_mass)  # [1, Hq]
                fallback = float(fall.view(Hkv, -1).any(-1).float().mean())
                note = f"heads falling back: {int(fall.sum())}/{Hq}"
            if policy.selection == "int8-threshold":  # what the threshold kept, per KV head
                c = caches[0]
                kept = reference.kept_pages(*c.ops.page_threshold(
                    step_qs[0], c.k[0], c.kq[0], c.kscale[0], c.kchan[0], c.koffset[0], c.bounds,
                    policy.max_dropped_mass, policy.page_size)[:2])
                attended = round(float(kept[..., :math.ceil(n / policy.page_size)].sum()) * policy.page_size / Hkv)
                note += f"; distant keys kept per KV head: {attended}"
            summary_el = el if caches[0].kmin is None else caches[0].kmin.element_size()
            add(method, step, list(zip(step_qs, caches)),
                sparse_bytes(n, Hkv, D, el, policy, summary_el, fallback, attended), note)
            del caches
    for r in rows:
        flash = next(f["ms"] for f in rows if f["method"] == "sdpa-flash" and f["mode"] == r["mode"])
        r["speedup_vs_flash"] = flash / r["ms"] if (flash and r["ms"]) else None
    return rows


def markdown(rows: list[dict], device: str) -> str:
    out = [f"Device: {device}\n", "| shape | context | method | mode | ms | MB moved | GB/s | x SDPA flash (same mode) | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = "n/a" if r["ms"] is None else f"{r['ms']:.4f}"
        gbs = "" if r["GB/s"] is None else f"{r['GB/s']:.0f}"
        sp = "" if r["speedup_vs_flash"] is None else f"{r['speedup_vs_flash']:.2f}"
        out.append(f"| {r['shape']} | {r['context']} | {r['method']} | {r['mode']} | {ms} | {r['bytes'] / 1e6:.1f} | {gbs} | {sp} | {r['note']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    global POLICY
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,32768,131072,524288,1048576")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--page-size", type=int, default=POLICY.page_size)
    ap.add_argument("--only", default="", help="run only the minirt sparse variants whose name contains this")
    ap.add_argument("--out", default="results/attention")
    args = ap.parse_args()
    POLICY = replace(POLICY, page_size=args.page_size)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.cuda.get_device_name()
    rows = []
    for n in map(int, args.contexts.split(",")):
        for name, (Hq, Hkv, D) in SHAPES.items():
            shape_rows = run_shape(name, Hq, Hkv, D, n, dtype, not args.no_graphs, args.only)
            rows += shape_rows
            print(markdown(shape_rows, device).split("\n", 3)[3], end="", flush=True)
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "dtype": args.dtype, "policy": asdict(POLICY)}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    Path(args.out + ".md").write_text(markdown(rows, device))
    print(markdown(rows, device))


if __name__ == "__main__":
    main()
