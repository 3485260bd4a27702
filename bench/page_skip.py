"""Could a page-level filter spare certified mode its scan of every key's int8 copy? On real
weights: the share of candidate pages whose score bound is so low that skipping them all (their
bound's mass counted in U) would cost at most half of eps's budget. CPU is enough.

    python bench/page_skip.py --model smollm2-135m --kind prose --tokens 4096 [--positions 4]

Queries are the rotated queries of the last --positions prompt tokens, every layer (as
bench/int8_gap.py); Z is the exact softmax denominator over anchor 4 and window 128 (what a
certified step attends in any case). Per KV group, pages are skipped lowest bound first while
every query head's skipped mass, page size x exp(bound), stays within 0.5 * eps / (1 - eps) * Z.
Bounds: Quest's (per-channel min/max, q+ kmax + q- kmin), a ball (q.c + |q| r, c the page's mean
key, r its largest distance from it), the smaller of the two, and each page's true best logit,
the tightest bound any page summary could give.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.int8_gap import captured, query_args  # noqa: E402
from minirt.kernels import reference as R  # noqa: E402

ANCHOR, WINDOW = 4, 128


def page_bounds(qg: torch.Tensor, k: torch.Tensor, scores: torch.Tensor, P: int, first: int, last: int) -> dict[str, torch.Tensor]:
    """Each bound of the whole pages [first, last) (pages of P keys), [B, Hkv, G, pages]."""
    D = k.shape[-1]
    pages = k[:, :, first * P:last * P].unflatten(2, (-1, P))  # [B, Hkv, pages, P, D]
    kmin, kmax = pages.amin(3), pages.amax(3)
    quest = (qg.clamp(min=0) @ kmax.transpose(-1, -2) + qg.clamp(max=0) @ kmin.transpose(-1, -2)) / math.sqrt(D)
    centre = pages.mean(3)
    radius = (pages - centre[:, :, :, None]).norm(dim=-1).amax(-1)
    ball = (qg @ centre.transpose(-1, -2) + qg.norm(dim=-1, keepdim=True) * radius[:, :, None]) / math.sqrt(D)
    true = scores[..., first * P:last * P].unflatten(-1, (-1, P)).amax(-1)
    return {"Quest (min/max)": quest, "ball (mean key, radius)": ball, "min(Quest, ball)": torch.minimum(quest, ball),
            "true page max (no summary does better)": true}


def skippable(bound: torch.Tensor, log_budget: torch.Tensor, P: int) -> torch.Tensor:
    """Pages [B, Hkv] a KV group can skip, lowest first, keeping each head's skipped mass within budget."""
    share = bound + math.log(P) - log_budget[..., None]  # log of each page's share of its head's budget
    order = share.amax(2).argsort(-1)  # by the group's worst head
    cum = torch.exp(share.gather(-1, order[:, :, None].expand_as(share))).cumsum(-1)
    return (cum <= 1).all(2).sum(-1)


def main() -> None:
    args = query_args(__doc__, 4).parse_args()
    llm, ids, cache, queries = captured(args)
    totals: dict[tuple[int, float, str], list[float]] = {}
    for layer, qs in queries.items():
        keys = cache.k[layer, :, :, :len(ids)]
        for t in range(args.positions):
            n = len(ids) - args.positions + t + 1
            k, q = keys[:, :, :n], qs[:, :, t]
            B, Hq, D = q.shape
            qg = q.view(B, k.shape[1], Hq // k.shape[1], D)
            scores = R.group_scores(q, k)
            _, lo, hi = R.sparse_bounds(n, ANCHOR, WINDOW)
            log_z = torch.cat((scores[..., :lo], scores[..., hi:]), -1).logsumexp(-1)
            for P in (16, 32, 64):
                first, last = -(-lo // P), hi // P  # the whole pages among the candidates
                for name, bound in page_bounds(qg, k, scores, P, first, last).items():
                    for eps in (1e-2, 1e-3):
                        count = totals.setdefault((P, eps, name), [0.0, 0.0])
                        count[0] += float(skippable(bound, math.log(0.5 * R.rest_ratio(eps)) + log_z, P).sum())
                        count[1] += B * k.shape[1] * (last - first)
    print("| page size | eps | page bound | pages skippable |\n|---|---|---|---|")
    for (P, eps, name), (skipped, pages) in totals.items():
        print(f"| {P} | {eps:g} | {name} | {skipped / pages:.1%} |")


if __name__ == "__main__":
    main()
