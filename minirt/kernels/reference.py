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
    Hkv = k.shape[1]
    G = Hq // Hkv
    if idx.dim() == 3:
        idx = idx[:, :, None]  # one list shared by the group's heads
    Gi = idx.shape[2]
    safe = idx.clamp(min=0)
    keys = torch.cat((ring_k[:, :, None].expand(-1, -1, Gi, -1, -1), _gather(k, safe)), dim=3)
    values = torch.cat((ring_v[:, :, None].expand(-1, -1, Gi, -1, -1), _gather(v, safe)), dim=3)
    valid = torch.cat((ring_valid.expand(B, Hkv, Gi, -1), idx >= 0), dim=3)  # [B, Hkv, Gi, W + K]
    qg = q.view(B, Hkv, G, D).float()
    if Gi == 1:  # shared list: one [G, D] x [D, N] product per KV head
        s = qg @ keys[:, :, 0].float().transpose(-1, -2)
        s = s.masked_fill(~valid, NEG_INF) / math.sqrt(D)
        lse = torch.logsumexp(s, dim=-1)
        out = torch.exp(s - lse[..., None]) @ values[:, :, 0].float()
    else:  # per-head lists
        s = (qg[..., None, :] @ keys.float().transpose(-1, -2))[..., 0, :]
        s = s.masked_fill(~valid, NEG_INF) / math.sqrt(D)
        lse = torch.logsumexp(s, dim=-1)
        out = (torch.exp(s - lse[..., None])[..., None, :] @ values.float())[..., 0, :]
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, n, D] at positions idx [B, Hkv, Gi, K] -> [B, Hkv, Gi, K, D]."""
    B, Hkv, Gi, K = idx.shape
    flat = torch.gather(x, 2, idx.reshape(B, Hkv, Gi * K, 1).expand(-1, -1, -1, x.shape[-1]))
    return flat.view(B, Hkv, Gi, K, -1)


def topk_positions(scores: torch.Tensor, lo: int, hi: int, k: int) -> torch.Tensor:
    """The min(k, hi - lo) best positions in [lo, hi) of scores [..., n]."""
    take = max(0, min(k, hi - lo))
    return scores[..., lo:max(lo, hi)].topk(take, dim=-1, sorted=False).indices + lo


def group_max_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """max over each KV group's query heads of q·k / sqrt(D): [B, Hkv, n] (fp32)."""
    return group_scores(q, k).amax(dim=2)


def gathered_group_max_scores(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """group_max_scores at positions idx [B, Hkv, m] (all valid): [B, Hkv, m]."""
    return group_max_scores(q, torch.gather(k, 2, idx[..., None].expand(-1, -1, -1, k.shape[-1])))


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of q·k / sqrt(D) over each page from its elementwise key min/max (Quest).

    max(q_d kmin_d, q_d kmax_d) = q+_d kmax_d + q-_d kmin_d, so the bound is two products.
    q [B, Hq, D], kmin/kmax [B, Hkv, P, D] -> [B, Hkv, P], the max over the group's query heads,
    so a page is kept if any head of the group might want it.
    """
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D).float()
    bound = qg.clamp(min=0) @ kmax.float().transpose(-1, -2) + qg.clamp(max=0) @ kmin.float().transpose(-1, -2)
    return bound.amax(dim=2) / math.sqrt(D)


def page_topk(q: torch.Tensor, k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lo: int, hi: int,
              k_top: int, page_size: int, oversample: float, scope: str,
              bounds_fn=page_bounds, scores_at_fn=gathered_group_max_scores) -> torch.Tensor:
    """Approximate top-k in [lo, hi) without scoring every key.

    Rank pages by their upper bound (bounds_fn), score exactly only the tokens of the best
    ceil(k_top * oversample / page_size) pages, and keep the top k_top of those. k [B, Hkv, cap, D]
    is the whole key store; kmin/kmax [B, Hkv, pages, D] its page summaries. scores_at_fn scores
    gathered positions for scope "group" (the Triton path passes its kernels for both).
    Returns [B, Hkv, <=k_top] (scope "group") or [B, Hkv, G, <=k_top] (scope "head"), -1 = unused.
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    lead = (B, Hkv) if scope == "group" else (B, Hkv, G)
    if k_top <= 0 or hi <= lo:
        return torch.empty((*lead, 0), dtype=torch.long, device=q.device)
    P = page_size
    p_lo, p_hi = lo // P, (hi - 1) // P + 1
    n_sel = min(p_hi - p_lo, math.ceil(k_top * oversample / P))
    bounds = bounds_fn(q, kmin[:, :, p_lo:p_hi], kmax[:, :, p_lo:p_hi])
    pages = bounds.topk(n_sel, dim=-1, sorted=False).indices + p_lo  # [B, Hkv, S]
    pos = (pages[..., None] * P + torch.arange(P, device=q.device)).flatten(-2)  # [B, Hkv, S * P]
    valid = (pos >= lo) & (pos < hi)
    pos = pos.clamp(lo, hi - 1)
    if scope == "group":
        s = scores_at_fn(q, k, pos).masked_fill(~valid, NEG_INF)
    else:
        keys = torch.gather(k, 2, pos[..., None].expand(-1, -1, -1, D))
        s = group_scores(q, keys).masked_fill(~valid[:, :, None], NEG_INF)  # [B, Hkv, G, S * P]
        pos = pos[:, :, None].expand(-1, -1, G, -1)
    best, j = s.topk(min(k_top, s.shape[-1]), dim=-1, sorted=False)
    return torch.gather(pos, -1, j).masked_fill(best == NEG_INF, -1)
