"""End-to-end decode speed on one GPU: what a user of generate() sees, beside transformers.

    python bench/generate.py [--contexts 1024,32768,131072,1048576] [--new-tokens 128] [--out results/generate]

A TinyLlama-shaped model (22 layers, 32q/4kv heads of 64, dim 2048, ffn 5632, vocab 32000) in bf16
with random weights (speed does not depend on the values; no trained TinyLlama is reachable here),
batch 1. Rows: minirt full attention, minirt sparse (the default, and exact, page and whole-page
selection with the paper's window of 128), transformers generate() with its dynamic cache, and with a static cache +
torch.compile (transformers compiles its decoding forward itself when asked for a static cache).
minirt rows call generate() (prefill, then the CUDA-graph decode step); at
contexts past --synthetic-from the cache is filled with random keys/values instead of a prefill
(labelled), and the same decode step is timed. Each generate() row is the second of two identical
calls: the first compiles the Triton kernels and captures the decode step's CUDA graph, which the
second gets back (generation.decode_session), as repeated calls of one shape do. Columns: tok/s, ms/token, bytes read per token
(weights + the KV bytes the method reads, see bench/attention.py), achieved GB/s and % of the
read bandwidth measured on the same GPU in the same run (a reduction over 4 GiB), prefill seconds,
peak GPU memory. Writes JSON, Markdown and a PNG plot.

    python bench/generate.py --model smollm2-135m --contexts 2048,8000 --systems "minirt full;..."

--model runs a real checkpoint (a name, .gguf file or folder) in bf16 instead, its prompt the
first tokens of the long Python source (minirt.workloads.long_prompt; all of it where shorter),
for the rows whose speed depends on the weights: certified int8-threshold keeps as many keys as
the model's attention needs. Its KV bytes per token are from the keys it attended, measured
after the timed calls on the same prompt (minirt.equivalence.compare, 16 steps).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.attention import sparse_bytes  # noqa: E402
from minirt import CondensateConfig, Transformer, generate, kernels  # noqa: E402
from minirt.config import PAPER_POLICY, ModelConfig  # noqa: E402
from minirt.generation import DecodeStep  # noqa: E402
from minirt.equivalence import compare  # noqa: E402
from minirt.llm import LLM  # noqa: E402
from minirt.workloads import long_prompt  # noqa: E402

TINYLLAMA = ModelConfig(family="llama", vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                        head_dim=64, ffn_dim=5632, max_seq_len=2048, rotary_dim=64, rope_theta=10000.0)
SYSTEMS = {
    "minirt full": ("full", None),
    "minirt sparse (default: exact, k=32, W=512)": ("sparse", CondensateConfig()),
    "minirt sparse (exact)": ("sparse", PAPER_POLICY),
    "minirt sparse (pages)": ("sparse", replace(PAPER_POLICY, selection="pages")),
    "minirt sparse (whole pages, k=512)": ("sparse", replace(PAPER_POLICY, selection="whole-pages", top_k=512)),
    "minirt sparse (whole pages, k=1024, W=512)": ("sparse", CondensateConfig(selection="whole-pages", top_k=1024,
                                                                             window=512)),
    "minirt sparse (whole pages, k=1024, W=512, P=16)": ("sparse", CondensateConfig(
        selection="whole-pages", top_k=1024, window=512, page_size=16)),
    # certified mode on the GPU (FRONTIER.md's row): speed and bytes depend on the weights (--model)
    "minirt certified (int8-threshold, eps=1e-2, W=128)": ("sparse", replace(
        PAPER_POLICY, selection="int8-threshold", page_size=1, max_dropped_mass=1e-2)),
    "minirt certified (int8-threshold, eps=3e-2, W=128, tail)": ("sparse", replace(
        PAPER_POLICY, selection="int8-threshold", page_size=1, max_dropped_mass=3e-2, tail=True)),
}
MEASURED_STEPS = 16  # decode steps over which a certified row's attended keys are measured


def model_bytes(cfg: ModelConfig) -> int:
    """Weights one decode step reads: every matrix, the head, one embedding row (bf16)."""
    per_layer = cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim \
        + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim
    return 2 * (cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim + 2 * cfg.dim)


def kv_bytes(cfg: ModelConfig, n: int, attention: str, policy: CondensateConfig | None,
             attended: int | None = None, fallback: float = 0.0) -> int:
    """KV bytes a decode step reads over all layers; a certified row's from its attended distant
    keys per KV head and the share of heads that fell back (measured)."""
    full = 2 * cfg.n_kv_heads * n * cfg.head_dim * 2
    if attention == "full":
        return cfg.n_layers * full
    return cfg.n_layers * sparse_bytes(n, cfg.n_kv_heads, cfg.head_dim, 2, policy, 1, fallback, attended)


def minirt_row(llm: LLM, name: str, n: int, new: int, synthetic: bool, prompt: list[int] | None = None) -> dict:
    """prompt: a real model's (else random tokens, or with synthetic a random cache)."""
    attention, policy = SYSTEMS[name]
    llm.decode_session = None  # the previous row's cache: each row's peak memory is its own
    torch.cuda.reset_peak_memory_stats()
    attended, fallback = None, 0.0  # a certified row's, measured below
    if not synthetic:
        if prompt is None:
            prompt = torch.randint(3, llm.cfg.vocab_size, (n,)).tolist()
        for _ in range(2):  # the first call compiles the kernels for this cache size; the second is timed
            torch.cuda.reset_peak_memory_stats()
            out = generate(llm, prompt, new, attention=attention, policy=policy, allow_long_context=True)
        assert len(out.tokens) == new or out.finish_reason == "eos", out.finish_reason
        seconds, prefill = out.decode_s / out.decode_steps, out.prefill_s
        if policy is not None and policy.certified:  # its bytes depend on the keys it kept: measured
            llm.decode_session = None
            r = compare(llm, prompt, MEASURED_STEPS, policy)
            attended = round(r.attended_keys - min(r.context, policy.anchor + policy.window))
            fallback = r.fallbacks / ((MEASURED_STEPS - 1) * llm.cfg.n_layers * llm.cfg.n_heads)
    else:  # the cache filled with random keys/values, then the same decode step generate() runs
        step = synthetic_step(llm, n, n + new, attention, policy)
        for _ in range(3):  # eager first step (Triton compiles), capture, one replay
            step()
        seconds, prefill = seconds_per_step(step, new - 3), float("nan")
    read = model_bytes(llm.cfg) + kv_bytes(llm.cfg, n, attention, policy, attended, fallback)
    return row(name + (" (synthetic cache)" if synthetic else ""), n, seconds, read, prefill)


