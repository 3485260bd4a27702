"""Where certified int8 selection attends keys beyond the group oracle, on real weights: the error
bound against the estimate, per-key scales against per-channel scales without and with offsets
(reference.key_frame), and (for int8-threshold) bins shared by the KV group, with and without
each head's shift (reference.cut_shift of its cut on SHIFT_SAMPLES sampled candidates, or on
--sample others), against per-head bins, against shifts from each head's own cut (known only
after the step), against shifts carried over from the position before (its own cut or its
sampled one: what a step could reuse instead of estimating its own), against cuts that count
less than the anchor and window as kept (what a cheaper cut would score), and with finer bins
(BINS). CPU is enough.

    python bench/int8_gap.py --model smollm2-135m --kind prose --tokens 4096 [--positions 8] [--eps 1e-2 1e-3]

Queries are the rotated queries of the last --positions prompt tokens (captured in the prefill),
every layer; keys are the cache's. Each row: keys attended (anchor 4 + window 128 + the selection,
summed over KV groups, layers and positions) over the oracle's at the same eps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirt import LLM  # noqa: E402
from minirt.cache import DenseCache  # noqa: E402
from minirt.kernels import reference as R  # noqa: E402
from minirt.workloads import long_prompt  # noqa: E402

ANCHOR, WINDOW = 4, 128
WINDOW_STRIDE = 4  # a cut that scores every 4th window key (each standing for 4): a quarter of the window's scoring
BINS = ((0.25, 128), (0.25, 64))  # bins finer than reference.BIN_WIDTH's: as many nats, or half the span


def prompt_queries(llm: LLM, ids: list[int], positions: int) -> tuple[DenseCache, dict[int, torch.Tensor]]:
    """The prefilled cache and, per layer, the rotated queries [1, Hq, positions, D] of the last tokens."""
    queries: dict[int, torch.Tensor] = {}
    cache = llm.new_cache(len(ids) + 1)
    attend = cache.attend

    def capture(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        queries[layer] = q[:, :, -positions:].clone()
        return attend(layer, q, k, v)

    cache.attend = capture  # the prefill's queries, as the model hands them to the cache
    with torch.no_grad():
        llm.model(torch.tensor([ids]), cache, last_only=True)
    return cache, queries


def cuts(est: torch.Tensor, err: torch.Tensor, bounds: tuple[int, int, int], eps: float, samples: int,
         base: str = "anchor and window") -> torch.Tensor:
    """Each head's cut [B, Hkv, G] on `samples` evenly spaced candidates (reference.sampled_cut),
    the mass of the anchor and window counted as kept; or of the anchor alone, of neither, or of
    the anchor and every WINDOW_STRIDE-th window key, each standing for WINDOW_STRIDE."""
    n, lo, hi = bounds
    pos = torch.arange(est.shape[-1])
    window = (pos >= hi) & (pos < n - 1)
    always = {"anchor and window": ((pos < lo) | window).float(), "anchor": (pos < lo).float(),
              "neither": torch.zeros(len(pos)),
              "anchor and the window sampled": (pos < lo) + window * ((pos - hi) % WINDOW_STRIDE == 0) * WINDOW_STRIDE,
              }[base]
    with mock.patch.object(R, "SHIFT_SAMPLES", samples):
        return R.sampled_cut(est + err, est - R.KEPT_MARGIN * err, always, lo, hi, eps)


def own_cuts(est: torch.Tensor, err: torch.Tensor, bounds: tuple[int, int, int], eps: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """int8-threshold with single keys binned per query head instead of per KV group: each head's
    own threshold bin [B, Hkv, G] (reference.sampled_cut on every candidate, each standing for
    itself) and the keys kept per group [B, Hkv]."""
    n, lo, hi = bounds
    up = est + err
    pos = torch.arange(est.shape[-1])
    cand = (pos >= lo) & (pos < hi)
    cut = cuts(est, err, bounds, eps, hi - lo)
    top = R.to_bin(torch.where(cand, up, R.NEG_INF).amax(-1, keepdim=True))
    cut_bin = cut[..., None]
    keep = cand & ((R.to_bin(up) >= cut_bin) | (top - cut_bin + 1 >= R.PAGE_BINS))  # a head that cannot cut: every key
    return cut, keep.any(2).sum(-1).float()


def query_args(doc: str, positions: int) -> argparse.ArgumentParser:
    """The arguments every captured-query analysis takes (this one, tail_gap, page_skip)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kind", default="prose", choices=["code", "prose"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--positions", type=int, default=positions)
    return ap


def captured(args: argparse.Namespace) -> tuple[LLM, list[int], DenseCache, dict[int, torch.Tensor]]:
    """The model (CPU, fp32), the prompt, its prefilled cache and the captured queries; prints what they are."""
    llm = LLM.load(args.model, device="cpu", dtype="float32")
    ids = long_prompt(llm.tokenizer, args.kind, args.tokens)
    cache, queries = prompt_queries(llm, ids, args.positions)
    print(f"{args.model}, {args.kind}, {len(ids)} tokens, last {args.positions} positions, every layer\n")
    return llm, ids, cache, queries


