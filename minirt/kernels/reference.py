"""Plain-PyTorch references for every attention kernel; the CPU path and the oracle for tests.

Shapes: B batch, Hq query heads, Hkv key/value heads, G = Hq / Hkv (GQA group), D head dim,
n cached positions. Queries of one decode step are [B, Hq, D]; cached keys/values
[B, Hkv, capacity, D], of which the first n are live.

A decode step's lengths travel as `bounds`, an int32 tensor (n, lo, hi) on the device: n cached
positions (the new one included), and [lo, hi) the positions top-k may choose from (lo = the
anchor size, hi = where the window starts). Kernels read them from memory, so one compiled
kernel and one launch grid serve every length (and a CUDA graph can replay the step).
"""
from __future__ import annotations

import math
import sys
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def step_bounds(n: int, lo: int, hi: int, device: torch.device | str) -> torch.Tensor:
    return torch.tensor([n, lo, hi], dtype=torch.int32, device=device)


def sparse_bounds(n: int, anchor: int, window: int) -> tuple[int, int, int]:
    """(n, lo, hi) for n cached positions: top-k candidates are neither anchor nor window."""
    a = min(anchor, n)
    return n, a, max(a, n - window)


def next_step(position: torch.Tensor, bounds: torch.Tensor, anchor: int, window: int) -> None:
    """The end of a decode step, in place: position [1] moves on by one and bounds [3] become the
    next step's (n, lo, hi) = sparse_bounds(position + 1, anchor, window)."""
    position.add_(1)
    n = position + 1
    lo = n.clamp(max=anchor)
    bounds.copy_(torch.cat((n, lo, torch.maximum(lo, n - window))))


def as_bounds(bounds, n_default: int | None, device, anchor: int = 0, window: int = 0) -> torch.Tensor:
    """bounds as given (a tensor), from an int n (with anchor/window), or all n_default positions."""
    if isinstance(bounds, torch.Tensor):
        return bounds
    n = n_default if bounds is None else int(bounds)
    return step_bounds(*sparse_bounds(n, anchor, window), device) if window else step_bounds(n, 0, n, device)