def synthetic_step(llm: LLM, n: int, capacity: int, attention: str, policy) -> DecodeStep:
    """The decode step over a cache of `capacity` holding n random positions, as if prefilled
    (their ring and page summaries too), its first token chosen from random logits."""
    cache = llm.new_cache(capacity, attention, policy)
    cache.k.normal_()
    cache.v.normal_()
    cache.hold(n)
    step = DecodeStep(llm, cache)
    step.choose(torch.randn(1, llm.cfg.vocab_size, device="cuda"))
    return step


def seconds_per_step(step: DecodeStep, n: int) -> float:
    """Wall time per step of n steps in a row on the GPU (CUDA events), gaps between kernels included."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def row(system: str, n: int, seconds: float, read: int, prefill: float) -> dict:
    return {"system": system, "context": n, "tok_s": 1 / seconds, "ms_token": 1e3 * seconds, "bytes_token": read,
            "gb_s": read / seconds / 1e9, "prefill_s": prefill, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def read_bandwidth() -> float:
    """Bytes/s this GPU reads from HBM: the median of a sum over 4 GiB (far past any cache)."""
    from triton.testing import do_bench

    x = torch.ones(1 << 30, device="cuda")
    ms = do_bench(lambda: x.sum(), warmup=20, rep=200, return_mode="median")
    del x
    torch.cuda.empty_cache()
    return (4 << 30) / (ms / 1e3)


def transformers_row(n: int, new: int, compiled: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = TINYLLAMA
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                      max_position_embeddings=n + new, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if compiled:  # transformers compiles its decoding forward itself when the cache is static
        kwargs["cache_implementation"] = "static"
    prompt = torch.randint(3, c.vocab_size, (1, n), device="cuda")
    with torch.inference_mode():
        if compiled:  # compile (and capture) on a first call; the second is timed
            model.generate(prompt, **kwargs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model.generate(prompt, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    assert out.shape[1] == n + new
    seconds = (total - prefill) / (new - 1)
    name = "transformers generate (static cache + torch.compile)" if compiled else "transformers generate (dynamic cache)"
    result = row(name, n, seconds, model_bytes(c) + kv_bytes(c, n, "full", None), prefill)
    del model
    torch.cuda.empty_cache()
    return result


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Device: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, transformers "
             f"{meta['transformers']}; {meta.get('model', 'TinyLlama-shaped bf16, random weights')}, batch 1, "
             f"{meta['new_tokens']} new tokens.",
             f"Bandwidth: {meta['hbm'] / 1e12:.2f} TB/s read, measured in the same run (bench/generate.read_bandwidth).",
             "", "| system | context | tok/s | ms/token | MB read/token | GB/s | % of measured HBM | prefill s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['context']:,} | {r['tok_s']:.1f} | {r['ms_token']:.3f} | "
                     f"{r['bytes_token'] / 1e6:.0f} | {r['gb_s']:.0f} | {r['pct_hbm']:.1f}% | "
                     f"{r['prefill_s']:.2f} | {r['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    for system in dict.fromkeys(r["system"].replace(" (synthetic cache)", "") for r in rows):
        pts = sorted((r["context"], r["tok_s"]) for r in rows if r["system"].replace(" (synthetic cache)", "") == system)
        ax.plot(*zip(*pts), marker="o", label=system)
    contexts = sorted({r["context"] for r in rows})
    cfg = meta.get("cfg", TINYLLAMA)
    limit = [meta["hbm"] / (model_bytes(cfg) + kv_bytes(cfg, n, "full", None)) for n in contexts]
    ax.plot(contexts, limit, "k--", label=f"bandwidth limit, full attention ({meta['hbm'] / 1e12:.2f} TB/s measured)")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tok/s (batch 1)",
           title=f"{meta.get('model', 'TinyLlama-shaped bf16')} on {meta['device']}: decode speed against context")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: no point hidden
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 32768, 131072, 1048576])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--synthetic-from", type=int, default=1 << 20, help="contexts from here: random cache, no prefill")
    ap.add_argument("--transformers", type=lambda s: [int(x) for x in s.split(",") if x], default=[1024, 32768, 131072])
    ap.add_argument("--compiled", type=lambda s: [int(x) for x in s.split(",") if x], default=[1024, 32768])
    ap.add_argument("--systems", type=lambda s: [x for x in s.split(";") if x], default=list(SYSTEMS), help="names separated by ;")
    ap.add_argument("--merge", help="a result JSON of an earlier run whose rows join this one's table and plot")
    ap.add_argument("--model", help="a real checkpoint (name, .gguf or folder) instead of TinyLlama-shaped random weights")
    ap.add_argument("--out", default="results/generate")
    args = ap.parse_args()
    import transformers
    import triton

    torch.manual_seed(0)
    hbm = read_bandwidth()
    rows, extra = [], {}
    if args.systems:
        if args.model:
            llm = LLM.load(args.model, device="cuda", dtype="bf16")
            extra = {"model": f"{args.model} (real weights, bf16; prompts from the long Python source)", "cfg": llm.cfg}
        else:
            cfg = replace(TINYLLAMA, max_seq_len=max(args.contexts) + args.new_tokens)
            with torch.device("cuda"):
                model = Transformer(cfg).to(torch.bfloat16).eval()
            model.use_kernels(kernels.layer_implementation("cuda"))
            llm = LLM(model, None, Path("tinyllama-shaped-random"))
        for n in args.contexts:
            prompt = None
            if args.model:  # the text's first n tokens, within the model's context
                prompt = long_prompt(llm.tokenizer, "code", min(n, llm.cfg.max_seq_len - args.new_tokens), shorter=True)
                n = len(prompt)
            for name in args.systems:
                rows.append(minirt_row(llm, name, n, args.new_tokens, n >= args.synthetic_from, prompt))
                print(rows[-1], flush=True)
        del llm
        torch.cuda.empty_cache()
    for compiled, contexts in ((False, args.transformers), (True, args.compiled)):
        for n in contexts:
            try:
                rows.append(transformers_row(n, args.new_tokens, compiled))
            except torch.OutOfMemoryError as e:
                print(f"transformers at {n} (compiled={compiled}): out of memory ({e})", flush=True)
                continue
            print(rows[-1], flush=True)
    for r in rows:
        r["pct_hbm"] = 100 * r["gb_s"] * 1e9 / hbm
    if args.merge:
        rows = json.loads(Path(args.merge).read_text())["rows"] + rows
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "new_tokens": args.new_tokens, "hbm": hbm, "argv": sys.argv,
            **extra}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = {key: value for key, value in meta.items() if key != "cfg"}
    out.with_suffix(".json").write_text(json.dumps({"meta": saved, "rows": rows}, indent=2, default=float))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, meta, out.with_suffix(".png"))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
