"""Page selection against exact top-k on a real model at long context.

    python bench/page_recall.py --model SmolLM2-135M-Instruct [--context 8000] [--steps 8] [--out results/page_recall]

Prefills a long real text once, then for each page size, oversampling and summary dtype (the
cache's, or fp8 rounded outward) decodes `steps` tokens of the text's own continuation (teacher
forcing) with selection="pages" and the certificate on, and records per layer and step the fraction of the exact top-k (same group-max score) that page
selection found, plus the attention mass each policy left out. Exact selection is the baseline.
Runs on CPU or GPU; writes JSON and a Markdown table.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirt import LLM, CondensateConfig  # noqa: E402
from minirt.config import PAPER_POLICY  # noqa: E402
from minirt.generation import forced_steps, prefill  # noqa: E402
from minirt.workloads import haystack  # noqa: E402


def texts() -> dict[str, str]:
    import argparse as a, dataclasses as d, json.decoder as j, textwrap as t  # real code, shipped with Python
    code = "\n\n".join(inspect.getsource(m) for m in (a, d, j, t))
    return {"python source (argparse, dataclasses, json.decoder, textwrap)": code,
            "needle haystack (5 facts in filler)": haystack(sentences_between=120)}


@torch.inference_mode()
def run(llm: LLM, ids: list[int], steps: int, policy: CondensateConfig, base, first: torch.Tensor) -> dict:
    n = len(ids) - steps
    cache = llm.new_cache(len(ids), "sparse", policy, certify=True)
    cache.copy_prefix(base)  # history, ring and page summaries of the shared prefill
    recall, dropped = [], []
    for i, _ in enumerate(forced_steps(llm, ids[:n], ids[n:], cache, prefilled=first)):
        if i == 0:
            continue  # the prefill's logits: no decode step yet
        recall.append(cache.recall.clone())
        dropped.append(cache.dropped.clone())
    recall, dropped = torch.stack(recall), torch.stack(dropped)  # [steps, layers], [steps, layers, B, H]
    row = {"dropped_mass_mean": float(dropped.mean()), "dropped_mass_max": float(dropped.max())}
    if policy.selection == "pages":
        row |= {"recall_mean": float(recall.mean()), "recall_min": float(recall.min()),
                "exact_match": float((recall == 1).float().mean())}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--page-sizes", default="16,32,64")
    ap.add_argument("--oversample", default="4,16")
    ap.add_argument("--summaries", default="cache,fp8", help="summary dtypes to compare")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/page_recall")
    args = ap.parse_args()
    llm = LLM.load(args.model, device=args.device, dtype="fp32")
    base_policy = PAPER_POLICY  # as measured in the README
    rows = []
    for name, text in texts().items():
        ids = llm.tokenizer.encode(text)[: args.context + args.steps]
        n = len(ids) - args.steps
        t0 = time.time()
        base = llm.new_cache(n, "full")
        first = prefill(llm, ids[:n], base)
        print(f"{name}: {n} tokens prefilled in {time.time() - t0:.0f} s", flush=True)
        policies = [base_policy] + [replace(base_policy, selection="pages", page_size=P, page_oversample=o, summary_dtype=sd)
                                    for P in map(int, args.page_sizes.split(",")) for o in map(float, args.oversample.split(","))
                                    for sd in args.summaries.split(",")]
        for policy in policies:
            row = {"text": name, "context": n, "steps": args.steps, "selection": policy.selection,
                   "page_size": policy.page_size if policy.selection == "pages" else None,
                   "oversample": policy.page_oversample if policy.selection == "pages" else None,
                   "summaries": policy.summary_dtype if policy.selection == "pages" else None,
                   **run(llm, ids, args.steps, policy, base, first)}
            rows.append(row)
            print(row, flush=True)
    header = "| text | context | selection | page size | oversample | summaries | recall of exact top-k (mean / min) | (layer, step) pairs with recall 1 | dropped mass mean / max |"
    lines = [f"Model: {args.model} (fp32, {llm.model.device}); A={base_policy.anchor} W={base_policy.window} "
             f"k={base_policy.top_k}, scope group; {args.steps} teacher-forced steps per row\n", header, "|---" * 9 + "|"]
    for r in rows:
        rec = f"{100 * r['recall_mean']:.1f}% / {100 * r['recall_min']:.1f}%" if "recall_mean" in r else "(exact)"
        em = f"{100 * r['exact_match']:.1f}%" if "exact_match" in r else ""
        lines.append(f"| {r['text']} | {r['context']} | {r['selection']} | {r['page_size'] or ''} | {r['oversample'] or ''} | {r['summaries'] or ''} "
                     f"| {rec} | {em} | {r['dropped_mass_mean']:.3e} / {r['dropped_mass_max']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "device": str(llm.model.device), "torch": torch.__version__, "dtype": "fp32",
            "policy": asdict(base_policy)}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
