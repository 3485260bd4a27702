"""Measure sparse-vs-full equivalence on real checkpoints and write EQUIVALENCE.md + JSON.

    python bench/equivalence.py --model ~/.cache/minirt-models/SmolLM2-135M-Instruct [--steps 200]

Every number in EQUIVALENCE.md comes from this script; re-run it instead of editing the file.
Rows: the paper's three prompts at the default policy; policy variants on the retrieval prompt
(top-k shared per KV group vs per head, page selection, a dense first layer, a growing budget,
the certificate); the multi-needle haystack; and the random-weight control.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirt import LLM, CondensateConfig  # noqa: E402
from minirt.equivalence import compare, needle_retrieval  # noqa: E402
from minirt.workloads import PAPER_PROMPTS  # noqa: E402

VARIANTS = {
    "default": CondensateConfig(),
    "scope=head": CondensateConfig(scope="head"),
    "selection=pages (16x oversampling)": CondensateConfig(selection="pages"),
    "selection=pages, 4x oversampling": CondensateConfig(selection="pages", page_oversample=4),
    "dense layer 0": CondensateConfig(dense_layers=(0,)),
    "k=2*sqrt(n)": CondensateConfig(budget_alpha=2.0, budget_exponent=0.5),
    "certificate eps=0.05": CondensateConfig(max_dropped_mass=0.05),
    "k=0 (anchor+window)": CondensateConfig(top_k=0),
}


def randomized(llm: LLM, seed: int = 0) -> LLM:
    """The same architecture with random N(0, 0.02) weights (norm weights 1): the paper's control."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    return llm


def row(model: str, prompt: str, variant: str, r) -> dict:
    return {"model": model, "prompt": prompt, "variant": variant, **{k: v for k, v in asdict(r).items()
                                                                   if k not in ("full_text", "sparse_text")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="EQUIVALENCE.md")
    ap.add_argument("--json", default="results/equivalence.json")
    args = ap.parse_args()
    llm = LLM.load(args.model, device="cpu", dtype="fp32")
    name = Path(args.model).name
    rows, t0 = [], time.time()
    for prompt, text in PAPER_PROMPTS.items():
        ids = llm.tokenizer.encode(text)
        for variant, policy in (VARIANTS.items() if prompt == "retrieval" else [("default", VARIANTS["default"])]):
            rows.append(row(name, prompt, variant, compare(llm, ids, args.steps, policy)))
            print(f"{prompt} {variant}: match {rows[-1]['token_match']:.3f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    needles = {v: needle_retrieval(llm, VARIANTS[v] if v != "full" else None) for v in ("full", "default", "k=0 (anchor+window)")}
    control = row(name + " (random weights)", "retrieval", "default",
                  compare(randomized(llm), llm.tokenizer.encode(PAPER_PROMPTS["retrieval"]), args.steps, VARIANTS["default"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "needles": needles, "control": control}, indent=2))
    Path(args.out).write_text(render(rows, needles, control, args, commit))
    print(f"wrote {args.out} and {args.json}", file=sys.stderr)


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(rows, needles, control, args, commit: str) -> str:
    def policy(p: dict) -> str:
        s = f"A={p['anchor']} W={p['window']} k={p['top_k']}"
        if p["budget_alpha"]:
            s += f" (k>={p['budget_alpha']}*n^{p['budget_exponent']})"
        return s

    head = ("| model | prompt | variant | policy | tokens (prompt+decoded) | token match | first divergence | "
            "teacher-forced argmax agreement | max KL | mean KL | top-5 overlap | max dropped mass | mean dropped mass | "
            "fallbacks | page recall |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['model']} | {r['prompt']} | {r['variant']} | {policy(r['policy'])} | {r['prompt_tokens']}+{r['steps']} | "
        f"{100 * r['token_match']:.1f}% | {'-' if r['first_divergence'] is None else r['first_divergence']['step']} | "
        f"{100 * r['teacher_forced_agreement']:.1f}% | {r['kl_max']:.2e} | {r['kl_mean']:.2e} | {r['top5_overlap_mean']:.3f} | "
        f"{r['dropped_mass_max']:.3f} | {r['dropped_mass_mean']:.4f} | {r['fallbacks']} | {percent(r['page_recall'])} |\n"
        for r in rows + [control])
    needle_rows = "".join(f"| {v} | {sum(ok for ok in res.values())}/5 | "
                          + ", ".join(f"{a}:{'yes' if ok else 'no'}" for a, ok in res.items()) + " |\n"
                          for v, res in needles.items())
    return f"""# Sparse vs full attention: measured equivalence

Generated by `python bench/equivalence.py --model {args.model} --steps {args.steps}` on
{datetime.date.today()} at commit {commit}, CPU, fp32. Do not edit by hand.

Definitions (minirt/equivalence.py): *token match* compares free-running greedy decodes position by
position; *first divergence* is the first step where they differ; *teacher-forced* metrics feed
full attention's tokens to the sparse model, so each step compares next-token distributions on the
same context; *dropped mass* is the full-softmax attention mass outside the sparse set, per layer
and head (exact; mean over decode steps, layers and heads); *fallbacks* are (layer, head, step)
triples that the certificate sent to full attention (dropped mass is that of the sparse set before
any fallback); *page recall* is the fraction of the exact top-k (same group-max score) that page
selection found, averaged over decode steps and layers.

{head}{body}
The last row is the paper's control: the same architecture with random N(0, 0.02) weights. Its
attention is spread nearly uniformly, so the same policy drops far more mass than on the trained
weights; learned sparsity is a property of trained models, not of the architecture.

## Multi-needle retrieval (five facts in a ~1.7K-token haystack, asked one by one)

| attention | retrieved | per needle |
|---|---|---|
{needle_rows}"""


if __name__ == "__main__":
    main()
