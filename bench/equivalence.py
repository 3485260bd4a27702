"""Measure sparse-vs-full equivalence on real checkpoints and write EQUIVALENCE.md + JSON.

    python bench/equivalence.py [--model smollm2-135m --model qwen2.5-coder-0.5b] [--steps 200]
    python bench/equivalence.py --render results/equivalence.json   # the Markdown again, from a run's JSON
    python bench/equivalence.py --render results/equivalence.json --frontier results/*-frontier-*.json

Every number in EQUIVALENCE.md comes from this script; re-run it instead of editing the file.
Rows, per model: the paper's three prompts at the paper's policy (A=4 W=128 k=32); the default
(a window of 512) and variants of the paper's policy on the retrieval prompt (top-k shared per KV
group vs per head, page selection, a dense first layer, a growing budget, certified mode from
exact scores, from int8 copies and by threshold); the multi-needle haystack; and the random-weight
control. Long contexts (2K-32K) are bench/frontier.py's runs: --frontier renders them into the
long-context evaluation section (and EQUIVALENCE.png), FRONTIER.md has every detail.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirt import LLM, CondensateConfig  # noqa: E402
from minirt.config import PAPER_POLICY  # noqa: E402
from minirt.equivalence import compare, full_reference, needle_retrieval  # noqa: E402
from bench import frontier  # noqa: E402
from bench.frontier import NO_CAP  # noqa: E402
from minirt.workloads import PAPER_PROMPTS  # noqa: E402

VARIANTS = {
    "paper": PAPER_POLICY,
    "default": CondensateConfig(),
    "scope=head": replace(PAPER_POLICY, scope="head"),
    "selection=pages (16x oversampling)": replace(PAPER_POLICY, selection="pages"),
    "selection=pages, 4x oversampling": replace(PAPER_POLICY, selection="pages", page_oversample=4),
    "dense layer 0": replace(PAPER_POLICY, dense_layers=(0,)),
    "k=2*sqrt(n)": replace(PAPER_POLICY, budget_alpha=2.0, budget_exponent=0.5),
    "certified eps=1e-2": replace(PAPER_POLICY, top_k=NO_CAP, max_dropped_mass=1e-2),
    "certified int8 eps=1e-2": replace(PAPER_POLICY, selection="int8", top_k=NO_CAP, max_dropped_mass=1e-2),
    "certified int8 threshold eps=1e-2": replace(PAPER_POLICY, selection="int8-threshold", page_size=1, max_dropped_mass=1e-2),
    "k=0 (anchor+window)": replace(PAPER_POLICY, top_k=0),
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


def measure(model: str, args, t0: float) -> dict:
    llm = LLM.load(model, device=args.device, dtype="fp32")
    name = llm.path.parent.name if llm.path.suffix == ".gguf" else llm.path.name

    def log(what: str, r: dict) -> None:
        print(f"{name} {what}: match {r['token_match']:.3f} ({time.time() - t0:.0f}s)", file=sys.stderr)

    rows = []
    for prompt, text in PAPER_PROMPTS.items():
        ids = llm.tokenizer.encode(text)
        ref = full_reference(llm, ids, args.steps)
        for variant, policy in (VARIANTS.items() if prompt == "retrieval" else [("paper", PAPER_POLICY)]):
            rows.append(row(name, prompt, variant, compare(llm, ids, args.steps, policy, ref)))
            log(f"{prompt} {variant}", rows[-1])
    needles = {v: needle_retrieval(llm, VARIANTS[v] if v != "full" else None)
               for v in ("full", "paper", "default", "k=0 (anchor+window)")}
    control = row(name + " (random weights)", "retrieval", "paper",
                  compare(randomized(llm), llm.tokenizer.encode(PAPER_PROMPTS["retrieval"]), args.steps, PAPER_POLICY))
    return {"model": name, "rows": rows, "needles": needles, "control": control}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="repeatable; default: smollm2-135m and qwen2.5-coder-0.5b")
    ap.add_argument("--steps", type=int, default=200, help="greedy tokens on the short prompts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="EQUIVALENCE.md")
    ap.add_argument("--json", default="results/equivalence.json")
    ap.add_argument("--render", metavar="JSON", help="write --out from a run's JSON instead of measuring")
    ap.add_argument("--frontier", nargs="*", default=[], metavar="JSON",
                    help="bench/frontier.py run files: the long-context evaluation section (with --render)")
    args = ap.parse_args()
    if args.render:
        run = json.loads(Path(args.render).read_text())
        Path(args.out).write_text(render(run["results"], run["meta"], args.frontier, Path(args.out).with_suffix(".png"),
                                         "python " + shlex.join(sys.argv)))
        print(f"wrote {args.out}", file=sys.stderr)
        return
    t0 = time.time()
    meta = {"models": args.model or ["smollm2-135m", "qwen2.5-coder-0.5b"], "steps": args.steps, "device": args.device,
            "date": str(datetime.date.today()),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    results = [measure(model, args, t0) for model in meta["models"]]
    meta["minutes"] = (time.time() - t0) / 60
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    Path(args.out).write_text(render(results, meta))
    print(f"wrote {args.out} and {args.json}", file=sys.stderr)


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(results: list[dict], meta: dict, frontier_runs: list[str] = (), plot: Path | None = None,
           command: str = "") -> str:
    def policy(p: dict) -> str:
        if p["max_dropped_mass"] is not None and (p["top_k"] >= NO_CAP or p["selection"] == "int8-threshold"):
            return f"A={p['anchor']} W={p['window']} k adaptive"
        s = f"A={p['anchor']} W={p['window']} k={p['top_k']}"
        if p["budget_alpha"]:
            s += f" (k>={p['budget_alpha']}*n^{p['budget_exponent']})"
        return s

    head = ("| model | prompt | variant | policy | tokens (prompt+decoded) | token match | first divergence | "
            "teacher-forced argmax agreement | max KL | mean KL | top-5 overlap | max dropped mass | mean dropped mass | "
            "fallbacks | page recall | keys attended |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")

    def table(rows: list[dict]) -> str:
        return head + "".join(
            f"| {r['model']} | {r['prompt']} | {r['variant']} | {policy(r['policy'])} | {r['prompt_tokens']}+{r['steps']} | "
            f"{100 * r['token_match']:.1f}% | {'-' if r['first_divergence'] is None else r['first_divergence']['step']} | "
            f"{100 * r['teacher_forced_agreement']:.1f}% | {r['kl_max']:.2e} | {r['kl_mean']:.2e} | {r['top5_overlap_mean']:.3f} | "
            f"{r['dropped_mass_max']:.3f} | {r['dropped_mass_mean']:.4f} | {r['fallbacks']} | {percent(r['page_recall'])} | "
            f"{percent(r['attended_keys'] / r['context'])} |\n"
            for r in rows)

    short = table([r for res in results for r in res["rows"] + [res["control"]]])
    needle_rows = "".join(f"| {res['model']} | {v} | {sum(ok for ok in found.values())}/5 | "
                          + ", ".join(f"{a}:{'yes' if ok else 'no'}" for a, ok in found.items()) + " |\n"
                          for res in results for v, found in res["needles"].items())
    models = " ".join(f"--model {m}" for m in meta["models"])
    return f"""# Sparse vs full attention: measured equivalence

