"""Long-context evaluation on real weights: how much of the KV cache a decode step reads against how
close sparse decoding stays to full attention (the bytes-vs-fidelity frontier), per variant.

    python bench/frontier.py run --model smollm2-135m --lengths 2048,4096,8192 [--steps 128] [--device cuda]
    python bench/frontier.py render results/frontier-*.json     # -> FRONTIER.md, FRONTIER.png

Workloads at each length: continuation of a long Python source and of long prose (free-running
greedy token match over --steps tokens, first divergence, teacher-forced KL and dropped mass); a
pass key at depths 10..90% and five needles spread through a haystack (retrieval accuracy, greedy
answers). Variants: exact top-k, token-level page selection, whole pages at two
budgets, whole pages with the tail estimate, certified mode at three eps, and the certified int8
modes (int8-threshold also with its tail estimate). `run` writes one JSON
per model; `render` joins them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from statistics import fmean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.attention import page_bin_bytes, sparse_bytes  # noqa: E402
from minirt import LLM, CondensateConfig  # noqa: E402
from minirt.config import PAPER_POLICY  # noqa: E402
from minirt.equivalence import compare, full_reference  # noqa: E402
from minirt.kernels import reference as R  # noqa: E402
from minirt import generation  # noqa: E402
from minirt.generation import prefill, stream_tokens  # noqa: E402
from minirt.workloads import NEEDLES, PASSKEY_DEPTHS, PASSKEYS, haystack_prompts, long_prompt, passkey_prompt  # noqa: E402

NO_CAP = 1 << 30  # certified mode's top_k: never cut the list (the cache's capacity bounds it)


BASELINES = ("exact k=32", "pages k=32", "whole pages k=1024")  # the main variants the sweep varies
# rows of earlier runs under the names they had then
RENAMED = {"exact k=32 (default)": "exact k=32", "exact k=32 W=512": "exact k=32 W=512 (default)"}
# runs whose int8 copies had one scale per key only (before 6e0da5d's per-channel scales): their
# int8 rows are named so
PER_KEY_SCALES = {"7f3b526", "31194a1", "454fdd3", "64e293e"}
# runs whose int8-threshold rows binned every head's bounds unshifted (before
# reference.base_shift): their threshold rows are named so
UNSHIFTED_BINS = {"4bbb6de", "11b9e3e", "3963de9", "c324d44"}
# runs whose meta has no kept_margin counted the kept keys' mass at its lower bound in the int8
# modes (before reference.KEPT_MARGIN), those with no key_offsets coded keys without offsets
# (before reference.key_offsets), those with no uncapped_shift capped each head's shift at 128 nats
# (before 2026-12-03), those with no sampled_cut_shift shifted each head by its top over the anchor
# and window (before reference.sampled_cut): their int8 (threshold) rows are named so. The marks of
# rows later runs replace:
SUPERSEDED = (" (per-key scales)", " (unshifted bins)", " (margin 1)", " (no offsets)", " (capped shift)",
              " (top shift)")


def superseded(variant: str) -> bool:
    return variant.endswith(SUPERSEDED)


def variants() -> dict[str, CondensateConfig | None]:
    whole = dict(selection="whole-pages")
    out: dict[str, CondensateConfig | None] = {"full": None, "exact k=32": PAPER_POLICY,
                                               "pages k=32": replace(PAPER_POLICY, selection="pages")}
    for k in (512, 1024):
        out[f"whole pages k={k}"] = replace(PAPER_POLICY, top_k=k, **whole)
    out["whole pages k=512 + tail"] = replace(PAPER_POLICY, top_k=512, tail=True, **whole)
    for eps in (1e-1, 1e-2, 1e-3):
        out[f"certified eps={eps:g}"] = replace(PAPER_POLICY, top_k=NO_CAP, max_dropped_mass=eps)
    for eps in (1e-1, 1e-2, 1e-3):
        out[f"certified int8 eps={eps:g}"] = replace(PAPER_POLICY, selection="int8", top_k=NO_CAP, max_dropped_mass=eps)
    threshold = replace(PAPER_POLICY, selection="int8-threshold", page_size=1, max_dropped_mass=1e-2)
    for eps in (1e-1, 3e-2, 1e-2, 1e-3):  # the GPU's certified mode: single keys by threshold, no sort
        out[f"certified int8 threshold eps={eps:g}"] = replace(threshold, max_dropped_mass=eps)
    for eps in (1e-1, 3e-2, 1e-2, 1e-3):  # and the candidates it leaves out estimated (reference.estimate_tail)
        out[f"certified int8 threshold eps={eps:g} + tail"] = replace(threshold, max_dropped_mass=eps, tail=True)
    return out


def tuning() -> dict[str, CondensateConfig | None]:
    """Selection settings around the main variants (issue #11, item 4): window, dense first layers
    (Quest keeps two), per-head scope, oversampling, page size; with the main variants they vary,
    for lengths no main run covers (render takes a main run's rows where there is one)."""
    exact, whole = PAPER_POLICY, replace(PAPER_POLICY, selection="whole-pages", top_k=1024)
    main = variants()
    return {"full": None, **{name: main[name] for name in BASELINES},
            "exact k=32 W=512 (default)": replace(exact, window=512),
            "exact k=32 dense layers 0,1": replace(exact, dense_layers=(0, 1)),
            # SmolLM2's layers 0-11 leave out 10-100% of the mass at every step (compare --plot, haystack)
            "exact k=32 dense layers 0-11": replace(exact, dense_layers=tuple(range(12))),
            "exact k=32 scope=head": replace(exact, scope="head"),
            "pages k=32 4x oversampling": replace(exact, selection="pages", page_oversample=4),
            "pages k=32 64x oversampling": replace(exact, selection="pages", page_oversample=64),
            "whole pages k=1024 P=16": replace(whole, page_size=16),
            "whole pages k=1024 P=64": replace(whole, page_size=64),
            "whole pages k=1024 W=512": replace(whole, window=512)}


@contextmanager
def kernels_for(policy: CondensateConfig | None):
    """Whole pages' tail estimate and per-head selection run on the PyTorch reference (no Triton kernel)."""
    old = os.environ.get("MINIRT_KERNELS")
    if policy is not None and ((policy.tail and policy.whole_pages) or policy.scope == "head"):
        os.environ["MINIRT_KERNELS"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINIRT_KERNELS", None)
        else:
            os.environ["MINIRT_KERNELS"] = old


def read_fraction(llm: LLM, policy: CondensateConfig | None, n: float, attended: float, fallback_rate: float) -> float:
    """Bytes one decode step reads from the KV cache and its summaries, over full attention's (bf16
    cache), averaged over layers. Certified mode scores every key (half the cache), then reads the
    keys and values it attended (measured), and a head that falls back reads everything."""
    if policy is None:
        return 1.0
    cfg = llm.cfg
    full = 2 * cfg.n_kv_heads * n * cfg.head_dim * 2
    if policy.certified:  # every key scored (bf16, or int8 + an fp32 scale), then the attended keys
        scored = (cfg.head_dim + 4) / (4 * cfg.head_dim) if policy.shadowed else 0.5
        if policy.selection == "int8-threshold":
            scored += page_bin_bytes(cfg.n_kv_heads, int(n), policy.page_size) / full
        return min(1.0, scored + attended / n + fallback_rate)
    dense = len(policy.dense_layers) / cfg.n_layers  # dense layers read every key and value
    return dense + (1 - dense) * sparse_bytes(int(n), cfg.n_kv_heads, cfg.head_dim, 2, policy, 1) / full


def answers(llm: LLM, prompts: list[list[int]], policy: CondensateConfig | None, shared_cache, shared: int,
            max_tokens: int = 12) -> list[str]:
    """Greedy answers to prompts that share their first `shared` tokens (held by shared_cache)."""
    out = []
    for ids in prompts:
        with kernels_for(policy):
            cache = llm.new_cache(len(ids) + max_tokens, "full" if policy is None else "sparse", policy)
        cache.copy_prefix(shared_cache)
        tokens = []
        for token, _ in stream_tokens(llm, ids[shared:], cache, max_tokens):
            if token in llm.eos_ids:
                break
            tokens.append(token)
        out.append(llm.tokenizer.decode(tokens))
    return out


def retrieval(llm: LLM, n: int, table: dict) -> dict[str, dict[str, float]]:
    """Per variant: fraction of pass keys (5 depths) and of needles (5) found."""
    found = {name: {"passkey": 0.0, "needles": 0.0} for name in table}
    for depth, key in zip(PASSKEY_DEPTHS, PASSKEYS):
        ids = passkey_prompt(llm.tokenizer, n, depth, key)
        shared = llm.new_cache(len(ids) - 1, "full")
        prefill(llm, ids[:-1], shared)
        for name, policy in table.items():
            reply = answers(llm, [ids], policy, shared, len(ids) - 1)[0]
            found[name]["passkey"] += (key in reply) / len(PASSKEYS)
    prompts = haystack_prompts(llm.tokenizer, n)
    common = 0
    while all(p[common] == prompts[0][common] for p in prompts):
        common += 1
    shared = llm.new_cache(common, "full")
    prefill(llm, prompts[0][:common], shared)
    for name, policy in table.items():
        for needle, reply in zip(NEEDLES, answers(llm, prompts, policy, shared, common)):
            found[name]["needles"] += (needle.answer.lower() in reply.lower()) / len(NEEDLES)
    return found


def run(args) -> None:
    generation.PREFILL_CHUNK["cuda"] = 8192  # an fp32 prefill's attention scores at 32K would fill the GPU
    llm = LLM.load(args.model, device=args.device, dtype=args.dtype)
    name = llm.path.parent.name if llm.path.suffix == ".gguf" else llm.path.name
    table = {name: policy for name, policy in (tuning() if args.set == "tuning" else variants()).items()
             if not args.only or name == "full" or any(part in name for part in args.only.split(";"))}
    t0, rows = time.time(), []
    for n in args.lengths:
        n = min(n, llm.cfg.max_seq_len - args.steps - 8)  # prompt and decode fit the model's context
        for kind in args.kinds:
            ids = long_prompt(llm.tokenizer, kind, n, shorter=True)  # the texts run out before 32K
            ref = full_reference(llm, ids, args.steps)
            for variant, policy in table.items():
                if policy is None:
                    continue
                with kernels_for(policy):
                    r = compare(llm, ids, args.steps, policy, ref)
                steps_layers_heads = max(1, (args.steps - 1) * llm.cfg.n_layers * llm.cfg.n_heads)
                rows.append({"model": name, "length": len(ids), "workload": kind, "variant": variant, "policy": asdict(policy),
                             "read": read_fraction(llm, policy, r.context, r.attended_keys, r.fallbacks / steps_layers_heads),
                             "attended": r.attended_keys / r.context, "token_match": r.token_match,
                             "first_divergence": None if r.first_divergence is None else r.first_divergence.step,
                             "agreement": r.teacher_forced_agreement, "kl_max": r.kl_max, "kl_mean": r.kl_mean,
                             "dropped_max": r.dropped_mass_max, "dropped_mean": r.dropped_mass_mean,
                             "fallbacks": r.fallbacks})
                print(f"{name} {kind} {len(ids)} {variant}: read {100 * rows[-1]['read']:.1f}%, match {r.token_match:.3f}, "
                      f"KL mean {r.kl_mean:.2e} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        for variant, found in retrieval(llm, n, table).items():
            rows.append({"model": name, "length": n, "workload": "retrieval", "variant": variant, **found})
            print(f"{name} retrieval {n} {variant}: {found} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        save(args, name, rows, t0)  # after each length: a run cut short keeps what it measured


def save(args, name: str, rows: list[dict], t0: float) -> None:
    meta = {"model": name, "set": args.set, "steps": args.steps, "device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
            "dtype": args.dtype, "minutes": (time.time() - t0) / 60, "commit": commit(), "date": str(datetime.date.today()),
            "command": "python " + shlex.join(sys.argv), "kept_margin": R.KEPT_MARGIN, "key_offsets": True,
            "uncapped_shift": True, "sampled_cut_shift": R.SHIFT_SAMPLES}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def load(paths: list[str]) -> list[dict]:
    """Run JSONs with their rows under today's variant names, each row also given `nominal`: the
    length its run asked for (a continuation is as long as its text allows, retrieval as the
    model's context allows)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    for res in results:
        argv = shlex.split(res["meta"]["command"])
        asked = sorted(int(x) for x in argv[argv.index("--lengths") + 1].split(","))
        for r in res["rows"]:
            r["variant"] = RENAMED.get(r["variant"], r["variant"])
            if res["meta"]["commit"] in PER_KEY_SCALES and "int8" in r["variant"]:
                r["variant"] += " (per-key scales)"
            elif res["meta"]["commit"] in UNSHIFTED_BINS and "threshold" in r["variant"]:
                r["variant"] += " (unshifted bins)"
            elif "kept_margin" not in res["meta"] and "int8" in r["variant"]:
                r["variant"] += " (margin 1)"
            elif "key_offsets" not in res["meta"] and "int8" in r["variant"]:
                r["variant"] += " (no offsets)"
            elif "uncapped_shift" not in res["meta"] and "threshold" in r["variant"]:
                r["variant"] += " (capped shift)"
            elif "sampled_cut_shift" not in res["meta"] and "threshold" in r["variant"]:
                r["variant"] += " (top shift)"
            r["nominal"] = min(n for n in asked if n >= r["length"])
    return results


def runs_list(results: list[dict]) -> str:
    """One Markdown line per run: its command, date, commit, device and how long it took."""
    return "".join(f"- {m['model']}: `{m['command']}` on {m['date']} at commit {m['commit']}, {m['device']}, {m['dtype']}, "
                   f"{m['steps']} decoded tokens per continuation, in {m['minutes']:.0f} minutes"
                   f"{'; ' + m['note'] if m.get('note') else ''}\n"
                   for m in (res["meta"] for res in results))


def render(args) -> None:
    results = load(args.results)
    rows = [r for res in results if res["meta"].get("set", "main") == "main" for r in res["rows"]]
    swept = [r for res in results if res["meta"].get("set") == "tuning" for r in res["rows"]]
    runs = runs_list(results)
    cont = [r for r in rows if r["workload"] != "retrieval"]
    table = "".join(
        f"| {r['model']} | {r['workload']} {r['length']} | {r['variant']} | {100 * r['read']:.1f}% | "
        f"{100 * r['attended']:.1f}% | {100 * r['token_match']:.1f}% | "
        f"{'-' if r['first_divergence'] is None else r['first_divergence']} | {100 * r['agreement']:.1f}% | "
        f"{r['kl_max']:.2e} | {r['kl_mean']:.2e} | {r['dropped_max']:.3f} | {r['dropped_mean']:.4f} | {r['fallbacks']} |\n"
        for r in cont)
    ret = "".join(f"| {r['model']} | {r['length']} | {r['variant']} | {100 * r['passkey']:.0f}% | {100 * r['needles']:.0f}% |\n"
                  for r in rows if r["workload"] == "retrieval")
    oracle = "".join(f"| {r['model']} | {r['workload']} {r['length']} | {eps} | "
                     f"{'threshold' if 'threshold' in r['variant'] else 'ranked'}"
                     f"{' + tail' if 'tail' in r['variant'] else ''}"
                     f"{''.join(', ' + m[2:-1] for m in SUPERSEDED if r['variant'].endswith(m))} | {100 * o['attended']:.1f}% | "
                     f"{100 * r['attended']:.1f}% | {r['attended'] / o['attended']:.2f} | {100 * o['read']:.1f}% | "
                     f"{100 * r['read']:.1f}% | {r['fallbacks']} |\n"
                     for r, o, eps in against_oracle(cont))
    # the sweep's baseline: the main variants it varies, on the same models and lengths (a main
    # run's rows where one covers them, else the sweep's own)
    at = {(r["model"], r["length"]) for r in swept}
    baseline = [r for r in rows if (r["model"], r["length"]) in at and r["variant"] in BASELINES]
    covered = {(r["model"], r["length"], r["variant"], r["workload"]) for r in baseline}
    swept = [r for r in swept if (r["model"], r["length"], r["variant"], r["workload"]) not in covered]
    def table_rows(part: list[dict], by: tuple[str, ...]) -> str:
        return "".join(f"| {' | '.join(map(str, key))} | {100 * s['read']:.1f}% | {100 * s['match']:.1f}% | "
                       f"{100 * s['all']:.0f}% | {s['kl']:.2e} | {100 * s['passkey']:.0f}% | {100 * s['needles']:.0f}% |\n"
                       for key, s in summarise(part, by).items())
    summary = table_rows(rows, ("model", "variant"))
    tuned = table_rows(sorted(baseline + swept, key=lambda r: (r["model"], r["length"])), ("model", "length", "variant"))
    sweep = "" if not swept else f"""
## Selection settings (tuning sweep)

Settings around the main variants (`--set tuning`), per length the sweep ran, after the
baseline: the main runs' rows at that length, or where no main run covers it the sweep's own run
of the main variants (A=4, W=128, pages of 32, 16x oversampling, scope group, no dense layer).

| model | length | variant | KV read | match | all 100% | KL | pass keys | needles |
|---|---|---|---|---|---|---|---|---|
{tuned}"""
    Path(args.out).write_text(f"""# Long context: KV bytes read against fidelity (sparse vs full attention)

Generated by `python bench/frontier.py render {" ".join(args.results)}` from the runs below; do not
edit by hand. Plot: {Path(args.out).with_suffix(".png").name}.

{runs}
*KV read* is the fraction of full attention's cache bytes (bf16 keys and values) one decode step
reads: the attended keys and values (anchor 4, window 128 unless named, the chosen keys or pages), fp8 page
min/max summaries for page selection, every key for exact and certified selection (which score
them all), every key's int8 copy and fp32 scale for int8 selection (about a quarter of the
bytes) and for threshold selection the int16 page bins (written and read; runs before 2026-11-30's b0fd441 kept one per query head, since then one per KV head), the tail's fp32 key/value sums per page, and, in certified mode, a whole group's cache
for each head that fell back. *Attended* is the fraction of the context in the exact softmax
(measured per step and layer). *Token match* compares free-running greedy decodes; *agreement*,
*KL* and *dropped mass* (attention mass outside the exactly attended set) are teacher-forced on
full attention's tokens (minirt/equivalence.py). Certified mode keeps, per step and KV group, the
fewest keys that leave every head at most eps of its mass (no cap here: the group's oracle, drawn
as a star in the plot at the bytes of its attended keys alone); heads at or above eps
attend fully (*fallbacks*: layer-head-steps). *Certified int8* chooses from the int8 copies'
error bounds alone and decides fallbacks from the resulting bound, never from an exact score. Since 6e0da5d the
int8 copies are made with per-channel scales (powers of two set from the first prefill's keys,
`kernels.reference.channel_scales`), which tightens the bounds; rows marked *(per-key scales)* are
runs from before. Rows marked *(unshifted bins)* are int8-threshold runs from before each head's
bounds were shifted (`kernels.reference.cut_shift`).
Rows marked *(margin 1)* are int8 runs from before the choice counted the kept keys' mass as
exp(estimate - a quarter of its error bound) instead of its lower bound (`kernels.reference.KEPT_MARGIN`;
the bound a step certifies is still U over the attended keys' exact mass). Rows marked *(no offsets)* are int8 runs
from before the copies coded each key less its KV head's per-channel mid-range (`kernels.reference.key_offsets`),
which halves the error bounds on Qwen. Rows marked *(capped shift)* are int8-threshold runs from
before each head's shift was uncapped (it was at most 128 nats; in some of Qwen's layers the heads'
tops lie hundreds of nats apart), *(top shift)* from before the shift aligned the heads' cuts
estimated on 512 sampled candidates (`kernels.reference.sampled_cut`) instead of their tops over
the anchor and window. Its *KV read* is what the algorithm needs
(the GPU step's fallback launch reads the cache of the KV groups that fall back, and no other).
Retrieval: a pass key at depths 10, 30, 50, 70 and
90% of the prompt, and five needles at the same depths in one haystack, answered greedily.

## Summary per model and variant (all lengths)

*match*: mean token match over the continuations; *all 100%*: share of continuations matched
token for token; *KL*: mean of the mean KL.

| model | variant | KV read | match | all 100% | KL | pass keys | needles |
|---|---|---|---|---|---|---|---|
{summary}
{sweep}
## Certified modes against the oracle

Certified mode from exact scores attends, per step and KV group, the fewest keys that keep every
head within eps: the group's oracle. The int8 modes decide from bounds alone (no exact score), so
they attend more; *ratio* is their keys over the oracle's at the same eps. *ranked*: each head
ranks keys by their upper bound (`--selection int8`); *threshold*: keys kept by a per-head
threshold on binned bounds, no sort (`--selection int8-threshold --page-size 1`; bins per query
head before b0fd441, shared by the KV group since; *unshifted bins*: before each head's shift;
*margin 1*: the kept keys' mass counted at its lower bound, before `kernels.reference.KEPT_MARGIN`;
*no offsets*: before `kernels.reference.key_offsets`; *capped shift*: before the shift was uncapped;
*top shift*: before the shift came from each head's sampled cut).

| model | prompt | eps | int8 mode | oracle attended | int8 attended | ratio | KV read (exact scores) | KV read (int8) | int8 fallbacks |
|---|---|---|---|---|---|---|---|---|---|
{oracle}
## Continuations

| model | prompt | variant | KV read | attended | token match | first divergence | argmax agreement | max KL | mean KL | max dropped | mean dropped | fallbacks |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{table}
## Retrieval

| model | length | variant | pass keys found | needles found |
|---|---|---|---|---|
{ret}""")
    plot(rows, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and its plot", file=sys.stderr)


# tuning variants the long-context evaluation reports beside the main ones: the default and the
# fast fixed budget the README names
REPORTED = ("exact k=32 W=512 (default)", "whole pages k=1024 W=512")


def evaluation(results: list[dict]) -> tuple[str, list[dict]]:
    """The long-context evaluation (issue #11, item 5) as Markdown, per model, length and variant,
    with the variants that kept full attention's tokens and retrieval, and the rows it covers.
    Superseded rows (per-key int8 scales, unshifted threshold bins, margin 1, no offsets, capped shift) are left out: later
    runs replace them."""
    rows = [r for res in results for r in res["rows"]
            if (res["meta"].get("set", "main") == "main" or r["variant"] in REPORTED) and not superseded(r["variant"])]
    keys = sorted(dict.fromkeys((r["model"], r["nominal"], r["variant"]) for r in rows),
                  key=lambda k: (k[0], k[1], k[2] != "full"))
    full_found = {(r["model"], r["nominal"]): r for r in rows if r["variant"] == "full" and r["workload"] == "retrieval"}
    table, kept = "", {}
    for model, n, variant in keys:
        group = [r for r in rows if (r["model"], r["nominal"], r["variant"]) == (model, n, variant)]
        cont = [r for r in group if r["workload"] != "retrieval"]
        ret = [r for r in group if r["workload"] == "retrieval"]
        whole = sum(r["token_match"] == 1.0 for r in cont)
        div = [r["first_divergence"] for r in cont if r["first_divergence"] is not None]
        found = (f"{100 * fmean(r['passkey'] for r in ret):.0f}% | {100 * fmean(r['needles'] for r in ret):.0f}%"
                 if ret else "- | -")
        if cont:
            tokens = "/".join(str(r["length"]) for r in cont)
            table += (f"| {model} | {n // 1024}K | {tokens} | {variant} | {100 * fmean(r['read'] for r in cont):.1f}% | "
                      f"{100 * fmean(r['token_match'] for r in cont):.1f}% | {whole}/{len(cont)} | "
                      f"{min(div) if div else '-'} | {max(r['kl_max'] for r in cont):.2e} | "
                      f"{fmean(r['kl_mean'] for r in cont):.2e} | {found} | {sum(r['fallbacks'] for r in cont)} |\n")
        ref = full_found.get((model, n))
        held = whole == len(cont) and all(
            ref is not None and r["passkey"] >= ref["passkey"] and r["needles"] >= ref["needles"] for r in ret)
        entry = kept.setdefault((model, variant), {"held": True, "lengths": [], "read": [], "held_at": []})
        entry["held"] &= held
        if cont:
            entry["lengths"].append(n)
            entry["read"].append(fmean(r["read"] for r in cont))
            entry["held_at"].append(held)
    verdict = ""
    for model in dict.fromkeys(k[0] for k in keys):
        good = sorted(((v, e) for (m, v), e in kept.items() if m == model and v != "full" and e["held"] and e["lengths"]),
                      key=lambda ve: sum(ve[1]["read"]) / len(ve[1]["read"]))
        listed = "; ".join(f"{v} ({', '.join(f'{n // 1024}K: {100 * x:.0f}%' for n, x in zip(e['lengths'], e['read']))})"
                           for v, e in good)
        cheapest = []
        for n in sorted({n for m, n, _ in keys if m == model}):
            held_at_n = [(e["read"][i], v) for (m, v), e in kept.items() if m == model and v != "full"
                         for i, length in enumerate(e["lengths"]) if length == n and e["held_at"][i]]
            if held_at_n:
                cheapest.append(f"{n // 1024}K: {min(held_at_n)[1]} ({100 * min(held_at_n)[0]:.1f}%)")
        verdict += (f"- **{model}**, at every length it ran: {listed or 'none'}. The cheapest that kept them at each "
                    f"length alone: {'; '.join(cheapest) or 'none'}.\n")
    return f"""Per model, length and variant (continuations of long source and prose, then retrieval:
pass keys at depths 10-90% and five needles in one haystack). *Length*: what the run asked for,
retrieval's prompt length; *continuation tokens*: the code and prose prompts' lengths (a text
shorter than the length is taken whole). *KV read*: mean fraction of full
attention's KV bytes a decode step reads (FRONTIER.md says what it counts); *match*: mean greedy
token match; *matched*: continuations equal to full's token for token; *first divergence*: the
earliest step any continuation left full's tokens; KL: teacher-forced KL(full || sparse), the
largest and the mean; *fallbacks*: layer-head-steps sent to full attention.

| model | length | continuation tokens | variant | KV read | match | matched | first divergence | max KL | mean KL | pass keys | needles | fallbacks |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{table}
**Variants that kept full attention's tokens** (every continuation at 100% and pass keys and
needles at least full's), with their KV read per length:

{verdict}""", rows


def against_oracle(cont: list[dict]) -> list[tuple[dict, dict, str]]:
    """(int8 row, exact certified row, eps) for every continuation both ran at the same eps."""
    out = []
    for r in cont:
        if r["variant"].startswith(("certified int8 eps=", "certified int8 threshold eps=")):
            eps = r["variant"].split("eps=")[1].split()[0]
            same = [o for o in cont if o["variant"] == f"certified eps={eps}"
                    and (o["model"], o["workload"], o["length"]) == (r["model"], r["workload"], r["length"])]
            out += [(r, same[0], eps)] if same else []
    return out


def summarise(rows: list[dict], by: tuple[str, ...] = ("model", "variant")) -> dict[tuple, dict[str, float]]:
    """Means over the rows sharing the fields `by`."""
    out: dict[tuple, dict[str, float]] = {}
    for key in dict.fromkeys(tuple(r[f] for f in by) for r in rows):
        group = [r for r in rows if tuple(r[f] for f in by) == key]
        cont = [r for r in group if r["workload"] != "retrieval"]
        ret = [r for r in group if r["workload"] == "retrieval"]
        mean = (lambda xs: sum(xs) / len(xs) if xs else float("nan"))
        out[key] = {"read": mean([r["read"] for r in cont]) if cont else 1.0,
                       "match": mean([r["token_match"] for r in cont]) if cont else 1.0,
                       "all": mean([float(r["token_match"] == 1.0) for r in cont]) if cont else 1.0,
                       "kl": mean([r["kl_mean"] for r in cont]) if cont else 0.0,
                       "passkey": mean([r["passkey"] for r in ret]), "needles": mean([r["needles"] for r in ret])}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cont = [r for r in rows if r["workload"] != "retrieval"]
    prompts = list(dict.fromkeys((r["model"], r["length"]) for r in cont))
    families = {"exact / pages k=32": lambda v: v.endswith("k=32"),
                "whole pages": lambda v: v.startswith("whole") and "tail" not in v,
                "whole pages + tail": lambda v: v.startswith("whole") and "tail" in v,
                "certified": lambda v: v.startswith("certified") and "int8" not in v,
                "certified int8": lambda v: v.startswith("certified int8 eps") and not superseded(v),
                "certified int8 threshold": lambda v: v.startswith("certified int8 threshold") and not superseded(v)
                and "tail" not in v,
                "certified int8 threshold + tail": lambda v: v.startswith("certified int8 threshold") and "tail" in v
                and not superseded(v),
                "certified int8, earlier runs": lambda v: v.startswith("certified int8 eps") and superseded(v),
                "certified int8 threshold, earlier runs": lambda v: v.startswith("certified int8 threshold")
                and superseded(v)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for (model, n), color in zip(prompts, plt.cm.tab10.colors):
        for family, marker in zip(families, "sov^DPpxXh"):
            pts = [r for r in cont if (r["model"], r["length"]) == (model, n) and families[family](r["variant"])]
            if not pts:
                continue
            by_read = {}
            for r in pts:
                by_read.setdefault(r["variant"], []).append(r)
            xs = [sum(r["read"] for r in rs) / len(rs) for rs in by_read.values()]
            match = [100 * sum(r["token_match"] for r in rs) / len(rs) for rs in by_read.values()]
            kl = [sum(r["kl_mean"] for r in rs) / len(rs) for rs in by_read.values()]
            order = sorted(range(len(xs)), key=xs.__getitem__)
            label = f"{model} {n}: {family}"
            axes[0].plot([xs[i] for i in order], [match[i] for i in order], marker=marker, color=color, label=label,
                         linestyle="-" if len(xs) > 1 else "none")
            axes[1].plot([xs[i] for i in order], [kl[i] for i in order], marker=marker, color=color,
                         linestyle="-" if len(xs) > 1 else "none")
        # the oracle: reading only the keys certified mode (exact scores) attends at eps = 1e-2
        oracle = [r for r in cont if (r["model"], r["length"]) == (model, n) and r["variant"] == "certified eps=0.01"]
        if oracle:
            x = sum(r["attended"] for r in oracle) / len(oracle)
            axes[0].plot([x], [100], marker="*", markersize=12, color=color, linestyle="none",
                         label=f"{model} {n}: oracle at eps=1e-2")
    axes[0].set(xscale="log", xlabel="fraction of KV bytes read per decode step", ylabel="token match, code+prose mean (%)")
    axes[1].set(xscale="log", yscale="log", xlabel="fraction of KV bytes read per decode step",
                ylabel="mean KL(full || sparse)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0), ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8192])
    r.add_argument("--kinds", type=lambda s: s.split(","), default=["code", "prose"])
    r.add_argument("--steps", type=int, default=128)
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--dtype", default="fp32")
    r.add_argument("--json", default=None)
    r.add_argument("--only", default="", help="run only full and the variants whose name contains one of these (;-separated)")
    r.add_argument("--set", choices=["main", "tuning"], default="main", help="the main variants or the tuning sweep")
    g = sub.add_parser("render")
    g.add_argument("results", nargs="+")
    g.add_argument("--out", default="FRONTIER.md")
    args = ap.parse_args()
    if args.command == "run":
        args.json = args.json or f"results/frontier-{args.model}.json"
        run(args)
    else:
        render(args)


if __name__ == "__main__":
    main()