def _ints(bounds: torch.Tensor) -> tuple[int, int, int]:
    n, lo, hi = bounds.tolist()
    return n, lo, hi


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32 and cast back before the weight, as the reference implementation does."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream x + delta (rounded to x's dtype) and its RMSNorm."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rope_qkv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              n_rot_heads: int, head_dim: int) -> None:
    """Rotate in place the first rot = cos.shape[-1] dims of the first n_rot_heads heads (q, then
    k) of the fused projection qkv [B, T, *], at positions [T] of the tables cos/sin [positions,
    rot] (rotate-half layout, as transformers)."""
    B, T, _ = qkv.shape
    x = qkv[..., : n_rot_heads * head_dim].view(B, T, n_rot_heads, head_dim)
    c, s = cos[positions][None, :, None], sin[positions][None, :, None]
    rot = c.shape[-1]
    xr = x[..., :rot]
    rotated = torch.cat((-xr[..., rot // 2:], xr[..., : rot // 2]), dim=-1)
    x[..., :rot] = xr * c + rotated * s


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused gate|up projection [..., 2F] -> [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


class AppendTarget(NamedTuple):
    """Where a decode step's new key and value go (a cache's append_target): the stores append_kv
    writes, the ring and page summaries None where the cache keeps none, the step's bounds (the new
    position is n - 1)."""
    k: torch.Tensor
    v: torch.Tensor
    ring_k: torch.Tensor | None
    ring_v: torch.Tensor | None
    kmin: torch.Tensor | None
    kmax: torch.Tensor | None
    bounds: torch.Tensor
    page_size: int


def kv_of_qkv(qkv: torch.Tensor, target: AppendTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """The new key and value [B, Hkv, 1, D] of a fused q|k|v row [B, 1, N] (k and v are its last columns)."""
    B, Hkv, _, D = target.k.shape
    kv = qkv[:, 0, qkv.shape[-1] - 2 * Hkv * D:].view(B, 2, Hkv, 1, D)
    return kv[:, 0], kv[:, 1]


def append_new(target: AppendTarget, k: torch.Tensor, v: torch.Tensor, ops: ModuleType | None = None) -> None:
    """Store a decode step's new key and value [B, Hkv, 1, D] at target with ops' append_kv (an
    attention implementation's; this module's by default)."""
    t = target
    (ops or sys.modules[__name__]).append_kv(t.k, t.v, t.ring_k, t.ring_v, t.kmin, t.kmax, k, v, t.bounds, t.page_size)


def append_qkv(qkv: torch.Tensor, target: AppendTarget, ops: ModuleType | None = None) -> None:
    """append_new of the new key and value of a decode step's q|k|v row."""
    append_new(target, *kv_of_qkv(qkv, target), ops)


def norm_linear(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None, rope: tuple | None = None,
                append: AppendTarget | None = None, ops: ModuleType | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, the projection of its RMSNorm), the projection rotated by RoPE if rope =
    (cos, sin, positions, n_rot_heads, head_dim) is given (see rope_qkv_); no add if delta is None.
    append: a decode step's q|k|v projection also stores its key and value there (append_qkv).
    ops: whose rms_norm, add_rms_norm, rope_qkv_ and append_qkv run (these, by default)."""
    ops = ops or sys.modules[__name__]
    if delta is None:
        h = ops.rms_norm(x, norm_weight, eps)
    else:
        x, h = ops.add_rms_norm(x, delta, norm_weight, eps)
    y = F.linear(h, weight, bias)
    if rope is not None:
        ops.rope_qkv_(y, *rope)
    if append is not None:
        ops.append_qkv(y, append)
    return x, y


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The projection of silu(gate) * up (the gated MLP's down projection)."""
    return F.linear(silu_mul(gate_up), weight, bias)


def greedy_choice(logits: torch.Tensor, logits_out: torch.Tensor, next_token: torch.Tensor, token: torch.Tensor) -> None:
    """Greedy sampling's bookkeeping, in place: logits [B, V] copied into logits_out (fp32), their
    argmax (the first of equal maxima) into next_token [B] and token [B, 1] (the next step's input)."""
    logits_out.copy_(logits)
    next_token.copy_(logits.argmax(dim=-1))
    token.copy_(next_token[:, None])


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last T positions (q [B, Hq, T, D]) over all n cached ones (SDPA)."""
    from torch.nn.attention.bias import causal_lower_right

    T, n = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # a later chunk of a prompt: query i sees keys up to n - T + i (causal, aligned bottom-right);
    # the fused kernels take that mask only with as many key heads as query heads
    if gqa:
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, n))


def group_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled logits q·k for one decode step: q [B, Hq, D], k [B, Hkv, n, D] -> [B, Hkv, G, n] in fp32."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D).float()
    return torch.einsum("bhgd,bhnd->bhgn", qg, k.float()) / math.sqrt(D)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode attention over the first n positions (n from bounds; all if None). Returns out
    [B, Hq, D] and the log-sum-exp of the logits [B, Hq]."""
    B, Hq, D = q.shape
    n = _ints(as_bounds(bounds, k.shape[2], "cpu"))[0]
    k, v = k[:, :, :n], v[:, :, :n]
    s = group_scores(q, k)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhgn,bhnd->bhgd", torch.exp(s - lse[..., None]), v.float())
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


def fall_back(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds, out: torch.Tensor, dropped: torch.Tensor,
              eps: float, falls: torch.Tensor) -> torch.Tensor:
    """Certified mode's fallback: full attention (decode_attention) in place of out's rows [B, Hq, D]
    for the heads whose dropped mass, or its bound, [B, Hq] is not below eps (NaN included; so eps
    = 0 is full attention, exactly); their number is added to falls (an int64 scalar). Returns out."""
    fall = ~(dropped < eps)
    falls += fall.sum()
    return out.copy_(torch.where(fall[..., None], decode_attention(q, k, v, bounds)[0], out))


def ring_positions(n: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Position held by each ring slot once n positions are stored (slot = position % window); -1 if empty."""
    slots = torch.arange(window, device=device)
    pos = (n - 1) - (n - 1 - slots) % window  # latest position p <= n - 1 with p % window == slot
    return torch.where(pos >= max(0, n - window), pos, -1)


def sparse_attention(q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     idx: torch.Tensor, bounds, anchor: int, tail=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over window ∪ anchor ∪ gathered positions, of n cached positions (bounds:
    the step's (n, lo, hi) tensor, or n itself).

    window: ring_k/ring_v [B, Hkv, W, D] slots (slot = position % W) holding positions >= n - W;
    anchor: positions [0, min(anchor, n)) of k/v [B, Hkv, capacity, D];
    gathered: idx, one list of positions per KV group [B, Hkv, K] or per query head
    [B, Hkv, G, K]; entries outside [min(anchor, n), n - W), such as -1 padding, are ignored, so
    the three sets are disjoint.
    Returns out [B, Hq, D] and the log-sum-exp of the attended logits [B, Hq].

    tail: (ksum, vsum, page_size), per-page key/value sums [B, Hkv, pages, D] (fp32), with idx
    holding whole pages (one list per group): every page wholly inside [lo, hi) that idx does not
    hold adds one pseudo-key, its mean key with logit + log(page_size), and its mean value, so the
    keys left out are estimated rather than dropped. The returned log-sum-exp stays that of the
    exactly attended keys (what the certificate compares with full attention).
    """
    B, Hq, D = q.shape
    Hkv, W = k.shape[1], ring_k.shape[2]
    G = Hq // Hkv
    n, lo, hi = _ints(as_bounds(bounds, None, "cpu", anchor, W))
    a = lo
    pos = idx
    if pos.dim() == 3:
        pos = pos[:, :, None]  # one list shared by the group's heads
    Gi = pos.shape[2]
    pos = torch.cat((torch.arange(a, device=q.device).expand(B, Hkv, Gi, a), pos), dim=3)
    valid = torch.cat((torch.ones(B, Hkv, Gi, a, dtype=torch.bool, device=q.device),
                       (pos[..., a:] >= lo) & (pos[..., a:] < hi)), dim=3)
    ring_valid = ring_positions(n, W, q.device) >= a  # window slots that are anchor positions count once
    safe = pos.clamp(0, max(n - 1, 0))
    keys = torch.cat((ring_k[:, :, None].expand(-1, -1, Gi, -1, -1), _gather(k, safe)), dim=3)
    values = torch.cat((ring_v[:, :, None].expand(-1, -1, Gi, -1, -1), _gather(v, safe)), dim=3)
    valid = torch.cat((ring_valid.expand(B, Hkv, Gi, W), valid), dim=3)  # [B, Hkv, Gi, W + a + K]
    qg = q.view(B, Hkv, G, D).float()
    if Gi == 1:  # shared list: one [G, D] x [D, N] product per KV head
        s = qg @ keys[:, :, 0].float().transpose(-1, -2)
        s = s.masked_fill(~valid, NEG_INF) / math.sqrt(D)
        lse = torch.logsumexp(s, dim=-1)
        values, norm = values[:, :, 0].float(), lse[..., None]
        if tail is not None:  # the softmax normalises over the pseudo-keys too; lse stays the exact set's
            tail_s, tail_v = _tail_keys(qg, idx, lo, hi, *tail)
            s, values = torch.cat((s, tail_s), dim=-1), torch.cat((values, tail_v), dim=2)
            norm = torch.logsumexp(s, dim=-1, keepdim=True)
        out = torch.exp(s - norm) @ values
    else:  # per-head lists
        s = (qg[..., None, :] @ keys.float().transpose(-1, -2))[..., 0, :]
        s = s.masked_fill(~valid, NEG_INF) / math.sqrt(D)
        lse = torch.logsumexp(s, dim=-1)
        out = (torch.exp(s - lse[..., None])[..., None, :] @ values.float())[..., 0, :]
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


def tail_pages(lo: int, hi: int, page_size: int) -> torch.Tensor:
    """Pages wholly inside candidate positions [lo, hi): the ones a tail estimate can stand for."""
    return torch.arange(-(-lo // page_size), max(-(-lo // page_size), hi // page_size))


def _tail_keys(qg: torch.Tensor, idx: torch.Tensor, lo: int, hi: int, ksum: torch.Tensor, vsum: torch.Tensor,
               page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, Hkv, G, pages] and values [B, Hkv, pages, D] of the tail's pseudo-keys (see
    sparse_attention): one per page inside [lo, hi) that idx [B, Hkv, K] does not attend."""
    P, D = page_size, qg.shape[-1]
    pages = tail_pages(lo, hi, P).to(qg.device)
    chosen = torch.where(idx >= 0, idx // P, -1)
    left = ~(pages[:, None] == chosen[..., None, :]).any(-1)  # [B, Hkv, pages]
    s = qg @ (ksum[:, :, pages] / P).transpose(-1, -2) / math.sqrt(D) + math.log(P)
    return s.masked_fill(~left[:, :, None], NEG_INF), vsum[:, :, pages] / P


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, n, D] at positions idx [B, Hkv, Gi, K] -> [B, Hkv, Gi, K, D]."""
    B, Hkv, Gi, K = idx.shape
    flat = torch.gather(x, 2, idx.reshape(B, Hkv, Gi * K, 1).expand(-1, -1, -1, x.shape[-1]))
    return flat.view(B, Hkv, Gi, K, -1)


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values along the last dim (any order)."""
    return x.topk(k, dim=-1, sorted=False).indices


def topk_positions(scores: torch.Tensor, lo: int, hi: int, k: int) -> torch.Tensor:
    """The min(k, hi - lo) best positions in [lo, hi) of scores [..., n]."""
    take = max(0, min(k, hi - lo))
    if take == 0:
        return torch.empty(*scores.shape[:-1], 0, dtype=torch.long, device=scores.device)
    return topk_indices(scores[..., lo:hi], take) + lo


def padded(positions: torch.Tensor, k: int) -> torch.Tensor:
    """positions [..., <=k] padded with -1 to k entries (a static shape for the kernels)."""
    return F.pad(positions, (0, k - positions.shape[-1]), value=-1)


def exact_select(q: torch.Tensor, k: torch.Tensor, bounds, k_top: int) -> torch.Tensor:
    """The min(k_top, hi - lo) positions in [lo, hi) (from bounds) of k [B, Hkv, capacity, D] with
    the largest group-max score q·k / sqrt(D), padded with -1: [B, Hkv, k_top] (exact top-k, one
    list per KV group)."""
    _, lo, hi = _ints(bounds)
    return padded(topk_positions(group_max_scores(q, k[:, :, :hi]), lo, hi, k_top), k_top)


def candidates(x: torch.Tensor, bounds) -> torch.Tensor:
    """Which positions along x's last dim are top-k candidates: [lo, hi) of the step's bounds."""
    j = torch.arange(x.shape[-1], device=x.device)
    return (j >= bounds[1]) & (j < bounds[2])


def certified_select(scores: torch.Tensor, lse_all: torch.Tensor, bounds, eps: float, k_max: int) -> torch.Tensor:
    """Certified mode's adaptive top-k: per KV group, the fewest positions in [lo, hi) that leave
    every query head at most eps of its attention mass outside anchor ∪ window ∪ them, at most k_max.

    scores [B, Hkv, G, capacity] are every head's exact logits (-inf past n), lse_all [B, Hkv, G]
    their log-sum-exp. Each head ranks its candidates by probability and keeps the shortest prefix
    whose remainder (summed from the smallest, so no cancellation) is <= eps; a position joins the
    group's list if any head keeps it, ordered by how far it clears that head's last kept
    probability (which decides who stays when k_max cuts the list). Static shapes, no host sync:
    [B, Hkv, k_max] positions, -1 padding. The caller measures the dropped mass the list leaves and
    sends heads still above eps to full attention.

    Only each head's k_max best are ranked (a top-k, not a sort of the whole context): a head that
    needs more keeps those and falls back anyway, since the group's list holds at most k_max."""
    logp = scores.masked_fill(~candidates(scores, bounds), NEG_INF) - lse_all[..., None]
    ranked = logp.topk(min(k_max, logp.shape[-1]), dim=-1).values
    p = ranked.double().exp()
    remainder = logp.double().exp().sum(-1, keepdim=True) - (p.cumsum(-1) - p)  # mass ranked i and below (fp64)
    return _union_of_prefixes(logp, ranked, (remainder > eps).sum(-1, keepdim=True), k_max)


def _union_of_prefixes(x: torch.Tensor, ranked: torch.Tensor, need: torch.Tensor, k_max: int) -> torch.Tensor:
    """Positions [B, Hkv, k_max] (-1 padding) that any head of a group keeps, when each head keeps
    its need [B, Hkv, G, 1] best by x [B, Hkv, G, n] (ranked: each head's best values of x,
    descending, at least need of them), ordered by how far a position clears its head's last kept
    value (which decides who stays when k_max cuts)."""
    last = ranked.gather(-1, (need - 1).clamp(min=0))
    clearance = torch.where((need > 0) & (x >= last) & (x > NEG_INF), x - last, NEG_INF).amax(dim=2)
    best, idx = clearance.topk(min(k_max, clearance.shape[-1]), dim=-1)
    return padded(torch.where(best > NEG_INF, idx, -1), k_max)


def channel_scales(k: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Per-channel scales [B, Hkv, D] for int8 copies, from keys k [B, Hkv, n, D] (less their
    offsets: key_frame): each channel's largest |k| over the keys relative to the head's largest,
    rounded up to a power of two in [2^-10, 1], the same for both channels of a rotated pair (d, d +
    rotary_dim / 2: RoPE moves a key's magnitude between them as its position changes). Keys are
    quantised as k / c and scored with q * c (quantize_keys, shadow_scores), so a few outlier
    channels no longer coarsen every other channel's int8 step: the error bounds shrink and
    certified int8 selection keeps ~5% fewer keys (SmolLM2, 4K of prose, eps 1e-2). Powers of two
    keep q * c exact (in bf16 and fp32; in fp16 but where it is subnormal, which the bounds'
    SHADOW_SLACK covers)."""
    m = k.float().abs().amax(2)
    if rotary_dim:
        half = rotary_dim // 2
        pair = torch.maximum(m[..., :half], m[..., half:rotary_dim])
        m = torch.cat((pair, pair, m[..., rotary_dim:]), -1)
    rel = m / m.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.ceil(torch.log2(rel.clamp(min=2.0 ** -10))))


def key_offsets(k: torch.Tensor) -> torch.Tensor:
    """Per-channel offsets [B, Hkv, D] for int8 copies, from keys k [B, Hkv, n, D]: each channel's
    mid-range over the keys. The copies code k - offset and the scores add q·offset back exactly
    (quantize_keys, shadow_scores): a KV head's keys share a large constant part (key biases,
    rotary dims that turn slowly), which otherwise sets every key's int8 step. On Qwen2.5-Coder-0.5B
    (8K of code, bench/int8_gap.py) it halves the mean error bound, 0.49 -> 0.24 nats: at eps 0.1
    certified int8 keeps 1.44 -> 1.17x the group oracle's keys, int8-threshold 1.83 -> 1.68x (on
    SmolLM2 1.12 -> 1.11x and 1.31 -> 1.29x). Any offset keeps the bounds valid: it is subtracted
    and added back the same."""
    kf = k.float()
    return (kf.amax(2) + kf.amin(2)) / 2


def key_frame(k: torch.Tensor, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel scales and offsets [B, Hkv, D] int8 copies code keys with, set from keys k [B, Hkv, n, D]."""
    offset = key_offsets(k)
    return channel_scales(k - offset[:, :, None], rotary_dim), offset


def quantize_keys(k: torch.Tensor, chan: torch.Tensor | None = None,
                  offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [..., D] less offset and divided by chan (key_offsets, channel_scales, broadcast to k,
    if given) as symmetric int8 with one fp32 scale per key: |(k - offset) / chan - q * scale| <=
    scale / 2 in every dim (round to nearest), so q·k is known to within ||q * chan||_1 * scale / 2."""
    x = k.float() if offset is None else k.float() - offset
    x = x if chan is None else x / chan
    scale = x.abs().amax(-1) / 127
    q = torch.round(x / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).clamp(-127, 127)
    return q.to(torch.int8), scale


# Slack on the int8 rounding bound for the fp32 arithmetic of quantising, estimating and attending.
SHADOW_SLACK = 1e-3
# Relative slack on q·offset, an fp32 sum of D <= 256 products (each rounding by at most 2^-24).
OFFSET_SLACK = 2.0 ** -16

# The int8 modes choose with the kept keys' mass counted as exp(est - KEPT_MARGIN * err): with 1 it
# is a lower bound, so the choice provably certifies, but the rounding errors of many keys do not
# all fall one way, and counting each at its worst made the int8 modes keep more keys than needed:
# with 0.25 certified int8 keeps 1.64 -> 1.44x the group oracle's keys on Qwen2.5-Coder-0.5B at
# eps 0.1 (8K of code; int8-threshold 1.96 -> 1.82x) and 1.13 -> 1.08x on SmolLM2 (bench/int8_gap.py,
# before key_offsets). The certificate does not rely on it: each step's bound is U over the
# attended set's exact mass, and a head it leaves above eps falls back to full attention (at 0.25
# at most 0.02% of the head-steps of FRONTIER's runs did; more at 0.1). A power of two, so the
# twins' products stay exact.
KEPT_MARGIN = 0.25
TAIL_WEIGHT = KEPT_MARGIN / (1 + KEPT_MARGIN)  # the tail's mass, U^w * L^(1 - w): see estimate_tail


def shadow_scores(q: torch.Tensor, kq: torch.Tensor, kscale: torch.Tensor, n, chan: torch.Tensor | None = None,
                  offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated logits q·k / sqrt(D) of every key from its int8 copy (kq [B, Hkv, cap, D], kscale
    [B, Hkv, cap], made with the channel scales chan and offsets offset [B, Hkv, D] if given), -inf
    from position n on, and each estimate's error bound: [B, Hkv, G, cap] both."""
    B, Hq, D = q.shape
    Hkv = kq.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D).float()
    qc = qg if chan is None else qg * chan[:, :, None, :]
    est = (qc @ kq.float().transpose(-1, -2)) * (kscale[:, :, None, :] / math.sqrt(D))
    err = (qc.abs().sum(-1, keepdim=True) / math.sqrt(D)) * kscale[:, :, None, :] * (0.5 + SHADOW_SLACK) + SHADOW_SLACK
    if offset is not None:
        q_off, q_off_err = offset_terms(qg, offset)
        est, err = est + q_off[..., None], err + q_off_err[..., None]
    live = torch.arange(kq.shape[2], device=q.device) < n
    return est.masked_fill(~live, NEG_INF), err


def offset_terms(qg: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head [B, Hkv, G] (qg [B, Hkv, G, D] fp32, offset [B, Hkv, D]): q·offset / sqrt(D),
    and a bound on its fp32 rounding, OFFSET_SLACK * sum |q * offset| / sqrt(D)."""
    terms = qg * offset[:, :, None]
    root_d = math.sqrt(qg.shape[-1])
    return terms.sum(-1) / root_d, terms.abs().sum(-1) * OFFSET_SLACK / root_d


def bounded_select(est: torch.Tensor, err: torch.Tensor, bounds, eps: float, k_max: int) -> torch.Tensor:
    """Certified mode without exact scores: per KV group, the fewest positions in [lo, hi) after
    which every query head's dropped mass is provably <= eps, at most k_max ([B, Hkv, k_max], -1
    padding). Each head ranks candidates by their logit's upper bound u = est + err and keeps the
    shortest prefix with U <= eps / (1 - eps) * Z, where U sums exp(u) over the rest and Z sums
    exp(est - KEPT_MARGIN * err) over anchor, window and the prefix (see KEPT_MARGIN: with a
    margin of 1, a lower bound on the kept keys' mass, so U / (Z_exact + U) <= eps once attended).
    The group's list is the union (see certified_select for the order, and for why only the k_max
    best are ranked)."""
    cand = candidates(est, bounds)
    up = (est + err).masked_fill(~cand, NEG_INF)
    low = est - KEPT_MARGIN * err
    kept_lo = low.masked_fill(cand, NEG_INF)  # anchor and window: always attended
    top = torch.maximum(up.amax(-1, keepdim=True), kept_lo.amax(-1, keepdim=True))  # a common shift
    up_sorted, order = up.topk(min(k_max, up.shape[-1]), dim=-1)
    lo_sorted = low.masked_fill(~cand, NEG_INF).gather(-1, order)
    e_up = (up_sorted - top).double().exp()
    rest = (up - top).double().exp().sum(-1, keepdim=True) - (e_up.cumsum(-1) - e_up)  # U if the first m are kept
    kept = torch.exp(kept_lo - top).double().sum(-1, keepdim=True) + F.pad(
        (lo_sorted - top).double().exp().cumsum(-1)[..., :-1], (1, 0))
    need = (rest > eps / (1 - eps) * kept).sum(-1, keepdim=True) if eps < 1 else torch.zeros_like(top, dtype=torch.long)
    return _union_of_prefixes(up, up_sorted, need, k_max)


def shadow_bound(est: torch.Tensor, err: torch.Tensor, bounds, idx: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """An upper bound [B, Hq] on each head's attention mass outside the attended set (idx [B, Hkv,
    K] of the candidates, lse [B, Hq] the set's exact log-sum-exp): U / (exp(lse) + U), U the sum of
    exp(est + err) over the candidates idx does not hold."""
    B, Hq = lse.shape
    chosen = torch.zeros(est.shape[0], est.shape[1], est.shape[-1] + 1, dtype=torch.bool, device=est.device)
    chosen = chosen.scatter(-1, torch.where(idx >= 0, idx, est.shape[-1]), True)[..., :-1]
    left = candidates(est, bounds) & ~chosen
    log_u = torch.logsumexp((est + err).masked_fill(~left[:, :, None], NEG_INF), dim=-1).reshape(B, Hq)
    return torch.sigmoid(log_u - lse)


# Certified page selection from the int8 copies (selection "int8-threshold"), with no sort: a KV
# group bins pages by their best key's logit upper bound over its query heads, each head's bound
# lowered by its shift (cut_shift), BIN_WIDTH nats per bin counted down from the group's top bin,
# the last of PAGE_BINS bins holding the rest. Sharing the bins across the group makes a block's
# histogram one matrix product for all its heads. The width is a power of two, so the twins bin
# alike. Keys over the group oracle's at eps 1e-2 (FRONTIER.md, Qwen2.5-Coder-0.5B decoding after
# 24K of code): 1.68x unshifted, 1.45x shifted; bins of 0.25 gave 1.39x but cost the GPU's first
# pass 24% more time (H200, 128K and 1M).
BIN_WIDTH = 0.5
PAGE_BINS = 64
NO_PAGE = -(1 << 15)  # the bin of a page without candidate keys; bins are stored as int16
MAX_BIN = (1 << 15) - 1  # bins clamp to [-MAX_BIN, MAX_BIN] (+-16K nats): a key's bin is ranked as stored


def rest_ratio(eps: float) -> float:
    """eps / (1 - eps): U <= it * Z gives U / (Z + U) <= eps (inf at eps = 1: nothing need be kept)."""
    return eps / (1 - eps) if eps < 1 else math.inf


def to_bin(x: torch.Tensor) -> torch.Tensor:
    """floor(x / BIN_WIDTH), clamped; NO_PAGE where x is -inf."""
    return torch.where(x > NEG_INF, torch.floor(x / BIN_WIDTH).clamp(-MAX_BIN, MAX_BIN), float(NO_PAGE))


def bf16_outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """x >= 0 (fp32) to the nearest bf16 value above (up) or below it, as fp32: the histogram's sums
    of exps are products of bf16 values with a one-hot matrix, exact on tensor cores, and rounding
    outward keeps U an upper bound and Z a lower one (each looser by at most 2^-7 of itself: bf16
    keeps 8 significant bits)."""
    bits = x.float().view(torch.int32)
    down = bits & -65536
    return torch.where((down != bits) & up, down + 65536, down).view(torch.float32)


# Each head's shift aligns where the heads of a KV group would cut: estimated before the scan on
# SHIFT_SAMPLES evenly spaced candidates. On captured queries (bench/int8_gap.py, Qwen2.5-Coder-0.5B
# after 24K of code, eps 0.1) the group kept 1.89x the oracle's keys with heads aligned on their
# tops over the anchor and window, 1.44x aligned on this estimate, 1.41x on each head's true cut
# (known only after the step).
SHIFT_SAMPLES = 512


def shift_samples(lo: int, hi: int, device: torch.device | str) -> torch.Tensor:
    """The candidates a step estimates each head's cut on: lo + ((2i + 1)(hi - lo)) // (2S) for i
    < S = SHIFT_SAMPLES, the middles of S equal spans of [lo, hi) (integers, so twins agree)."""
    i = torch.arange(SHIFT_SAMPLES, device=device, dtype=torch.int64)
    return lo + ((2 * i + 1) * (hi - lo)) // (2 * SHIFT_SAMPLES)


def sampled_cut(up: torch.Tensor, low: torch.Tensor, base: torch.Tensor, lo: int, hi: int, eps: float) -> torch.Tensor:
    """Each query head's cut [B, Hkv, G] (a bin) from its logit bounds up, low [B, Hkv, G, cap]:
    page_threshold's choice made per head and key by key on the shift_samples candidates, each
    standing for (hi - lo) / SHIFT_SAMPLES keys, its bins counted down from the samples' top, the
    always-attended keys `base` (anchor and window; a mask, or weights: each key counted that many
    times) counted in Z. 0 without candidates."""
    if hi <= lo:
        return torch.zeros(up.shape[:-1], device=up.device)
    pos = shift_samples(lo, hi, up.device)
    u, l = up[..., pos], low[..., pos]
    top = to_bin(u.amax(-1))
    always = base > 0
    ref = (torch.maximum(top, to_bin(torch.where(always, up, NEG_INF).amax(-1))) + 1)[..., None] * BIN_WIDTH
    weight = (hi - lo) / SHIFT_SAMPLES
    j = (top[..., None] - to_bin(u)).clamp(max=PAGE_BINS - 1).long()
    hist = torch.zeros(*u.shape[:-1], PAGE_BINS, dtype=torch.float64, device=up.device)
    rest = hist.scatter_add(-1, j, torch.exp(u - ref).double() * weight)
    kept = hist.scatter_add(-1, j, torch.exp(l - ref).double() * weight)
    base_mass = (torch.exp(torch.where(always, low, NEG_INF) - ref).double() * base).sum(-1, keepdim=True)
    rest = F.pad(rest.flip(-1).cumsum(-1).flip(-1), (0, 1))
    kept = base_mass + F.pad(kept.cumsum(-1), (1, 0))
    need = (rest > rest_ratio(eps) * kept).sum(-1) if eps > 0 else PAGE_BINS
    return top - need + 1


def cut_shift(cut: torch.Tensor) -> torch.Tensor:
    """Each query head's shift [B, Hkv, G] in nats: how far its cut (sampled_cut) lies above the
    KV group's lowest. Lowered by it, the heads' bounds rank keys by how far they are from where
    each head would cut rather than by their raw logits, so a head whose logits run high (in some
    of Qwen2's layers the heads' tops lie hundreds of nats apart) no longer pulls the group's
    threshold down into its tail."""
    return (cut - cut.amin(-1, keepdim=True)) * BIN_WIDTH


class Tail(NamedTuple):
    """One layer's buffers for certified int8-threshold's tail estimate (a cache owns them):
    page_threshold keeps value_sum, the fp32 sum of v over the candidates [lo, upto) (upto [B, Hkv],
    int32; brought up to the step's hi, restarted when upto is outside [lo, hi]), and writes per
    query head log_u / log_l [B, Hq, PAGE_BINS], the log of the sums of exp(u) and exp(l) over the
    candidates in bins j.. (counted down from the group's top bin, group_top [B, Hq]);
    page_filtered_attention reads them (estimate_tail)."""
    v: torch.Tensor
    value_sum: torch.Tensor
    upto: torch.Tensor
    log_u: torch.Tensor
    log_l: torch.Tensor
    group_top: torch.Tensor


def update_value_sum(tail: Tail, bounds) -> None:
    """tail.value_sum brought to the sum of v over the candidates [lo, hi): only the positions past
    tail.upto are added (one per decode step), so a step run twice adds nothing twice."""
    _, lo, hi = _ints(as_bounds(bounds, None, "cpu"))
    restart = (tail.upto < lo) | (tail.upto > hi)  # after a truncate or a new prefill (the cache sets upto = -1)
    start = torch.where(restart, lo, tail.upto)  # [B, Hkv]
    first = int(start.min()) if start.numel() else hi
    pos = torch.arange(first, hi, device=tail.v.device)
    add = (pos >= start[..., None])[..., None] * tail.v[:, :, first:hi].float()
    tail.value_sum.copy_(torch.where(restart[..., None], 0.0, tail.value_sum) + add.sum(2))
    tail.upto.fill_(hi)


def page_threshold(q: torch.Tensor, k: torch.Tensor, kq: torch.Tensor, kscale: torch.Tensor, chan: torch.Tensor,
                   offset: torch.Tensor, bounds, eps: float, page_size: int, tail: Tail | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Certified mode's page selection from every key's int8 copy (kq, kscale, chan, offset: shadow_scores),
    no sort. It first writes the int8 copy of the newest key (position n - 1 of k), which it does
    not score.

    Per query head, each key has logit bounds l <= q·k / sqrt(D) <= u. A page's bin is
    to_bin(max u - shift) over its candidates (positions [lo, hi)) and the query heads of its KV
    group, shift the head's cut_shift (the ranking only: every head's mass is counted whole). Each
    head keeps the fewest top bins after which U <= eps / (1 - eps) * Z, with U the sum of its exp(u)
    over the candidates of the other bins and Z the sum of its exp(l) over the anchor, the window
    (but for the newest key, so its int8 copy need not exist yet: leaving a key out only lowers Z)
    and the kept candidates, l = est - KEPT_MARGIN * err (with a margin of 1 a lower bound on the
    attended mass, so U / (Z_exact + U) <= eps once attended; the step's bound uses the exact mass).
    A KV group attends the pages any of its heads keeps, which leaves each at most its U.

    Returns page_bin [B, Hkv, pages] (int16, NO_PAGE for a page without candidates), threshold
    [B, Hq] (int32: a head keeps the pages whose bin is >= it) and log_rest [B, Hq] = log U (-inf if
    nothing is left out). eps = 0 keeps every page and still leaves U = 0 < eps false: full attention.
    With tail, also its value sum and per-bin sums (see Tail)."""
    n, lo, hi = _ints(as_bounds(bounds, None, "cpu"))
    kq[:, :, n - 1], kscale[:, :, n - 1] = quantize_keys(k[:, :, n - 1], chan, offset)
    est, err = shadow_scores(q, kq, kscale, n, chan, offset)
    B, Hkv, G, cap = est.shape
    pages = -(-cap // page_size)
    pos = torch.arange(cap, device=q.device)
    cand = (pos >= lo) & (pos < hi)
    base = (pos < n - 1) & ~cand
    up, low = est + err, est - KEPT_MARGIN * err
    shift = cut_shift(sampled_cut(up, low, base, lo, hi, eps))[..., None]  # [B, Hkv, G, 1]
    top = torch.where(cand | base, up, NEG_INF).amax(-1, keepdim=True)
    head_top = to_bin(top[..., 0])  # [B, Hkv, G]
    group_top = to_bin(top - shift).amax(2)  # [B, Hkv, 1], above every page's bin
    ref = (head_top + 1) * BIN_WIDTH  # each head's exps are <= 1

    def by_page(x: torch.Tensor) -> torch.Tensor:  # candidates only, [B, Hkv, G, pages, page_size]
        x = F.pad(torch.where(cand, x, NEG_INF), (0, pages * page_size - cap), value=NEG_INF)
        return x.view(B, Hkv, G, pages, page_size)

    def page_mass(x: torch.Tensor, up: bool) -> torch.Tensor:  # per page, the sum of exp(x - ref), rounded outward
        return bf16_outward(torch.exp(by_page(x) - ref[..., None, None]), up).double().sum(-1)

    page_bin = to_bin((by_page(up).amax(-1) - shift).amax(2))  # [B, Hkv, pages]
    bins = (group_top - page_bin).clamp(max=PAGE_BINS - 1).long()[:, :, None].expand(B, Hkv, G, pages)
    hist = torch.zeros(B, Hkv, G, PAGE_BINS, dtype=torch.float64, device=q.device)
    rest_hist = hist.scatter_add(-1, bins, page_mass(up, True))
    kept_hist = hist.scatter_add(-1, bins, page_mass(low, False))
    base_mass = torch.exp(torch.where(base, low, NEG_INF) - ref[..., None]).double().sum(-1, keepdim=True)
    rest = F.pad(rest_hist.flip(-1).cumsum(-1).flip(-1), (0, 1))  # rest[j]: outside the top j bins, j = 0..PAGE_BINS
    kept = base_mass + F.pad(kept_hist.cumsum(-1), (1, 0))
    need = (rest > rest_ratio(eps) * kept).sum(-1)  # the first j that holds: rest falls and kept grows with j
    if eps == 0:  # every bin, by construction: rest > 0 would turn on masses at fp32's underflow, where twins differ
        need = torch.full_like(need, PAGE_BINS)
    threshold = torch.where(need < PAGE_BINS, group_top - need + 1, float(NO_PAGE))
    log_rest = torch.log(rest.gather(-1, need[..., None])[..., 0]) + ref
    if tail is not None:
        update_value_sum(tail, bounds)
        tail.log_u.copy_((torch.log(rest[..., :PAGE_BINS]) + ref[..., None]).view(B, Hkv * G, PAGE_BINS))
        low_rest = kept_hist.flip(-1).cumsum(-1).flip(-1)
        tail.log_l.copy_((torch.log(low_rest) + ref[..., None]).view(B, Hkv * G, PAGE_BINS))
        tail.group_top.copy_(group_top.expand(B, Hkv, G).reshape(B, Hkv * G))
    return page_bin.to(torch.int16), threshold.to(torch.int32).view(B, Hkv * G), log_rest.float().view(B, Hkv * G)


def kept_pages(page_bin: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, pages]: the pages some query head of the KV group keeps (see page_threshold)."""
    B, Hkv, _ = page_bin.shape
    return page_bin >= threshold.view(B, Hkv, -1).amin(-1, keepdim=True)


def kept_positions(page_bin: torch.Tensor, threshold: torch.Tensor, page_size: int, capacity: int) -> torch.Tensor:
    """[B, Hkv, capacity]: the positions of the pages some query head of the KV group keeps."""
    return kept_pages(page_bin, threshold).repeat_interleave(page_size, -1)[..., :capacity]


def page_filtered_attention(q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, page_bin: torch.Tensor, threshold: torch.Tensor, log_rest: torch.Tensor,
                            bounds, anchor: int, page_size: int, tail: Tail | None = None,
                            bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact softmax over window ∪ anchor ∪ the candidates of every page some head of the KV group
    keeps (page_bin >= threshold, from page_threshold): out [B, Hq, D], its log-sum-exp [B, Hq],
    and the bound on the mass it left out, U / (Z_set + U) with log U = log_rest [B, Hq] (written
    into `bound` if given). With tail, out has the candidates left out estimated (estimate_tail);
    lse and the bound stay the attended set's."""
    bounds = as_bounds(bounds, None, q.device, anchor, ring_k.shape[2])
    keep = kept_positions(page_bin, threshold, page_size, k.shape[2]) & candidates(k[..., 0], bounds)
    idx = torch.where(keep, torch.arange(k.shape[2], device=q.device), -1)
    out, lse = sparse_attention(q, ring_k, ring_v, k, v, idx, bounds, anchor)
    if tail is not None:
        kept_sum = torch.where(keep[..., None], v.float(), 0).sum(2)  # the attended candidates' plain value sum
        out = estimate_tail(out, lse, threshold, tail, kept_sum, keep.sum(-1), bounds)
    if bound is None:
        return out, lse, torch.sigmoid(log_rest - lse)
    return out, lse, torch.sigmoid(log_rest - lse, out=bound)


def estimate_tail(out: torch.Tensor, lse: torch.Tensor, threshold: torch.Tensor, tail: Tail, kept_sum: torch.Tensor,
                  kept_count: torch.Tensor, bounds) -> torch.Tensor:
    """Certified int8-threshold's tail estimate: the candidates no head of the KV group kept join
    each head's softmax as one pseudo-key. Its mass is U^a * L^(1 - a), U and L the head's sums
    of exp(u) and exp(l) over them, a = m / (1 + m) for l = est - m * err (TAIL_WEIGHT; m =
    KEPT_MARGIN), which is exp(est) for keys of equal error: the bins from j = group top - the
    group's lowest threshold + 1 on, which page_threshold's histogram holds. Its value is their plain mean: the candidates' value
    sum less the attended ones' (kept_sum [B, Hkv, D] of kept_count [B, Hkv]). Nothing is read
    that the step did not read anyway. out [B, Hq, D] and lse [B, Hq] are the attended set's.
    Measured 2-5x closer (median) to full attention's output than dropping, on real weights
    (bench/tail_gap.py)."""
    B, Hq, D = out.shape
    Hkv = kept_sum.shape[1]
    _, lo, hi = _ints(as_bounds(bounds, None, "cpu"))
    lowest = threshold.view(B, Hkv, -1).amin(-1, keepdim=True).expand(B, Hkv, Hq // Hkv).reshape(B, Hq)
    j = tail.group_top.long() - lowest.long() + 1  # the first bin left out (>= PAGE_BINS: none)
    at = j.clamp(0, PAGE_BINS - 1)[..., None]
    log_mass = (TAIL_WEIGHT * tail.log_u.gather(-1, at) + (1 - TAIL_WEIGHT) * tail.log_l.gather(-1, at))[..., 0]
    w = torch.where(j < PAGE_BINS, torch.sigmoid(log_mass - lse.float()), 0.0)[..., None]  # [B, Hq, 1]
    mean = (tail.value_sum - kept_sum) / ((hi - lo) - kept_count).clamp(min=1)[..., None]  # [B, Hkv, D]
    mean = mean[:, :, None].expand(B, Hkv, Hq // Hkv, D).reshape(B, Hq, D)
    return ((1 - w) * out.float() + w * mean).to(out.dtype)


def group_max_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """max over each KV group's query heads of q·k / sqrt(D): [B, Hkv, n] (fp32)."""
    return group_scores(q, k).amax(dim=2)


def page_tokens(k: torch.Tensor, pages: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, Hkv, S * page_size] of every token of pages [B, Hkv, S], and their keys from k."""
    pos = (pages[..., None] * page_size + torch.arange(page_size, device=k.device)).flatten(2)
    keys = torch.gather(k, 2, pos.clamp(0, k.shape[2] - 1)[..., None].expand(-1, -1, -1, k.shape[-1]))
    return pos, keys


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Upper bound of q·k / sqrt(D) over each page from its elementwise key min/max (Quest).

    max(q_d kmin_d, q_d kmax_d) = q+_d kmax_d + q-_d kmin_d, so the bound is two products.
    q [B, Hq, D], kmin/kmax [B, Hkv, P, D] -> [B, Hkv, P], the max over the group's query heads,
    so a page is kept if any head of the group might want it; pages before `first` get -inf.
    """
    bound = head_page_bounds(q, kmin, kmax).amax(dim=2)
    bound[..., :first] = NEG_INF
    return bound


def head_page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """page_bounds for each query head: [B, Hkv, G, P] (+inf where an fp8 summary overflowed)."""
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D).float()
    bound = (qg.clamp(min=0) @ kmax.float().transpose(-1, -2) + qg.clamp(max=0) @ kmin.float().transpose(-1, -2)) / math.sqrt(D)
    return torch.where(bound.isnan(), math.inf, bound)  # an fp8 summary past its range (round_outward)


def pages_scored(k_top: int, page_size: int, oversample: float) -> int:
    """How many pages page selection scores exactly: ceil(k_top * oversample / page_size)."""
    return math.ceil(k_top * oversample / page_size)


def page_plan(lo: int, hi: int, k_top: int, page_size: int, oversample: float) -> tuple[int, int, int]:
    """Pages [p_lo, p_hi) that overlap positions [lo, hi), and how many of them are scored exactly
    (pages_scored, at most all of them)."""
    p_lo, p_hi = lo // page_size, (hi - 1) // page_size + 1
    return p_lo, p_hi, min(p_hi - p_lo, pages_scored(k_top, page_size, oversample))


def rank_pages(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lo: int, hi: int, k_top: int,
               page_size: int, oversample: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's Quest bound of the pages up to hi [B, Hkv, G, p_hi], and the pages page
    selection scores exactly [B, Hkv, S]: those overlapping [lo, hi) with the largest bound over
    the group's heads (page_plan says how many)."""
    p_lo, p_hi, n_sel = page_plan(lo, hi, k_top, page_size, oversample)
    heads = head_page_bounds(q, kmin[:, :, :p_hi], kmax[:, :, :p_hi])
    group = heads.amax(dim=2)
    group[..., :p_lo] = NEG_INF
    return heads, topk_indices(group, n_sel)


def whole_pages(k_top: int, page_size: int) -> int:
    """How many pages whole-page selection attends for a budget of k_top keys."""
    return math.ceil(k_top / page_size)


def pages_taken(k_top: int, page_size: int, oversample: float, whole: bool) -> int:
    """How many pages page selection takes by their bound: attended whole, or scored exactly."""
    return whole_pages(k_top, page_size) if whole else pages_scored(k_top, page_size, oversample)


def page_select(q: torch.Tensor, k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, bounds,
                k_top: int, page_size: int, oversample: float, scope: str, whole: bool = False) -> torch.Tensor:
    """Approximate top-k in [lo, hi) without scoring every key (Quest-style).

    Rank pages by their upper bound (rank_pages), score exactly only the tokens of the best
    pages (page_plan), keep the top k_top of those. k [B, Hkv, cap, D] is the key store,
    kmin/kmax [B, Hkv, pages, D] its page summaries.
    Returns positions [B, Hkv, k_top] for scope "group" or [B, Hkv, G, k_top] for "head";
    -1 where fewer than k_top tokens of the chosen pages lie in [lo, hi) (from bounds).
    whole: no token scoring; every position of the whole_pages(k_top) best pages, [B, Hkv,
    whole_pages * page_size] (scope "group"), -1 outside [lo, hi).
    """
    B, Hq, _ = q.shape
    Hkv = k.shape[1]
    P = page_size
    _, lo, hi = _ints(bounds)
    width = whole_pages(k_top, P) * P if whole else k_top
    if k_top <= 0 or hi <= lo:
        lead = (B, Hkv) if scope == "group" else (B, Hkv, Hq // Hkv)
        return torch.full((*lead, width), -1, dtype=torch.long, device=q.device)
    _, pages = rank_pages(q, kmin, kmax, lo, hi, k_top, P, 1.0 if whole else oversample)
    pos, keys = page_tokens(k, pages, P)
    if whole:
        assert scope == "group", "whole-page selection keeps one page list per KV group"
        return padded(torch.where((pos >= lo) & (pos < hi), pos, -1), width)
    s = group_scores(q, keys)
    if scope == "group":
        s = s.amax(dim=2)
    else:
        pos = pos[:, :, None].expand_as(s)
    s = s.masked_fill((pos < lo) | (pos >= hi), NEG_INF)
    best = topk_indices(s, min(k_top, s.shape[-1]))
    return padded(torch.where(s.gather(-1, best) > NEG_INF, pos.gather(-1, best), -1), k_top)


def dropped_mass_bound(q: torch.Tensor, k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, bounds,
                       idx: torch.Tensor, lse: torch.Tensor, k_top: int, page_size: int, oversample: float) -> torch.Tensor:
    """An upper bound [B, Hq] on each query head's attention mass outside the set page selection
    attended (idx [B, Hkv, K], lse [B, Hq] its log-sum-exp), from what selection computed anyway:
    the candidate tokens of the pages it scored count exactly, every other page p counts
    n_p * exp(ub_p) with ub_p the head's Quest bound. With U that sum and Z_S = exp(lse),
    dropped <= U / (Z_S + U); fp8 summaries rounded outward keep ub_p a bound."""
    B, Hq, _ = q.shape
    Hkv, P = k.shape[1], page_size
    _, lo, hi = _ints(bounds)
    if hi <= lo:  # no candidates: anchor and window hold every position
        return torch.zeros(B, Hq, device=q.device)
    ub, scored = rank_pages(q, kmin, kmax, lo, hi, k_top, P, oversample)  # scored: the pages page_select scored
    p_hi = ub.shape[-1]
    start = torch.arange(p_hi, device=q.device) * P
    count = (torch.clamp(start + P, max=hi) - torch.clamp(start, min=lo)).clamp(min=0)  # candidates per page
    unscored = torch.ones(B, Hkv, p_hi, dtype=torch.bool, device=q.device).scatter(-1, scored, False) & (count > 0)
    bounded = torch.where(unscored[:, :, None], count.log() + ub, NEG_INF)  # [B, Hkv, G, p_hi]
    pos, keys = page_tokens(k, scored, P)
    left_out = (pos >= lo) & (pos < hi) & ~(pos[..., :, None] == idx[..., None, :]).any(-1)
    exact = group_scores(q, keys).masked_fill(~left_out[:, :, None], NEG_INF)  # [B, Hkv, G, S * P]
    log_u = torch.logsumexp(torch.cat((bounded, exact), dim=-1), dim=-1).reshape(B, Hq)
    return torch.sigmoid(log_u - lse)  # U / (Z_S + U)


def update_pages(k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, start: int, end: int, page_size: int) -> None:
    """Recompute the min/max summaries of the pages that positions [start, end) of k [B, Hkv, cap, D] touch."""
    P = page_size
    p0, p1 = start // P, (end - 1) // P + 1
    keys = k[:, :, p0 * P:end]
    pad = p1 * P - end  # the last page may be partly filled: pad with its own last key
    if pad:
        keys = torch.cat((keys, keys[:, :, -1:].expand(-1, -1, pad, -1)), dim=2)
    keys = keys.unflatten(2, (p1 - p0, P))
    kmin[:, :, p0:p1] = round_outward(keys.amin(dim=3).float(), False, kmin.dtype)
    kmax[:, :, p0:p1] = round_outward(keys.amax(dim=3).float(), True, kmax.dtype)


def update_page_sums(k: torch.Tensor, v: torch.Tensor, ksum: torch.Tensor, vsum: torch.Tensor, start: int, end: int,
                     page_size: int) -> None:
    """Recompute the fp32 key and value sums of the pages that positions [start, end) touch (a
    partly filled last page sums the positions it holds)."""
    P = page_size
    p0, p1 = start // P, (end - 1) // P + 1
    for store, sums in ((k, ksum), (v, vsum)):
        x = store[:, :, p0 * P:end].float()
        x = F.pad(x, (0, 0, 0, p1 * P - end))  # zeros past the end
        sums[:, :, p0:p1] = x.unflatten(2, (p1 - p0, P)).sum(dim=3)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def round_outward(x: torch.Tensor, up: bool, dtype: torch.dtype) -> torch.Tensor:
    """Summaries x (fp32) stored as dtype: exact for the cache dtype (x are min/max of its keys);
    for float8_e4m3fn rounded toward +inf (up, page maxima) or -inf (minima) so the Quest bound
    stays a bound. Its grid step at x's binary exponent e is 2^(max(e, -6) - 3). Past 448 a maximum
    (below -448 a minimum) has no fp8 bound: NaN, which page_bounds reads as an infinite bound (the
    page is always scored); the other way it saturates (448 is a lower bound of anything above it),
    so a page's summary is the same whether built key by key or at once."""
    if dtype != torch.float8_e4m3fn:
        return x.to(dtype)
    e = ((x.contiguous().view(torch.int32) >> 23) & 0xFF) - 127  # binary exponent
    e = e.clamp(min=-6)
    ulp, inv_ulp = (((e - 3 + 127) << 23).view(torch.float32), ((127 + 3 - e) << 23).view(torch.float32))
    r = (torch.ceil if up else torch.floor)(x * inv_ulp) * ulp  # exact: powers of two
    unbounded = (r > FP8_MAX) if up else (r < -FP8_MAX)
    return torch.where(unbounded | r.isnan(), float("nan"), r.clamp(-FP8_MAX, FP8_MAX)).to(dtype)


def fill_ring(ring_k: torch.Tensor, ring_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
    """Write k/v [..., T, D] of positions start.. into the ring (slot = position % W); only the
    last W of them survive."""
    W, end = ring_k.shape[-2], start + k.shape[-2]
    first = max(start, end - W)
    slots = torch.arange(first, end, device=k.device) % W
    ring_k[..., slots, :] = k[..., first - start:, :]
    ring_v[..., slots, :] = v[..., first - start:, :]


def append_kv(k_store: torch.Tensor, v_store: torch.Tensor, ring_k: torch.Tensor | None, ring_v: torch.Tensor | None,
              kmin: torch.Tensor | None, kmax: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
              start, page_size: int) -> None:
    """Write k/v [B, Hkv, T, D] at positions start.. (an int, or a step's bounds: one key at n - 1)
    of the stores and, if given, the ring (slot = position % W) and the page summaries kmin/kmax."""
    if isinstance(start, torch.Tensor):
        start = _ints(start)[0] - 1
    end = start + k.shape[2]
    k_store[:, :, start:end] = k
    v_store[:, :, start:end] = v
    if ring_k is not None:
        fill_ring(ring_k, ring_v, k, v, start)
    if kmin is not None:
        update_pages(k_store, kmin, kmax, start, end, page_size)
