"""End to end on a GPU: minirt vs transformers in bf16/fp16, and decode throughput.

    python bench/e2e.py [--out results/e2e]

1. Parity: a tiny random-init checkpoint of each family, loaded by transformers and by minirt on
   CUDA in bf16 and fp16; transformers decodes 20 greedy steps and minirt is fed the same tokens
   (teacher forcing, so both see identical contexts): the largest logit difference relative to the
   logits' scale, and how many steps pick the same argmax (half-precision near-ties may flip). Then
   a sparse decode (Triton kernels) must stay finite.
2. Throughput: a TinyLlama-shaped model (random weights: speed does not depend on them), bf16,
   512-token prompt, 128 greedy tokens: transformers generate() vs minirt's generate() (its CUDA-graph
   decode step), full and sparse. bench/generate.py measures decode speed against context.
Writes JSON + Markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import tiny_config, write_tiny  # noqa: E402
from parity import forced_logits, hf_greedy, minirt_greedy  # noqa: E402

from minirt import LLM, CondensateConfig, generate  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parity(tmp: Path, device: str) -> list[dict]:
    from transformers import AutoModelForCausalLM

    rows = []
    for family in ("gpt2", "gpt_neox", "llama", "qwen2"):
        folder = write_tiny(tmp / family, tiny_config(family))
        ids = list(range(5, 40))
        for name, dtype in DTYPES.items():
            ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
            llm = LLM.load(folder, device=device, dtype=name)
            with torch.no_grad():
                ref_logits, ref_tokens = hf_greedy(ref, ids, 20)
            ours = forced_logits(llm, ids, ref_tokens)
            ref_last = torch.stack([x[-1].float() for x in ref_logits])
            scale = float(ref_last.abs().max())
            diff = float((ref_last - ours).abs().max())
            agree = int((ref_last.argmax(-1) == ours.argmax(-1)).sum())
            sparse = llm.new_cache(len(ids) + 21, "sparse", CondensateConfig(anchor=2, window=8, top_k=4))
            sparse_logits, _ = minirt_greedy(llm, ids, 20, cache=sparse)
            rows.append({"family": family, "dtype": name, "max_abs_diff": diff, "rel_to_scale": diff / scale,
                         "argmax_agree": f"{agree}/{len(ref_last)}",
                         "sparse_finite": all(bool(torch.isfinite(x).all()) for x in sparse_logits)})
            print(rows[-1], flush=True)
    return rows


def throughput(tmp: Path) -> list[dict]:
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        ref = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    folder = tmp / "tinyllama-shape"
    ref.save_pretrained(folder)
    prompt = torch.randint(100, 30000, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []

    def timed(name, fn):
        fn(8)  # warm-up: compiles kernels, fills allocator caches
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = fn(128)
        torch.cuda.synchronize()
        rows.append({"method": name, "new_tokens": n, "seconds": time.perf_counter() - t0})
        rows[-1]["tokens_per_s"] = n / rows[-1]["seconds"]
        print(rows[-1], flush=True)

    x = torch.tensor([prompt], device="cuda")
    timed("transformers generate (sdpa, bf16)",
          lambda n: ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False).shape[1] - len(prompt))
    llm = LLM.load(folder, device="cuda", dtype="bf16")
    for attention in ("full", "sparse"):
        timed(f"minirt {attention} (bf16, generate(): CUDA-graph step)",
              lambda n, a=attention: len(generate(llm, prompt, n, attention=a).tokens))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/e2e")
    ap.add_argument("--device", default="cuda", help="cpu runs the parity half only (a smoke test)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        result = {"meta": {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                           "dtype": "bf16/fp16"},
                  "parity": parity(Path(tmp), args.device), "throughput": throughput(Path(tmp)) if cuda else []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    md = ["| family | dtype | max abs logit diff (same contexts) | relative to max logit | argmax agree | sparse finite |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['family']} | {r['dtype']} | {r['max_abs_diff']:.3e} | {r['rel_to_scale']:.2e} | {r['argmax_agree']} | "
           f"{r['sparse_finite']} |" for r in result["parity"]]
    md += ["", "| decode (512-token prompt, 128 new tokens, TinyLlama shape) | tokens/s | seconds |", "|---|---|---|"]
    md += [f"| {r['method']} | {r['tokens_per_s']:.1f} | {r['seconds']:.2f} |" for r in result["throughput"]]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