Generated by `python bench/equivalence.py {models} --steps {meta['steps']}` on {meta['date']} at commit {meta['commit']},
{meta['device'].upper()}, fp32, in {meta['minutes']:.0f} minutes{meta.get('note', '')}. Do not edit by hand.

Definitions (minirt/equivalence.py): *token match* compares free-running greedy decodes position by
position; *first divergence* is the first step where they differ; *teacher-forced* metrics feed
full attention's tokens to the sparse model, so each step compares next-token distributions on the
same context; *dropped mass* is the full-softmax attention mass outside the sparse set, per layer
and head (exact; mean over decode steps, layers and heads); *fallbacks* are (layer, head, step)
triples that certified mode sent to full attention (dropped mass is that of the sparse set before
any fallback; certified modes choose, per step and KV group, the fewest keys that keep every head
within eps: from exact scores, or from int8 copies' error bounds); *page recall* is the fraction of the exact top-k (same group-max score) that page
selection found, averaged over decode steps and layers; *keys attended* is the share of the
context in the exact softmax per step and layer (measured, before fallbacks).

{short}
The rows marked *random weights* are the paper's control: the same architecture with random N(0, 0.02) weights. Its
attention is spread nearly uniformly, so the same policy drops far more mass than on the trained
weights; learned sparsity is a property of trained models, not of the architecture.

## Long context

{long_context(frontier_runs, plot, command)}
## Multi-needle retrieval (five facts in a ~1.7K-token haystack, asked one by one)

| model | attention | retrieved | per needle |
|---|---|---|---|
{needle_rows}"""


def long_context(paths: list[str], plot: Path | None, command: str) -> str:
    """The long-context evaluation from bench/frontier.py's runs, and its plot at `plot`."""
    if not paths:
        return ("Long prompts (continuation of source and prose, pass keys, a five-needle haystack, every variant "
                "with its KV bytes read) are measured by `bench/frontier.py` into FRONTIER.md.\n")
    results = frontier.load(paths)
    section, rows = frontier.evaluation(results)
    if plot is not None:
        frontier.plot(rows, plot)
    return f"""Rendered by `{command}` from these `bench/frontier.py` runs (how long each took is
its last field):

{frontier.runs_list(results)}
Plot: {plot.name if plot else "none"} (fraction of KV bytes read against token match and KL, one curve per variant
family, the group oracle at eps = 1e-2 marked as a star). FRONTIER.md has each continuation's and
each retrieval prompt's row, the tuning sweep and the certified modes against the oracle.

{section}"""


if __name__ == "__main__":
    main()