def main() -> None:
    ap = query_args(__doc__, 8)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--sample", type=int, nargs="*", default=[],
                    help="rows with the cut sampled on this many candidates instead of SHIFT_SAMPLES")
    args = ap.parse_args()
    llm, ids, cache, queries = captured(args)
    print("| eps | selection | keys over the oracle |\n|---|---|---|")
    for eps in args.eps:
        totals: dict[str, float] = {}
        for layer, qs in queries.items():
            keys = cache.k[layer, :, :, :len(ids)]
            prefix = keys[:, :, :len(ids) - args.positions]
            frames = {"per-key scales": (torch.ones_like(prefix[:, :, 0]), torch.zeros_like(prefix[:, :, 0])),
                      "per-channel scales, no offsets": (R.channel_scales(prefix, llm.cfg.rotary_dim),
                                                         torch.zeros_like(prefix[:, :, 0])),
                      "per-channel scales and offsets": R.key_frame(prefix, llm.cfg.rotary_dim)}  # the cache's
            before: dict[str, torch.Tensor] = {}  # the position before's shifts (the first reuses its own sampled one)
            for t in range(args.positions):
                n = len(ids) - args.positions + t + 1
                k, q = keys[:, :, :n], qs[:, :, t]
                b = R.sparse_bounds(n, ANCHOR, WINDOW)
                bounds = R.step_bounds(*b, "cpu")
                always = n - (b[2] - b[1])  # anchor and window
                scores = R.group_scores(q, k)
                codes = {name: R.quantize_keys(k, chan[:, :, None], offset[:, :, None])
                         for name, (chan, offset) in frames.items()}
                shadows = {name: R.shadow_scores(q, *codes[name], n, *frame) for name, frame in frames.items()}

                def chosen(idx: torch.Tensor) -> float:
                    return float((idx >= 0).sum()) + always * k.shape[1]

                def threshold(frame: str, shift=R.cut_shift, samples=R.SHIFT_SAMPLES, bins=(R.BIN_WIDTH, R.PAGE_BINS)
                              ) -> float:
                    with mock.patch.object(R, "cut_shift", shift), mock.patch.object(R, "SHIFT_SAMPLES", samples), \
                            mock.patch.object(R, "BIN_WIDTH", bins[0]), mock.patch.object(R, "PAGE_BINS", bins[1]):
                        page_bin, th, _ = R.page_threshold(q, k, *(x.clone() for x in codes[frame]), *frames[frame],
                                                           bounds, eps, 1)
                    return float(R.kept_pages(page_bin, th).sum()) + always * k.shape[1]

                best = "per-channel scales and offsets"
                est, err = shadows[best]
                cut, head_keys = own_cuts(est, err, b, eps)
                own_shift = R.cut_shift(cut)
                sampled_shift = R.cut_shift(cuts(est, err, b, eps, R.SHIFT_SAMPLES))
                before = before or {"own": sampled_shift, "sampled": sampled_shift}
                less_kept = {label: R.cut_shift(cuts(est, err, b, eps, R.SHIFT_SAMPLES, base))
                             for base, label in (("anchor", "only the anchor"), ("neither", "neither anchor nor window"),
                                                 ("anchor and the window sampled",
                                                  f"the anchor and every {WINDOW_STRIDE}th window key"))}
                rows = {
                    "oracle (exact scores)": chosen(R.certified_select(scores, scores.logsumexp(-1), bounds, eps, n)),
                    **{f"ranked, {name}": chosen(R.bounded_select(*shadows[name], bounds, eps, n)) for name in frames},
                    f"ranked, {best}, the true int8 error as its bound": chosen(
                        R.bounded_select(est, (est - scores).abs() * 1.0001, bounds, eps, n)),
                    **{f"threshold, {name}": threshold(name) for name in frames},
                    f"threshold, {best}, no shift": threshold(best, torch.zeros_like),
                    f"threshold, {best}, bins per query head": float(head_keys.sum()) + always * k.shape[1],
                    f"threshold, {best}, each head shifted to its own cut (known only after the step)": threshold(
                        best, lambda _: own_shift),
                    **{f"threshold, {best}, the cut sampled on {s} candidates": threshold(best, samples=s)
                       for s in args.sample},
                    **{f"threshold, {best}, {count} bins of {width:g} nats": threshold(best, bins=(width, count))
                       for width, count in BINS},
                    **{f"threshold, {best}, the cut counting {label} as kept": threshold(best, lambda _, x=x: x)
                       for label, x in less_kept.items()},
                    f"threshold, {best}, each head shifted to its own cut at the position before": threshold(
                        best, lambda _: before["own"]),
                    f"threshold, {best}, each head shifted to its sampled cut at the position before": threshold(
                        best, lambda _: before["sampled"]),
                }
                before = {"own": own_shift, "sampled": sampled_shift}
                for name, count in rows.items():
                    totals[name] = totals.get(name, 0.0) + count
        oracle = totals["oracle (exact scores)"]
        for name, count in totals.items():
            print(f"| {eps:g} | {name} | {count / oracle:.3f} |")


if __name__ == "__main__":
    main()
