"""How much a tail estimate could recover of what certified int8-threshold leaves out, on real
weights: each head's attention output against full attention's, dropping the rest against
estimating it. CPU is enough.

    python bench/tail_gap.py --model smollm2-135m --kind prose --tokens 4096 [--positions 8]

Queries are the rotated queries of the last --positions prompt tokens, every layer (as
bench/int8_gap.py). The selection is int8-threshold with single keys (reference twin). The tail
(candidates no head of the group kept) enters the softmax as one pseudo-key per query head:
its mass T and its value. Rows pair an estimate of T (exact; or sqrt(U * L), U and L the sums of
exp(u) and exp(l) over the tail, which pass 1's histogram already holds) with an estimate of its
value (exact; or the unweighted mean of the tail's values, which a running sum of the candidates'
values minus the attended ones' gives without reading the tail). Error: ||out - full|| / ||full||
per head, median and p90 over heads, positions and layers.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.int8_gap import captured, query_args  # noqa: E402
from minirt.kernels import reference as R  # noqa: E402

ANCHOR, WINDOW = 4, 128


def tail_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chan: torch.Tensor, offset: torch.Tensor,
                eps: float) -> dict[str, torch.Tensor]:
    """Per estimator, the relative output error of every query head [B*Hq] at one position."""
    B, Hq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bounds = R.step_bounds(*R.sparse_bounds(n, ANCHOR, WINDOW), "cpu")
    kq, ks = R.quantize_keys(k, chan[:, :, None], offset[:, :, None])
    page_bin, th, _ = R.page_threshold(q, k, kq.clone(), ks.clone(), chan, offset, bounds, eps, 1)
    kept = R.kept_positions(page_bin, th, 1, n)  # [B, Hkv, n]
    cand = R.candidates(kept, bounds)
    tail = cand & ~kept
    s = R.group_scores(q, k)  # [B, Hkv, G, n]
    est, err = R.shadow_scores(q, kq, ks, n, chan, offset)
    attended = ~tail[:, :, None].expand_as(s)
    lse_s = torch.logsumexp(s.masked_fill(~attended, R.NEG_INF), -1)
    o_s = torch.softmax(s.masked_fill(~attended, R.NEG_INF), -1) @ v
    o_full = torch.softmax(s, -1) @ v
    t = tail[:, :, None].expand_as(s)
    log_t = torch.logsumexp(s.masked_fill(~t, R.NEG_INF), -1)
    log_u = torch.logsumexp((est + err).masked_fill(~t, R.NEG_INF), -1)
    log_l = torch.logsumexp((est - err).masked_fill(~t, R.NEG_INF), -1)
    v_tail = torch.softmax(s.masked_fill(~t, R.NEG_INF), -1).nan_to_num() @ v
    count = tail.sum(-1, keepdim=True).clamp(min=1)
    v_mean = ((tail[..., None] * v).sum(2) / count)[:, :, None]  # [B, Hkv, 1, D]

    m_tail = est.masked_fill(~t, R.NEG_INF)  # int8 estimates of the tail's logits

    def pages(P: int, whole_mean: bool) -> torch.Tensor:
        """Page-mean values (the page's every value, or only its tail's) weighted by the int8
        estimate of each page's tail mass."""
        pad = -n % P
        m = torch.nn.functional.pad(m_tail, (0, pad), value=R.NEG_INF).unflatten(-1, (-1, P))
        w = torch.softmax(m.logsumexp(-1), -1).nan_to_num()  # [B, Hkv, G, pages]
        vv = torch.nn.functional.pad(v, (0, 0, 0, pad)).unflatten(2, (-1, P))  # [B, Hkv, pages, P, D]
        keep = torch.nn.functional.pad(tail if not whole_mean else cand, (0, pad)).unflatten(-1, (-1, P))
        vbar = (vv * keep[..., None]).sum(3) / keep.sum(-1, keepdim=True).clamp(min=1)
        return w @ vbar

    def mix(log_mass: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(log_mass - lse_s)[..., None].nan_to_num()
        return (1 - w) * o_s + w * value

    outs = {
        "drop (renormalise over the attended set)": o_s,
        "T exact, value exact (= full)": mix(log_t, v_tail),
        "T exact, unweighted mean value": mix(log_t, v_mean),
        "T = sqrt(U * L), exact value": mix((log_u + log_l) / 2, v_tail),
        "T = sqrt(U * L), unweighted mean value": mix((log_u + log_l) / 2, v_mean),
        "T = L, unweighted mean value": mix(log_l, v_mean),
        **{f"T = sqrt(U * L), page means of {P} (all candidates), int8 page weights": mix((log_u + log_l) / 2, pages(P, True))
           for P in (8, 32)},
        **{f"T = sqrt(U * L), page means of {P} (tail only), int8 page weights": mix((log_u + log_l) / 2, pages(P, False))
           for P in (8, 32)},
        "T = sqrt(U * L), int8 weights per key (pages of 1)": mix((log_u + log_l) / 2, pages(1, False)),
    }
    norm = o_full.norm(dim=-1).clamp(min=1e-30)
    return {name: ((o - o_full).norm(dim=-1) / norm).flatten() for name, o in outs.items()} | {
        "_dropped": (1 - torch.exp(lse_s - torch.logsumexp(s, -1))).flatten()}


def main() -> None:
    ap = query_args(__doc__, 8)
    ap.add_argument("--eps", default="0.3,0.1,0.03,0.01")
    args = ap.parse_args()
    llm, ids, cache, queries = captured(args)
    print("| eps | estimate | median error | p90 error |\n|---|---|---|---|")
    for eps in map(float, args.eps.split(",")):
        errs: dict[str, list[torch.Tensor]] = {}
        for layer, qs in queries.items():
            keys, values = cache.k[layer, :, :, :len(ids)], cache.v[layer, :, :, :len(ids)]
            frame = R.key_frame(keys[:, :, :len(ids) - args.positions], llm.cfg.rotary_dim)
            for t in range(args.positions):
                n = len(ids) - args.positions + t + 1
                for name, e in tail_errors(qs[:, :, t], keys[:, :, :n], values[:, :, :n], *frame, eps).items():
                    errs.setdefault(name, []).append(e)
        for name, parts in errs.items():
            e = torch.cat(parts)
            label = "dropped mass (exact)" if name == "_dropped" else name
            print(f"| {eps:g} | {label} | {e.median():.2e} | {e.quantile(0.9):.2e} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
