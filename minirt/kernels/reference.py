"""Plain-PyTorch references for every attention kernel; the CPU path and the oracle for tests.

Shapes: B batch, Hq query heads, Hkv key/value heads, G = Hq / Hkv (GQA group), D head dim,
n cached positions. Queries of one decode step are [B, Hq, D]; cached keys/values [B, Hkv, n, D].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last T positions (q [B, Hq, T, D]) over all n cached ones (SDPA)."""
    T, n = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if T == n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(n - T, n, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def group_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled logits q·k for one decode step: q [B, Hq, D], k [B, Hkv, n, D] -> [B, Hkv, G, n] in fp32."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D).float()
    return torch.einsum("bhgd,bhnd->bhgn", qg, k.float()) / math.sqrt(D)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode attention. Returns out [B, Hq, D] and the log-sum-exp of the logits [B, Hq]."""
    B, Hq, D = q.shape
    s = group_scores(q, k)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhgn,bhnd->bhgd", torch.exp(s - lse[..., None]), v.float())
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


def sparse_attention(q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, ring_valid: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of a contiguous window and gathered positions.

    ring_k/ring_v [B, Hkv, W, D] hold the local window (ring_valid [W] marks the slots in use);
    idx lists positions of k/v [B, Hkv, n, D] to gather (anchor + top-k), -1 = unused, either one
    list per KV group [B, Hkv, K] or one per query head [B, Hkv, G, K]. The caller guarantees that
    window and gathered positions are disjoint. Returns out [B, Hq, D] and lse [B, Hq].
    """
    B, Hq, D = q.shape
    Hkv, W = k.shape[1], ring_k.shape[2]
    G = Hq // Hkv
    if idx.dim() == 3:
        idx = idx[:, :, None]  # one list shared by the group's heads
    Gi, K = idx.shape[2], idx.shape[3]
    safe = idx.clamp(min=0)[..., None].expand(B, Hkv, Gi, K, D)
    gk = torch.gather(k[:, :, None].expand(B, Hkv, Gi, -1, D), 3, safe)
    gv = torch.gather(v[:, :, None].expand(B, Hkv, Gi, -1, D), 3, safe)
    keys = torch.cat((ring_k[:, :, None].expand(B, Hkv, Gi, W, D), gk), dim=3).expand(B, Hkv, G, W + K, D)
    values = torch.cat((ring_v[:, :, None].expand(B, Hkv, Gi, W, D), gv), dim=3).expand(B, Hkv, G, W + K, D)
    valid = torch.cat((ring_valid.expand(B, Hkv, Gi, W), idx >= 0), dim=3)
    qg = q.view(B, Hkv, G, D).float()
    s = torch.einsum("bhgd,bhgnd->bhgn", qg, keys.float()) / math.sqrt(D)
    s = s.masked_fill(~valid, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhgn,bhgnd->bhgd", torch.exp(s - lse[..., None]), values.float())
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


def topk_positions(scores: torch.Tensor, lo: int, hi: int, k: int) -> torch.Tensor:
    """The k best positions in [lo, hi) of scores [..., n], padded with -1 when fewer exist."""
    shape = scores.shape[:-1]
    if k <= 0 or hi <= lo:
        return torch.full((*shape, max(k, 0)), -1, dtype=torch.long, device=scores.device)
    take = min(k, hi - lo)
    idx = scores[..., lo:hi].topk(take, dim=-1, sorted=False).indices + lo
    if take < k:
        idx = torch.cat((idx, idx.new_full((*shape, k - take), -1)), dim=-1)
    return idx


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of q·k over each page from its elementwise key min/max (Quest).

    q [B, Hq, D], kmin/kmax [B, Hkv, P, D] -> [B, Hkv, P]: the max over the group's query heads,
    so a page is kept if any head of the group might want it.
    """
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, 1, D).float()
    bound = torch.maximum(qg * kmin[:, :, None].float(), qg * kmax[:, :, None].float()).sum(-1)
    return bound.amax(dim=2) / math.sqrt(D)


def page_topk(q: torch.Tensor, k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lo: int, hi: int,
              k_top: int, page_size: int, oversample: float, scope: str) -> torch.Tensor:
    """Approximate top-k in [lo, hi) without scoring every key.

    Rank pages by their upper bound (page_bounds), score exactly only the tokens of the best
    ceil(k_top * oversample / page_size) pages, and keep the top k_top of those. k [B, Hkv, cap, D]
    is the whole key store; kmin/kmax [B, Hkv, pages, D] its page summaries.
    Returns [B, Hkv, k_top] (scope "group") or [B, Hkv, G, k_top] (scope "head"), -1 = unused.
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    lead = (B, Hkv) if scope == "group" else (B, Hkv, G)
    if k_top <= 0 or hi <= lo:
        return torch.full((*lead, max(k_top, 0)), -1, dtype=torch.long, device=q.device)
    P = page_size
    p_lo, p_hi = lo // P, (hi - 1) // P + 1
    n_sel = min(p_hi - p_lo, math.ceil(k_top * oversample / P))
    bounds = page_bounds(q, kmin[:, :, p_lo:p_hi], kmax[:, :, p_lo:p_hi])
    pages = bounds.topk(n_sel, dim=-1, sorted=False).indices + p_lo  # [B, Hkv, S]
    pos = (pages[..., None] * P + torch.arange(P, device=q.device)).flatten(-2)  # [B, Hkv, S * P]
    valid = (pos >= lo) & (pos < hi)
    pos = pos.clamp(lo, hi - 1)
    keys = torch.gather(k, 2, pos[..., None].expand(-1, -1, -1, D))
    s = group_scores(q, keys).masked_fill(~valid[:, :, None], NEG_INF)  # [B, Hkv, G, S * P]
    if scope == "group":
        s = s.amax(dim=2)
    else:
        pos = pos[:, :, None].expand(-1, -1, G, -1)
    take = min(k_top, s.shape[-1])
    best, j = s.topk(take, dim=-1, sorted=False)
    chosen = torch.gather(pos, -1, j).masked_fill(best == NEG_INF, -1)
    if take < k_top:
        chosen = torch.cat((chosen, chosen.new_full((*lead, k_top - take), -1)), dim=-1)
    return chosen
