"""Triton decode-attention and selection kernels (references: kernels/reference.py).

Decode attention is flash-decoding: the key range is split across programs, each program serves
all G query heads of one KV head (so each K/V byte is read once per step, GQA-aware), keeps an
online softmax, and writes a partial output plus its log-sum-exp; a second kernel merges splits
(merging inside the first, by the last split to finish, measured slower: BENCHMARKS.md).
The sparse variant runs the same loop over a virtual sequence: W ring-buffer slots followed by K
gathered history positions (anchor + top-k), loaded in place with no gathered copy of K/V.

Selection is two launches and no full sort: a bandwidth-bound scan writes per-page maxima (of the
group-max q·k for exact selection, of the Quest bound q+·kmax + q-·kmin for page selection) and
per-run maxima; then one program per KV head ranks runs, pages, and the chosen pages' tokens.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import reference


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's CPU interpreter computes tl.dot on bf16 operands wrongly (seen with 3.9: values
    # ~1e10), so under TRITON_INTERPRET bf16 operands are upcast; their bf16 rounding is kept.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _online_update(q, kp, vp, valid, lmask, m, l, acc, scale, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One block of keys into the online softmax (m, l, acc) of the group's query heads."""
    k = tl.load(kp, mask=lmask, other=0.0)
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = tl.load(vp, mask=lmask, other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l, acc


@triton.jit
def _attn_partial(
    Q, K, V, RK, RV, IDX, COUNT, OP, LP, OUT, LSE, BOUNDS, DROPPED, FALLS, LOG_REST, BOUND,
    TH, TAIL_U, TAIL_L, GTOP, VSUM, VKP,
    sqb, sqh, skb, skh, skn, srb, srh, srn, sib, sih,
    W, n_gather, scale, Hkv, eps,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr, COUNTED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    DIRECT: tl.constexpr, FALL_BACK: tl.constexpr, BOUNDED: tl.constexpr, TAIL: tl.constexpr, NB: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    gmask = g < G
    if FALL_BACK:  # only the heads whose dropped mass is not below eps (NaN included) are written
        gmask = gmask & ~(tl.load(DROPPED + pid_bh * G + g, mask=gmask, other=0.0) < eps)
        falls = tl.sum(gmask.to(tl.int32), 0)
        if falls == 0:  # so a KV group with no such head reads nothing
            return
        if split == 0:
            tl.atomic_add(FALLS, falls.to(tl.int64))
    n_splits = tl.num_programs(1)
    # the step's lengths come from memory (see reference.step_bounds): the grid is sized for the
    # cache's capacity and each program finds its share of the live keys, so nothing recompiles
    n_ctx = tl.load(BOUNDS)
    lo = tl.load(BOUNDS + 1)
    hi = tl.load(BOUNDS + 2)
    if COUNTED:  # the gathered list's length is the step's (page_filtered_attention's compaction)
        n_gather = tl.load(COUNT + pid_bh)
    if SPARSE:
        n_keys = W + lo + n_gather
    else:
        n_keys = n_ctx
    keys_per_split = tl.cdiv(tl.cdiv(n_keys, n_splits), BLOCK_N) * BLOCK_N
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    d = tl.arange(0, D_PAD)
    dmask = d < D
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    kept_sum = tl.zeros([D_PAD], tl.float32)  # TAIL: the gathered candidates' plain value sum
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        in_range = j < end
        if SPARSE:
            # virtual sequence: W ring slots | anchor positions [0, lo) | gathered entries
            is_ring = j < W
            newest = n_ctx - 1
            ring_pos = newest - ((newest - j) % W + W) % W  # latest position in slot j; < 0 if empty
            is_anchor = (j >= W) & (j < W + lo)
            is_gather = j >= W + lo
            pos = tl.load(IDX + b * sib + h * sih + (j - W - lo), mask=in_range & is_gather, other=-1)
            gather_ok = is_gather & (pos >= lo) & (pos < hi)
            hist_ok = is_anchor | gather_ok
            hist_pos = tl.where(is_anchor, j - W, tl.where(gather_ok, pos, 0)).to(tl.int64)
            valid = in_range & ((is_ring & (ring_pos >= lo) & (ring_pos >= 0)) | hist_ok)
            ring_off = (b * srb + h * srh + j * srn)[:, None] + d[None, :]
            hist_off = (b * skb + h * skh + hist_pos * skn)[:, None] + d[None, :]
            kp = tl.where(is_ring[:, None], RK + ring_off, K + hist_off)
            vp = tl.where(is_ring[:, None], RV + ring_off, V + hist_off)
        else:
            valid = in_range
            off = (b * skb + h * skh + j.to(tl.int64) * skn)[:, None] + d[None, :]
            kp = K + off
            vp = V + off
        lmask = valid[:, None] & dmask[None, :]
        m, l, acc = _online_update(q, kp, vp, valid, lmask, m, l, acc, scale, PRECISION, UPCAST)
        if TAIL:  # the values were just loaded, so this load hits the cache: reusing them in registers
            # cost more (H200, 1M keys: the tail took 23-27% over dropping against 10-15% this way)
            kept = tl.load(vp, mask=(valid & gather_ok)[:, None] & dmask[None, :], other=0.0)
            kept_sum += tl.sum(kept.to(tl.float32), 0)
    lse = tl.where(l > 0, m + tl.log(l), float("-inf"))
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if DIRECT:  # a single split: this is the final result, skip the reduction launch
        head = pid_bh * G + g  # = b * Hq + query head
        if TAIL:
            out = _mix_tail(out, lse, kept_sum, pid_bh, g, gmask, BOUNDS, COUNT, TH, TAIL_U, TAIL_L, GTOP, VSUM,
                            G, G_PAD, D, D_PAD, NB)
        tl.store(OUT + head[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
        tl.store(LSE + head, lse, mask=gmask)
        if BOUNDED:
            _store_bound(LOG_REST, BOUND, head, lse, gmask)
        return
    part = pid_bh * n_splits + split
    tl.store(OP + (part * G_PAD + g)[:, None] * D_PAD + d[None, :], out)
    tl.store(LP + part * G_PAD + g, lse)
    if TAIL:
        tl.store(VKP + part * D_PAD + d, kept_sum)


@triton.jit
def _mix_tail(out, lse, kept_sum, bh, g, gmask, BOUNDS, COUNT, TH, TAIL_U, TAIL_L, GTOP, VSUM,
              G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, NB: tl.constexpr):
    """reference.estimate_tail for the query heads g [R] of KV group bh: out [R, D_PAD] and lse
    [R] are the attended set's, kept_sum [D_PAD] its candidates' plain value sum."""
    i = tl.arange(0, G_PAD)
    lowest = tl.min(tl.load(TH + bh * G + i, mask=i < G, other=2147483647), 0)
    j = tl.load(GTOP + bh * G) - lowest + 1  # the first bin no head of the group keeps
    at = (bh * G + g) * NB + tl.minimum(tl.maximum(j, 0), NB - 1)
    log_mass = (TAIL_WEIGHT * tl.load(TAIL_U + at, mask=gmask, other=float("-inf")) +
                (1 - TAIL_WEIGHT) * tl.load(TAIL_L + at, mask=gmask, other=float("-inf")))
    w = tl.where(j < NB, 1 / (1 + tl.exp(lse - log_mass)), 0.0)
    d = tl.arange(0, D_PAD)
    left = tl.load(BOUNDS + 2) - tl.load(BOUNDS + 1) - tl.load(COUNT + bh)
    mean = (tl.load(VSUM + bh * D + d, mask=d < D, other=0.0) - kept_sum) / tl.maximum(left, 1).to(tl.float32)
    return (1 - w)[:, None] * out + w[:, None] * mean[None, :]


@triton.jit
def _store_bound(LOG_REST, BOUND, head, lse, mask):
    """The certified bound on the mass left out, U / (Z_set + U) = sigmoid(log U - lse)."""
    tl.store(BOUND + head, 1 / (1 + tl.exp(lse - tl.load(LOG_REST + head, mask=mask, other=0.0))), mask=mask)


@triton.jit
def _attn_reduce(OP, LP, OUT, LSE, DROPPED, LOG_REST, BOUND, BOUNDS, COUNT, TH, TAIL_U, TAIL_L, GTOP, VSUM, VKP,
                 n_splits, eps, G: tl.constexpr, G_PAD: tl.constexpr,
                 D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, FALL_BACK: tl.constexpr,
                 BOUNDED: tl.constexpr, TAIL: tl.constexpr, NB: tl.constexpr):
    pid = tl.program_id(0)  # = b * Hq + query head, since query head = kv head * G + g
    bh = pid // G
    if FALL_BACK:
        if tl.load(DROPPED + pid) < eps:
            return
    g = pid % G
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    smask = s < n_splits
    lse_s = tl.load(LP + (bh * n_splits + s) * G_PAD + g, mask=smask, other=float("-inf"))
    mx = tl.max(lse_s, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse_s - mx_safe)
    o = tl.load(OP + ((bh * n_splits + s) * G_PAD + g)[:, None] * D_PAD + d[None, :], mask=smask[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    lse = mx_safe + tl.log(total)
    if TAIL:
        kept_sum = tl.sum(tl.load(VKP + (bh * n_splits + s)[:, None] * D_PAD + d[None, :], mask=smask[:, None],
                                  other=0.0), 0)
        one = tl.arange(0, 1)
        out = tl.sum(_mix_tail(out[None, :], lse + tl.zeros([1], tl.float32), kept_sum, bh, g + one, one < 1, BOUNDS,
                               COUNT, TH, TAIL_U, TAIL_L, GTOP, VSUM, G, G_PAD, D, D_PAD, NB), 0)
    tl.store(OUT + pid * D + d, out.to(OUT.dtype.element_ty), mask=d < D)
    tl.store(LSE + pid, lse)
    if BOUNDED:
        _store_bound(LOG_REST, BOUND, pid, lse, True)


LAUNCHES: list | None = None  # when a list, every launch appends (kernel, grid, scalar args, constexprs)


def _launch(kernel, grid: tuple, *args, **meta) -> None:
    if LAUNCHES is not None:
        scalars = tuple(a for a in args if not isinstance(a, torch.Tensor))
        LAUNCHES.append((kernel.fn.__name__, grid, scalars, tuple(sorted(meta.items()))))
    kernel[grid](*args, **meta)


def _pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(x))


INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
FP8_MAX: tl.constexpr = tl.constexpr(reference.FP8_MAX)


def _precision(t: torch.Tensor) -> dict:
    return dict(PRECISION="ieee" if t.dtype == torch.float32 else "tf32",
                UPCAST=INTERPRETED.value and t.dtype == torch.bfloat16)


# Launch settings of the decode kernels; bench/tune_decode.py measures the alternatives.
DECODE = {"block_n": 64, "programs_per_sm": 2, "num_warps": 4, "num_stages": 3, "min_blocks": 4}
# A sparse step gathers a few hundred keys through dependent loads (index, then key): latency,
# not bandwidth, so every block of 32 gets its own program.
SPARSE = {**DECODE, "block_n": 32, "min_blocks": 1}
# page_filtered_attention gathers up to the whole cache (tens of thousands of kept keys per KV head
# at 1M), and its grid is sized before the list's length is known: many small programs of 64
# (bench/tune_gather.py, H200: 9.5 against 16.1 us at 128K, 23.8 against 69.7 at 1M with SPARSE's).
KEPT_GATHER = {**SPARSE, "block_n": 64, "num_warps": 2, "num_stages": 2, "programs_per_sm": 8}


def _splits(n_keys: int, programs: int, cfg: dict, device: torch.device) -> int:
    """Enough splits to give every SM `programs_per_sm` programs, each with at least `min_blocks` blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(n_keys, cfg["min_blocks"] * cfg["block_n"]),
                      triton.cdiv(cfg["programs_per_sm"] * sms, programs), 256))


def _attention(q, k, v, bounds, max_keys: int, sparse=None, out=None, config: dict | None = None, count=None,
               fall=None, log_rest=None, tail=None, bound=None):
    """Split-K attention over at most max_keys keys (the grid's size); the live count is read from bounds.
    sparse: (ring_k, ring_v, idx), the window and gathered positions; count [B, Hkv] (int32): if
    given, only the first count entries of each group's idx are read.
    fall: (dropped [B, Hq], eps, falls): only the rows of heads whose dropped >= eps are written (a
    KV group without one reads nothing), their number added to falls (int64).
    log_rest [B, Hq]: also returns the bound sigmoid(log_rest - lse), written into bound if given.
    tail: (threshold, reference.Tail) with sparse and count: the candidates left out estimated
    (reference.estimate_tail), from the gathered ones' plain value sum."""
    cfg = {**DECODE, **(config or {})}
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride() == k.stride()
    G_PAD, D_PAD = _pow2(G), _pow2(D)
    S = _splits(max_keys, B * Hkv, cfg, q.device)
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty(B, Hq, device=q.device, dtype=torch.float32)
    direct = S == 1
    op = lp = out  # partials are only needed when several splits must be merged
    if not direct:
        op = torch.empty(B * Hkv * S, G_PAD, D_PAD, device=q.device, dtype=torch.float32)
        lp = torch.empty(B * Hkv * S, G_PAD, device=q.device, dtype=torch.float32)
    ring_k = ring_v = idx = k  # unused unless sparse
    W = n_gather = 0
    if sparse is not None:
        ring_k, ring_v, idx = sparse
        assert ring_v.stride() == ring_k.stride() and ring_k.stride(-1) == 1
        W = ring_k.shape[2]
        assert idx.stride(-1) == 1
        n_gather = idx.shape[2]
    dropped, eps, falls = fall if fall is not None else (lse, 0.0, lse)
    if log_rest is None:
        bound = lse
    elif bound is None:
        bound = torch.empty_like(lse)
    assert bound.is_contiguous() and bound.shape == lse.shape
    log_rest = lse if log_rest is None else log_rest
    assert dropped.is_contiguous() and log_rest.is_contiguous()
    flags = dict(FALL_BACK=fall is not None, BOUNDED=bound is not lse, TAIL=tail is not None, NB=reference.PAGE_BINS)
    th = t_u = t_l = gtop = vsum = vkp = lse  # unused unless tail
    if tail is not None:
        assert count is not None
        th, buffers = tail
        t_u, t_l, gtop, vsum = buffers.log_u, buffers.log_l, buffers.group_top, buffers.value_sum
        assert all(x.is_contiguous() for x in (th, t_u, t_l, gtop, vsum))
        vkp = lse if direct else torch.empty(B * Hkv * S, D_PAD, device=q.device, dtype=torch.float32)
    tails = (th, t_u, t_l, gtop, vsum, vkp)
    _launch(_attn_partial, (B * Hkv, S),
        q, k, v, ring_k, ring_v, idx, bounds if count is None else count, op, lp, out, lse, bounds, dropped, falls,
        log_rest, bound, *tails,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), *ring_k.stride()[:3], *idx.stride()[:2],
        W, n_gather, 1.0 / math.sqrt(D), Hkv, eps,
        G=G, G_PAD=G_PAD, D=D, D_PAD=D_PAD, BLOCK_N=cfg["block_n"], SPARSE=sparse is not None,
        COUNTED=count is not None, **_precision(q), DIRECT=direct, **flags,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not direct:
        _launch(_attn_reduce, (B * Hq,), op, lp, out, lse, dropped, log_rest, bound, bounds,
                bounds if count is None else count, *tails, S, eps, G=G, G_PAD=G_PAD,
                D=D, D_PAD=D_PAD, S_PAD=_pow2(S, 1), **flags)
    return (out, lse, bound) if flags["BOUNDED"] else (out, lse)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds=None, out: torch.Tensor | None = None,
                     config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode attention over the first n positions of k/v [B, Hkv, capacity, D], n from
    bounds (all of them if None); see reference.decode_attention."""
    bounds = reference.as_bounds(bounds, k.shape[2], q.device)
    return _attention(q, k, v, bounds, k.shape[2], None, out, config)


def fall_back(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds, out: torch.Tensor, dropped: torch.Tensor,
              eps: float, falls: torch.Tensor) -> torch.Tensor:
    """See reference.fall_back. One launch (two with split-K): programs of KV groups where no
    head falls back exit at once, reading nothing."""
    bounds = reference.as_bounds(bounds, k.shape[2], q.device)
    return _attention(q, k, v, bounds, k.shape[2], None, out, fall=(dropped, eps, falls))[0]


def sparse_attention(q, ring_k, ring_v, k, v, idx, bounds, anchor: int, out: torch.Tensor | None = None,
                     tail=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Window ∪ anchor ∪ gathered positions idx [B, Hkv, K]; see reference.sparse_attention. The
    tail estimate has no kernel yet (a cache's plan refuses it on this path)."""
    assert tail is None
    bounds = reference.as_bounds(bounds, None, q.device, anchor, ring_k.shape[2])
    return _attention(q, k, v, bounds, ring_k.shape[2] + anchor + idx.shape[2], (ring_k, ring_v, idx.contiguous()),
                      out, SPARSE)


def page_filtered_attention(q, ring_k, ring_v, k, v, page_bin, threshold, log_rest, bounds, anchor: int,
                            page_size: int, out: torch.Tensor | None = None, tail: reference.Tail | None = None,
                            bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window ∪ anchor ∪ the kept pages' candidates, and the bound, written into `bound` if given
    (with tail, the rest estimated); see reference.page_filtered_attention. The kept positions are
    first compacted, in order, into a list the gathering kernel reads: it reads only them."""
    bounds = reference.as_bounds(bounds, None, q.device, anchor, ring_k.shape[2])
    idx, count = kept_list(page_bin, threshold, bounds, page_size, k.shape[2])
    return _attention(q, k, v, bounds, ring_k.shape[2] + anchor + k.shape[2], (ring_k, ring_v, idx), out, KEPT_GATHER,
                      count=count, log_rest=log_rest, tail=None if tail is None else (threshold, tail), bound=bound)


@triton.jit
def _next_step(POS, BOUNDS, anchor, window):
    p = tl.load(POS) + 1
    tl.store(POS, p)
    n = (p + 1).to(tl.int32)
    lo = tl.minimum(n, anchor)
    tl.store(BOUNDS, n)
    tl.store(BOUNDS + 1, lo)
    tl.store(BOUNDS + 2, tl.maximum(lo, n - window))


def next_step(position: torch.Tensor, bounds: torch.Tensor, anchor: int, window: int) -> None:
    """reference.next_step in one launch (five PyTorch ops there)."""
    _launch(_next_step, (1,), position, bounds, anchor, window)


@triton.jit
def _append(KN, VN, K, V, RK, RV, KMIN, KMAX, BOUNDS, W, P, snb, snh, svb, svh, skb, skh, skn, srb, srh, srn, spb, sph, spn, Hkv,
            D: tl.constexpr, D_PAD: tl.constexpr, RING: tl.constexpr, PAGES: tl.constexpr):
    pid = tl.program_id(0)
    pos = tl.load(BOUNDS) - 1  # the new key is the last of the step's n
    b = pid // Hkv
    h = pid % Hkv
    d = tl.arange(0, D_PAD)
    dmask = d < D
    kn = tl.load(KN + b * snb + h * snh + d, mask=dmask)
    vn = tl.load(VN + b * svb + h * svh + d, mask=dmask)
    hist = b * skb + h * skh + pos.to(tl.int64) * skn + d
    tl.store(K + hist, kn, mask=dmask)
    tl.store(V + hist, vn, mask=dmask)
    if RING:
        ring = b * srb + h * srh + (pos % W) * srn + d
        tl.store(RK + ring, kn, mask=dmask)
        tl.store(RV + ring, vn, mask=dmask)
    if PAGES:
        _update_page(KMIN, KMAX, b * spb + h * sph + (pos // P) * spn + d, kn, pos % P == 0, dmask)


@triton.jit
def _update_page(KMIN, KMAX, off, key, first, mask):
    """Fold a new key (elements at off, where mask) into its page's min/max summaries; a key that
    is first of its page (first) starts them."""
    kf = key.to(tl.float32)  # compare in fp32 (exact; the interpreter mishandles bf16 max)
    lo = _widen(tl.load(KMIN + off, mask=mask), tl.float32)
    hi = _widen(tl.load(KMAX + off, mask=mask), tl.float32)
    # NaN (an fp8 summary with no bound) must stay: by default tl.minimum drops it
    lo = tl.where(first, kf, tl.minimum(lo, kf, propagate_nan=tl.PropagateNan.ALL))
    hi = tl.where(first, kf, tl.maximum(hi, kf, propagate_nan=tl.PropagateNan.ALL))
    if KMIN.dtype.element_ty == tl.float8e4nv:  # rounding is monotone: rounding the new min suffices
        lo = _fp8_outward(lo, False)
        hi = _fp8_outward(hi, True)
    tl.store(KMIN + off, lo.to(KMIN.dtype.element_ty), mask=mask)
    tl.store(KMAX + off, hi.to(KMAX.dtype.element_ty), mask=mask)


@triton.jit
def _widen(x, dtype: tl.constexpr):
    """x (a page summary) as dtype. The interpreter widens fp8 NaN to a number (Triton 3.9), so
    there NaN is recognised by its bits; compiled, the conversion keeps NaN by itself."""
    if INTERPRETED and x.dtype == tl.float8e4nv:
        return tl.where((x.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F, float("nan"), x.to(tl.float32)).to(dtype)
    return x.to(dtype)


@triton.jit
def _fp8_outward(x, UP: tl.constexpr):
    """fp32 x as float8_e4m3fn rounded toward +inf (UP) or -inf, NaN where no fp8 bound exists
    (past +448 up, -448 down) or x is NaN, saturated the other way: the arithmetic of
    reference.round_outward, so both give the same values."""
    e = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 + 3 - e) << 23).to(tl.float32, bitcast=True)
    r = (tl.ceil(x * inv_ulp) if UP else tl.floor(x * inv_ulp)) * ulp  # on the grid: converts exactly
    # NaN written as its bits: the interpreter converts a float NaN to fp8 384 (Triton 3.9)
    nan = tl.full(r.shape, 0x7F, tl.uint8).to(tl.float8e4nv, bitcast=True)
    unbounded = (r > FP8_MAX) if UP else (r < -FP8_MAX)
    r_sat = tl.minimum(tl.maximum(r, -FP8_MAX), FP8_MAX)
    return tl.where(unbounded | (r != r), nan, r_sat.to(tl.float8e4nv))


def append_kv(k_store, v_store, ring_k, ring_v, kmin, kmax, k, v, start, page_size: int) -> None:
    """One-token append (k/v [B, Hkv, 1, D]) in one launch at position start (an int, or the
    step's bounds: position n - 1); see reference.append_kv."""
    B, Hkv, T, D = k.shape
    ring, pages = ring_k is not None, kmin is not None
    ring_k, ring_v = (ring_k, ring_v) if ring else (k_store, v_store)
    assert T == 1 and k.stride(-1) == v.stride(-1) == 1 and k_store.stride() == v_store.stride() and ring_k.stride() == ring_v.stride()
    bounds = start if isinstance(start, torch.Tensor) else reference.step_bounds(start + 1, 0, 0, k.device)
    _launch(_append, (B * Hkv,),
        k, v, k_store, v_store, ring_k, ring_v, kmin if pages else k, kmax if pages else k, bounds, ring_k.shape[2], page_size,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_store.stride()[:3], *ring_k.stride()[:3], *(kmin.stride()[:3] if pages else (0, 0, 0)),
        Hkv, D=D, D_PAD=_pow2(D), RING=ring, PAGES=pages,
    )


@triton.jit
def _block_scores(Q, K, K2, b, h, pos, valid, sqb, sqh, skb, skh, skn, scale,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                  BOUND: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Scores at rows pos of KV head (b, h), max over the group's query heads, -inf where not
    valid: q·K[pos], or with BOUND the Quest page bound q+·K[pos] + q-·K2[pos] (K = page max,
    K2 = page min)."""
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < G
    dmask = d < D
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    off = (b * skb + h * skh + pos.to(tl.int64) * skn)[:, None] + d[None, :]
    lmask = valid[:, None] & dmask[None, :]
    k = tl.load(K + off, mask=lmask, other=0.0)
    if BOUND:  # summaries may be fp8: widened to the query's dtype, exactly
        k = _widen(k, q.dtype)
        kmin = _widen(tl.load(K2 + off, mask=lmask, other=0.0), q.dtype)
        qf = q.to(tl.float32)  # split signs in fp32 (exact; also sidesteps the interpreter's bf16)
        s = _dot(tl.maximum(qf, 0.0).to(q.dtype), tl.trans(k), PRECISION, UPCAST)
        s += _dot(tl.minimum(qf, 0.0).to(q.dtype), tl.trans(kmin), PRECISION, UPCAST)
        s = tl.where(s != s, float("inf"), s)  # NaN: an fp8 summary past its range, no bound
    else:
        s = _dot(q, tl.trans(k), PRECISION, UPCAST)
    s = tl.where(gmask[:, None] & valid[None, :], s * scale, float("-inf"))
    return tl.max(s, 0)


LOWEST: tl.constexpr = tl.constexpr(-9223372036854775807 - 1)  # packed key of a masked entry


@triton.jit
def _keys(x, i):
    """fp32 scores and int indices -> int64 keys whose integer order is the score order (ties:
    larger index first), so top-k over the keys carries the indices along; -inf -> LOWEST."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    return tl.where(x == float("-inf"), LOWEST, (ordered.to(tl.int64) << 32) | i.to(tl.int64))


@triton.jit
def _index(key):
    return tl.where(key == LOWEST, -1, key & 0xFFFFFFFF)


@triton.jit
def _token_keys(Q, K, b, h, pages, lo, hi, P, sqb, sqh, skb, skh, skn, scale,
                G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, N_PAGES: tl.constexpr,
                P_PAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Keys (see _keys) of q·k at every token of pages [N_PAGES] (-1: none) that lies in [lo, hi)."""
    t = tl.arange(0, P_PAD)
    pos = pages[:, None].to(tl.int64) * P + t[None, :]
    valid = (pages[:, None] >= 0) & (t[None, :] < P) & (pos >= lo) & (pos < hi)
    pos = tl.reshape(pos, [N_PAGES * P_PAD])
    s = _block_scores(Q, K, K, b, h, pos, tl.reshape(valid, [N_PAGES * P_PAD]), sqb, sqh, skb, skh, skn, scale,
                      G, G_PAD, D, D_PAD, False, PRECISION, UPCAST)
    return _keys(s, pos)


@triton.jit
def _scan(
    Q, K, K2, V0, V1, BOUNDS, sqb, sqh, skb, skh, skn, P, scale, Hkv, n0, n1,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    R: tl.constexpr, FAN: tl.constexpr, BOUND: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Selection pass 1, bandwidth-bound, no top-k: each program scans one run of FAN pages of one
    KV head (row) and writes V0 = each page's max score (exact q·k over R = P positions [lo, hi)
    of K, or with BOUND the Quest bound of the summaries K/K2 of pages [lo // P, cdiv(hi, P)),
    R = 1) and V1 = the run's max. The grid covers the capacity; runs past the live range only
    mark themselves empty."""
    row = tl.program_id(0)
    run = tl.program_id(1)
    lo = tl.load(BOUNDS + 1)
    hi = tl.load(BOUNDS + 2)
    if BOUND:
        n, lo = tl.cdiv(hi, P), lo // P
    else:
        n = hi
    if run * FAN * R >= n:
        tl.store(V1 + row * n1 + run, float("-inf"))
        return
    best = tl.full([BLOCK_N // R], float("-inf"), tl.float32)
    for j0 in range(run * FAN * R, (run + 1) * FAN * R, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        s = _block_scores(Q, K, K2, row // Hkv, row % Hkv, j, (j < n) & (j >= lo), sqb, sqh, skb, skh, skn, scale,
                          G, G_PAD, D, D_PAD, BOUND, PRECISION, UPCAST)
        v = tl.max(tl.reshape(s, [BLOCK_N // R, R]), 1)
        i = j0 // R + tl.arange(0, BLOCK_N // R)
        tl.store(V0 + row * n0 + i, v, mask=i < n0)
        best = tl.maximum(best, v)
    tl.store(V1 + row * n1 + run, tl.max(best, 0))


@triton.jit
def _pick(
    Q, K, V0, V1, SCR, OUT, BOUNDS, sqb, sqh, skb, skh, skn, n0, n1, P, n_pages, scale, Hkv, k_out,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, N1_PAD: tl.constexpr,
    FAN: tl.constexpr, S_PAD: tl.constexpr, P_PAD: tl.constexpr, CHUNK: tl.constexpr, K_PAD: tl.constexpr,
    WHOLE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Selection pass 2, one program per KV head. The n_pages best pages (by V0) lie in the
    n_pages best runs (by V1), so only those runs' pages are ranked; then the chosen pages'
    tokens are scored exactly and the k_out best positions written (-1 where fewer are valid),
    or with WHOLE every position of the chosen pages (k_out = n_pages * P; -1 outside [lo, hi))."""
    row = tl.program_id(0)
    b = row // Hkv
    h = row % Hkv
    lo = tl.load(BOUNDS + 1)
    hi = tl.load(BOUNDS + 2)
    i1 = tl.arange(0, N1_PAD)
    v1 = tl.load(V1 + row * n1 + i1, mask=i1 < n1, other=float("-inf"))
    runs = _index(tl.topk(_keys(v1, i1), S_PAD))
    e = runs[:, None] * FAN + tl.arange(0, FAN)[None, :]
    v0 = tl.load(V0 + row * n0 + e, mask=(runs[:, None] >= 0) & (e < n0), other=float("-inf"))
    r = tl.arange(0, S_PAD)
    pages = tl.where(r < n_pages, _index(tl.topk(tl.reshape(_keys(v0, e), [S_PAD * FAN]), S_PAD)), -1)
    if WHOLE:
        t = tl.arange(0, P_PAD)
        pos = pages[:, None].to(tl.int64) * P + t[None, :]
        ok = (pages[:, None] >= 0) & (pos >= lo) & (pos < hi)
        tl.store(OUT + row * k_out + r[:, None] * P + t[None, :], tl.where(ok, pos, -1),
                 mask=(r[:, None] < n_pages) & (t[None, :] < P))
        return
    if S_PAD <= CHUNK:  # every chosen token fits one tile
        best = tl.topk(_token_keys(Q, K, b, h, pages, lo, hi, P, sqb, sqh, skb, skh, skn, scale, G, G_PAD, D, D_PAD,
                                   S_PAD, P_PAD, PRECISION, UPCAST), K_PAD)
    else:  # CHUNK pages at a time through a scratch row
        for c0 in range(0, S_PAD, CHUNK):
            sel = (c0 + tl.arange(0, CHUNK))[:, None] == r[None, :]
            chunk = tl.max(tl.where(sel, pages[None, :], -1), 1)  # pages c0 .. c0 + CHUNK - 1
            keys = _token_keys(Q, K, b, h, chunk, lo, hi, P, sqb, sqh, skb, skh, skn, scale, G, G_PAD, D, D_PAD,
                               CHUNK, P_PAD, PRECISION, UPCAST)
            tl.store(SCR + row * S_PAD * P_PAD + c0 * P_PAD + tl.arange(0, CHUNK * P_PAD), keys)
        tl.debug_barrier()  # the scratch row is read back by other threads of this program
        best = tl.topk(tl.load(SCR + row * S_PAD * P_PAD + tl.arange(0, S_PAD * P_PAD)), K_PAD)
    kk = tl.arange(0, K_PAD)
    tl.store(OUT + row * k_out + kk, _index(best), mask=kk < k_out)


# Selection settings (bench/tune_select.py). FAN pages per pass-1 program bound pass 2's work: it
# ranks n_pages * FAN page maxima and scores n_pages * page_size tokens in one program, so both
# are capped; tokens are scored token_block at a time (as many bytes of keys for other sizes).
SELECT = {"scan_block": 128, "fan": 64, "token_block": 256, "scan_warps": 4, "pick_warps": 8}
EXACT_PAGE = 32  # exact selection ranks virtual pages of this many positions by their exact max
_MAX_RUNS, _MAX_RANKED, _MAX_TOKENS = 4096, 4096, 8192


def _fits(n0: int, n_pages: int, page_size: int) -> bool:
    fan = SELECT["fan"]
    return (0 < n_pages and _pow2(triton.cdiv(n0, fan), 1) <= _MAX_RUNS and _pow2(n_pages, 2) * fan <= _MAX_RANKED
            and _pow2(n_pages, 2) * _pow2(page_size, 1) <= _MAX_TOKENS)


def _select_topk(q: torch.Tensor, k: torch.Tensor, bounds: torch.Tensor, page_size: int, n_pages: int, take: int,
                 kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None, whole: bool = False) -> torch.Tensor:
    """Positions [B, Hkv, take] (-1 where fewer are valid): the best `take` of the tokens of the
    n_pages best pages in [lo, hi) (from bounds), pages ranked by exact max (kmin/kmax None) or by
    their Quest bound from kmin/kmax; whole: all of those pages' tokens (take = n_pages *
    page_size). Grids and buffers are sized for k's capacity."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    rows, P, fan = B * Hkv, page_size, SELECT["fan"]
    assert k.stride(-1) == 1 and (kmin is None or (kmin.stride() == kmax.stride() and kmax.stride(-1) == 1))
    n0 = triton.cdiv(k.shape[2], P)  # every page the capacity holds
    R, scan_k, scan_k2 = (P, k, k) if kmin is None else (1, kmax, kmin)
    n1 = triton.cdiv(n0, fan)
    consts = dict(G=Hq // Hkv, G_PAD=_pow2(Hq // Hkv), D=D, D_PAD=_pow2(D), **_precision(q))
    v0 = torch.empty(rows, n0, device=q.device, dtype=torch.float32)
    v1 = torch.empty(rows, n1, device=q.device, dtype=torch.float32)
    _launch(_scan, (rows, n1),
        q, scan_k, scan_k2, v0, v1, bounds, q.stride(0), q.stride(1), *scan_k.stride()[:3], P,
        1.0 / math.sqrt(D), Hkv, n0, n1, BLOCK_N=max(R, min(SELECT["scan_block"], fan * R)), R=R, FAN=fan,
        BOUND=kmin is not None, **consts, num_warps=SELECT["scan_warps"],
    )
    # sizes >= 2: tl.topk(x, 1) fails to compile in Triton 3.6
    S_PAD, P_PAD, K_PAD = _pow2(n_pages, 2), _pow2(P, 1), _pow2(take, 2)
    tokens = SELECT["token_block"] * 128 // (_pow2(D) * k.element_size())  # token_block is for 64 fp16 dims
    chunk = min(S_PAD, max(1, tokens // P_PAD))
    scratch = torch.empty(rows, S_PAD * P_PAD if S_PAD > chunk and not whole else 1, device=q.device, dtype=torch.int64)
    out = torch.empty(B, Hkv, take, device=q.device, dtype=torch.int64)
    _launch(_pick, (rows,),
        q, k, v0, v1, scratch, out, bounds, q.stride(0), q.stride(1), *k.stride()[:3], n0, n1, P, n_pages,
        1.0 / math.sqrt(D), Hkv, take, N1_PAD=max(_pow2(n1, 1), S_PAD), FAN=fan, S_PAD=S_PAD, P_PAD=P_PAD,
        CHUNK=chunk, K_PAD=K_PAD, WHOLE=whole, **consts, num_warps=SELECT["pick_warps"],
    )
    return out


def can_exact_select(capacity: int, k_top: int) -> bool:
    return k_top > 0 and _fits(triton.cdiv(capacity, EXACT_PAGE), k_top, EXACT_PAGE)


def exact_select(q: torch.Tensor, k: torch.Tensor, bounds, k_top: int) -> torch.Tensor:
    """Exact group-max top-k over positions [lo, hi) of k [B, Hkv, capacity, D]; see
    reference.exact_select. The top k positions lie in the k pages with the largest maxima, so
    only those pages (oversampling by the page size) are scored twice."""
    bounds = reference.as_bounds(bounds, k.shape[2], q.device)
    return _select_topk(q, k, bounds, EXACT_PAGE, k_top, k_top)


def can_page_select(capacity: int, k_top: int, page_size: int, oversample: float, whole: bool = False) -> bool:
    n_sel = reference.pages_taken(k_top, page_size, oversample, whole)
    return k_top > 0 and _fits(triton.cdiv(capacity, page_size), n_sel, page_size)


def page_select(q: torch.Tensor, k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, bounds,
                k_top: int, page_size: int, oversample: float, scope: str = "group", whole: bool = False) -> torch.Tensor:
    """Quest-style selection, one list per KV group; see reference.page_select."""
    assert scope == "group", "the kernel keeps one list per KV group"
    bounds = reference.as_bounds(bounds, k.shape[2], q.device)
    n_sel = reference.pages_taken(k_top, page_size, oversample, whole)
    return _select_topk(q, k, bounds, page_size, n_sel, n_sel * page_size if whole else k_top, kmin, kmax, whole)


NO_PAGE: tl.constexpr = tl.constexpr(reference.NO_PAGE)
MAX_BIN: tl.constexpr = tl.constexpr(reference.MAX_BIN)
BIN_WIDTH: tl.constexpr = tl.constexpr(reference.BIN_WIDTH)
KEPT_MARGIN: tl.constexpr = tl.constexpr(reference.KEPT_MARGIN)
TAIL_WEIGHT: tl.constexpr = tl.constexpr(reference.TAIL_WEIGHT)
OFFSET_SLACK: tl.constexpr = tl.constexpr(reference.OFFSET_SLACK)


@triton.jit
def _from_int8(k, dtype: tl.constexpr):
    """k (int8) as dtype, exactly. For fp16 and bf16 by the magic-number trick on four packed bytes
    at a time (x + 128 as the low mantissa bits of 1024, or of 2^23 in fp32), which costs a third
    of Triton's one conversion per value; opaque (not pure) so that it runs where it stands, on the
    loaded tile, before the tile goes to shared memory."""
    if INTERPRETED or (dtype != tl.float16 and dtype != tl.bfloat16):
        return k.to(tl.float32).to(dtype)  # through fp32: the interpreter turns int8 to bf16 into NaN
    elif dtype == tl.float16:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, c;
            xor.b32 t, $2, 0x80808080;
            mov.b32 c, 0x64806480;
            prmt.b32 $0, t, 0x64646464, 0x4140;
            prmt.b32 $1, t, 0x64646464, 0x4342;
            sub.f16x2 $0, $0, c;
            sub.f16x2 $1, $1, c;
            }""", "=r,=r,r", [k], dtype=tl.float16, is_pure=False, pack=4)
    else:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, a, b, c, d;
            xor.b32 t, $2, 0x80808080;
            prmt.b32 a, t, 0x4b000000, 0x7540;
            prmt.b32 b, t, 0x4b000000, 0x7541;
            prmt.b32 c, t, 0x4b000000, 0x7542;
            prmt.b32 d, t, 0x4b000000, 0x7543;
            sub.f32 a, a, 0f4B000080;
            sub.f32 b, b, 0f4B000080;
            sub.f32 c, c, 0f4B000080;
            sub.f32 d, d, 0f4B000080;
            cvt.rn.bf16x2.f32 $0, b, a;
            cvt.rn.bf16x2.f32 $1, d, c;
            }""", "=r,=r,r", [k], dtype=tl.bfloat16, is_pure=False, pack=4)


@triton.jit
def _int8_at(KQ, KS, q, q_err, q_off, q_off_err, b, h, pos, live, skb, skh, skn, ssb, ssh, sqrt_d,
             D: tl.constexpr, D_PAD: tl.constexpr, HALF: tl.constexpr, SLACK: tl.constexpr, PRECISION: tl.constexpr,
             UPCAST: tl.constexpr, KEYS_MAJOR: tl.constexpr):
    """Logit estimates and their error bounds [rows of q, len(pos)] from the int8 copies at pos
    (where live; as reference.shadow_scores, q_off and q_off_err per row: reference.offset_terms),
    or [len(pos), rows] when KEYS_MAJOR (the keys' tile is then the product's first operand, which
    needs no transposition and lets a long tile of keys use Hopper's warp-group product)."""
    d = tl.arange(0, D_PAD)
    k = tl.load(KQ + (b * skb + h * skh + pos * skn)[:, None] + d[None, :], mask=live[:, None] & (d < D)[None, :],
                other=0)
    s = tl.load(KS + b * ssb + h * ssh + pos, mask=live, other=0.0)
    # in q's dtype: int8 values are exact in bf16 and fp16, so each product is exact in fp32
    k = _from_int8(k, q.dtype)
    if KEYS_MAJOR:
        est = _dot(k, tl.trans(q), PRECISION, UPCAST) * (s / sqrt_d)[:, None] + q_off[None, :]
        err = q_err[None, :] * s[:, None] * HALF + SLACK + q_off_err[None, :]
    else:
        est = _dot(q, tl.trans(k), PRECISION, UPCAST) * (s / sqrt_d)[None, :] + q_off[:, None]
        err = q_err[:, None] * s[None, :] * HALF + SLACK + q_off_err[:, None]
    return est, err


@triton.jit
def _int8_bounds(KQ, KS, q, q_err, q_off, q_off_err, b, h, c0, lo, hi, scored, skb, skh, skn, ssb, ssh, P, sqrt_d,
                 D: tl.constexpr, D_PAD: tl.constexpr, P_PAD: tl.constexpr, CH: tl.constexpr,
                 HALF: tl.constexpr, SLACK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """_int8_at for the positions of pages c0 .. c0 + CH - 1 [CH * P_PAD, rows of q], and which of
    them are candidates / scored non-candidates."""
    i = tl.arange(0, CH * P_PAD)
    t = i % P_PAD
    pos = (c0 + i // P_PAD).to(tl.int64) * P + t
    live = (t < P) & (pos < scored)
    cand = live & (pos >= lo) & (pos < hi)
    est, err = _int8_at(KQ, KS, q, q_err, q_off, q_off_err, b, h, pos, live, skb, skh, skn, ssb, ssh, sqrt_d,
                        D, D_PAD, HALF, SLACK, PRECISION, UPCAST, True)
    return est, err, cand, live & ~cand


@triton.jit
def _to_bin(x):
    """reference.to_bin: floor(x / BIN_WIDTH), clamped; NO_PAGE where x is -inf."""
    return tl.where(x > float("-inf"), tl.clamp(tl.floor(x / BIN_WIDTH), -MAX_BIN, MAX_BIN), NO_PAGE).to(tl.int32)


@triton.jit
def _group_bins(u, cand, rows, CH: tl.constexpr, P_PAD: tl.constexpr):
    """Each page's bin over its candidates and the group's query heads (rows), [CH] (int32)."""
    best = tl.max(tl.where(cand[:, None] & rows[None, :], u, float("-inf")), 1)
    if P_PAD > 1:
        best = tl.max(tl.reshape(best, [CH, P_PAD]), 1)
    return _to_bin(best)


@triton.jit
def _bf16_outward(x, up):
    """reference.bf16_outward: x >= 0 to bf16, rounded up where `up`, down elsewhere."""
    bits = x.to(tl.int32, bitcast=True)
    down = bits & -65536
    return tl.where(up & (down != bits), down + 65536, down).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _quantize_newest(K, KQ, KS, chan, offset, b, h, pos, sxb, sxh, sxn, skb, skh, skn, ssb, ssh, D: tl.constexpr,
                     D_PAD: tl.constexpr):
    """reference.quantize_keys of the key at pos with the channel scales chan and offsets offset
    [D_PAD] (round half to even, as torch.round)."""
    d = tl.arange(0, D_PAD)
    x = (tl.load(K + b * sxb + h * sxh + pos * sxn + d, mask=d < D, other=0.0).to(tl.float32) - offset) / chan
    scale = tl.max(tl.abs(x), 0) / 127
    y = x / tl.maximum(scale, 1.1754943508222875e-38)  # float32's smallest normal, the reference's clamp
    r = tl.floor(y + 0.5)
    r = tl.where((r - y == 0.5) & (r - 2 * tl.floor(r / 2) == 1), r - 1, r)
    tl.store(KQ + b * skb + h * skh + pos * skn + d, tl.clamp(r, -127.0, 127.0).to(tl.int8), mask=d < D)
    tl.store(KS + b * ssb + h * ssh + pos, scale)


@triton.jit
def _update_value_sum(V, VSUM, UPTO, b, h, row, lo, hi, sxb, sxh, sxn, D: tl.constexpr, D_PAD: tl.constexpr,
                      TB: tl.constexpr):
    """reference.update_value_sum for one KV head: the positions from UPTO to hi added (all of
    [lo, hi) when UPTO is outside it), TB at a time."""
    d = tl.arange(0, D_PAD)
    upto = tl.load(UPTO + row)
    restart = (upto < lo) | (upto > hi)
    acc = tl.load(VSUM + row * D + d, mask=d < D, other=0.0)
    acc = tl.where(restart, 0.0, acc)
    t = tl.arange(0, TB)
    for p0 in range(tl.where(restart, lo, upto), hi, TB):
        pos = p0 + t
        x = tl.load(V + b * sxb + h * sxh + pos.to(tl.int64)[:, None] * sxn + d[None, :],
                    mask=(pos < hi)[:, None] & (d < D)[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    tl.store(VSUM + row * D + d, acc, mask=d < D)
    tl.store(UPTO + row, hi)


@triton.jit
def _scaled_queries(Q, b, h, sqb, sqh, chan, real, G: tl.constexpr, G2: tl.constexpr, M: tl.constexpr,
                    D: tl.constexpr, D_PAD: tl.constexpr, DTYPE: tl.constexpr):
    """The group's queries times chan [D_PAD] in fp32, as DTYPE [M, D_PAD], each head in two rows
    (see _page_scan): times the channel scales (powers of two, so exact in Q's dtype), or the
    offsets (fp32, for q·offset)."""
    head = tl.arange(0, M) % G2
    d = tl.arange(0, D_PAD)
    q = tl.load(Q + b * sqb + (h * G + head)[:, None] * sqh + d[None, :], mask=real[:, None] & (d < D)[None, :],
                other=0.0)
    return (q.to(tl.float32) * chan[None, :]).to(DTYPE)


@triton.jit
def _key_frame(KC, KO, b, h, scb, sch, D: tl.constexpr, D_PAD: tl.constexpr):
    """KV head h's channel scales and offsets [D_PAD] (reference.key_frame), padded with 1 and 0."""
    d = tl.arange(0, D_PAD)
    return (tl.load(KC + b * scb + h * sch + d, mask=d < D, other=1.0),
            tl.load(KO + b * scb + h * sch + d, mask=d < D, other=0.0))


@triton.jit
def _query_terms(Q, chan, offset, b, h, real, sqb, sqh, sqrt_d, G: tl.constexpr, G2: tl.constexpr,
                 M: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """For the rows of a tile (see _scaled_queries): the group's queries times the channel scales
    (in Q's dtype), |q| summed (the error bound's factor), q·offset and its rounding bound."""
    q_times_offset = _scaled_queries(Q, b, h, sqb, sqh, offset, real, G, G2, M, D, D_PAD, tl.float32)
    q_off = tl.sum(q_times_offset, 1) / sqrt_d
    q_off_err = tl.sum(tl.abs(q_times_offset), 1) * OFFSET_SLACK / sqrt_d
    q = _scaled_queries(Q, b, h, sqb, sqh, chan, real, G, G2, M, D, D_PAD, Q.dtype.element_ty)
    q_err = tl.sum(tl.abs(q.to(tl.float32)), 1) / sqrt_d
    return q, q_err, q_off, q_off_err


@triton.jit
def _head_reduce(x, M: tl.constexpr, G2: tl.constexpr, MAX: tl.constexpr):
    """Each row's head's max (MAX) or sum of x [M] over its rows (row r serves head r % G2)."""
    x = tl.reshape(x, [M // G2, G2])
    x = tl.max(x, 0) if MAX else tl.sum(x, 0)
    return tl.reshape(tl.broadcast_to(x[None, :], [M // G2, G2]), [M])


@triton.jit
def _sampled_cut(Q, KQ, KS, KC, KO, BOUNDS, CUT, sqb, sqh, skb, skh, skn, ssb, ssh, scb, sch, sqrt_d, c, Hkv,
                 G: tl.constexpr, G2: tl.constexpr, M: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                 S: tl.constexpr, BT: tl.constexpr, NB: tl.constexpr, STEPS: tl.constexpr, HALF: tl.constexpr,
                 SLACK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """reference.sampled_cut, one program per KV group, rows as _page_scan's (each head's u, then
    its l, so a tile holds one exp per sample and row): the S samples in one tile, the anchor and
    window BT keys at a time (their top and mass online), then each head's number of kept bins by
    bisection, each step one sum over the samples of exp(u) past the mid bin less c times exp(l)
    before it (only its sign counts), not a histogram: the cut moves only the ranking, so the
    sums' order need not match the reference's."""
    row = tl.program_id(0)
    n = tl.load(BOUNDS)
    lo = tl.load(BOUNDS + 1)
    hi = tl.load(BOUNDS + 2)
    scored = n - 1
    b = row // Hkv
    h = row % Hkv
    r = tl.arange(0, M)
    head = r % G2
    upper = r < G2
    real = (r < 2 * G2) & (head < G)
    at = CUT + row * G + head
    if hi <= lo:  # no candidates: every cut is 0
        tl.store(at, tl.zeros([M], tl.int32), mask=upper & real)
        return
    chan, offset = _key_frame(KC, KO, b, h, scb, sch, D, D_PAD)
    q, q_err, q_off, q_off_err = _query_terms(Q, chan, offset, b, h, real, sqb, sqh, sqrt_d, G, G2, M, D, D_PAD)
    sign = tl.where(upper, 1.0, -KEPT_MARGIN)[:, None]  # the lower rows' l = est - KEPT_MARGIN * err
    i = tl.arange(0, S)
    pos = lo + ((2 * i.to(tl.int64) + 1) * (hi - lo)) // (2 * S)
    est, err = _int8_at(KQ, KS, q, q_err, q_off, q_off_err, b, h, pos, i < S, skb, skh, skn, ssb, ssh, sqrt_d,
                        D, D_PAD, HALF, SLACK, PRECISION, UPCAST, False)
    key_bin = _to_bin(est + err)  # each head's bins of u, in both its rows
    top = tl.max(key_bin, 1)
    # the anchor [0, lo) then the window [hi, scored), numbered 0 .. n_base - 1
    t = tl.arange(0, BT)
    n_base = tl.minimum(lo, scored) + tl.maximum(scored - hi, 0)
    base_top = tl.full([M], float("-inf"), tl.float32)
    base_mass = tl.zeros([M], tl.float32)  # the sum of exp(x - base_top), x = u or l
    for v0 in range(0, n_base, BT):
        v = v0 + t
        est_b, err_b = _int8_at(KQ, KS, q, q_err, q_off, q_off_err, b, h, tl.where(v < lo, v, hi + v - lo).to(tl.int64),
                                v < n_base, skb, skh, skn, ssb, ssh, sqrt_d, D, D_PAD, HALF, SLACK, PRECISION, UPCAST,
                                False)
        x = tl.where((v < n_base)[None, :], est_b + sign * err_b, float("-inf"))
        new_top = tl.maximum(base_top, tl.max(x, 1))
        safe = tl.where(new_top > float("-inf"), new_top, 0.0)
        base_mass = base_mass * tl.exp(base_top - safe) + tl.sum(tl.exp(x - safe[:, None]), 1)
        base_top = new_top
    base_u_top = _head_reduce(tl.where(upper, base_top, float("-inf")), M, G2, True)
    ref = (tl.maximum(top, _to_bin(base_u_top)) + 1).to(tl.float32) * BIN_WIDTH
    base_kept = tl.where(real & ~upper & (base_top > float("-inf")), base_mass * tl.exp(base_top - ref), 0.0)
    weight = (hi - lo).to(tl.float32) / S
    e = tl.where(real[:, None], tl.exp(est + sign * err - ref[:, None]) * weight, 0.0)
    e = tl.where(upper[:, None], e, -c * e)
    j = tl.minimum(top[:, None] - key_bin, NB - 1)
    c_base = _head_reduce(-c * base_kept, M, G2, False)
    first = tl.zeros([M], tl.int32)  # the answer lies in [first, last]: the first j that holds
    last = tl.full([M], NB, tl.int32)
    for _ in tl.static_range(STEPS):
        mid = (first + last) // 2
        side = tl.where(upper[:, None], j >= mid[:, None], j < mid[:, None])
        fails = _head_reduce(tl.sum(tl.where(side, e, 0.0), 1), M, G2, False) + c_base > 0  # rest > c kept
        open_ = first < last
        first = tl.where(open_ & fails, mid + 1, first)
        last = tl.where(open_ & ~fails, mid, last)
    need = tl.where(c > 0, first, NB)
    tl.store(at, top - need + 1, mask=upper & real)


@triton.jit
def _page_scan(
    Q, K, V, KQ, KS, KC, KO, BOUNDS, CUT, PAGE_BIN, GTOP, HTOP, HREST, HKEPT, HBASE, HLREST, VSUM, UPTO,
    sqb, sqh, sxb, sxh, sxn, skb, skh, skn, ssb, ssh, scb, sch, n_pages, n_blocks, P, sqrt_d, Hkv,
    G: tl.constexpr, G2: tl.constexpr, M: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    P_PAD: tl.constexpr, CH: tl.constexpr, NPB: tl.constexpr, NB: tl.constexpr, HALF: tl.constexpr,
    SLACK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, INTERP: tl.constexpr,
    TAIL: tl.constexpr,
):
    """page_threshold pass 1: one program reads the int8 copies of NPB pages of one KV head, once,
    and writes each page's group bin (each head's bounds lowered by its shift: how far its sampled
    cut, CUT, lies above the group's lowest; reference.cut_shift), the block's top bin (the
    group's, so shifted, and each head's own), and per query head the block's histogram over
    bins counted down from the group's top (exp relative to the head's top bin's upper edge): suffix sums of exp(u) and prefix sums of exp(l) over the
    candidates, and the sum of exp(l) over the scored non-candidates (anchor and window). Each
    tile is [keys, rows]: rows 0..G2-1 hold the heads' upper bounds u, rows G2..2*G2-1 their l
    (reference.KEPT_MARGIN), so one product one-hot [bins, keys] @ [keys, rows] (bf16, exact) bins
    both for every head, and with the keys first both products are Hopper warp-group ones. The
    histogram is circular (a bin's slot is its absolute index mod NB, so nothing moves when the
    tops rise: the bins that fall to the lowest fold into its slot, and at the end the slots are
    read counted down from the group's top; a shift by a product spilled registers). The tops are
    running maxima, so the exps are rescaled when they rise, giving the reference's sums (binned on
    the final tops) up to rounding: each exp was rounded outward to bf16 against the tops of its
    tile, and the rescaling and folding round to nearest in fp32 (a few fp32 ulps, far inside the
    SHADOW_SLACK each bound carries). With TAIL the lower rows' suffix sums are written too, and
    block 0 keeps the candidates' value sum."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    n = tl.load(BOUNDS)
    lo = tl.load(BOUNDS + 1)
    hi = tl.load(BOUNDS + 2)
    scored = n - 1  # the newest key is left out: its int8 copy need not exist yet (see the reference)
    b = row // Hkv
    h = row % Hkv
    chan, offset = _key_frame(KC, KO, b, h, scb, sch, D, D_PAD)
    if blk == 0:  # so this launch writes it, for the steps after this one
        _quantize_newest(K, KQ, KS, chan, offset, b, h, scored, sxb, sxh, sxn, skb, skh, skn, ssb, ssh, D, D_PAD)
        if TAIL:
            _update_value_sum(V, VSUM, UPTO, b, h, row, lo, hi, sxb, sxh, sxn, D, D_PAD, 64)
    if blk * NPB * P >= scored:
        return
    r = tl.arange(0, M)
    head = r % G2
    upper = r < G2
    real = (r < 2 * G2) & (head < G)
    q, q_err, q_off, q_off_err = _query_terms(Q, chan, offset, b, h, real, sqb, sqh, sqrt_d, G, G2, M, D, D_PAD)
    cut = tl.load(CUT + row * G + head, mask=real, other=0)  # the group's heads' sampled cuts (_sampled_cut)
    shift = tl.where(real, cut - tl.min(tl.where(real, cut, MAX_BIN), 0), 0).to(tl.float32) * BIN_WIDTH
    sign = tl.where(upper, 1.0, -KEPT_MARGIN)  # the lower rows' l = est - KEPT_MARGIN * err
    top = tl.full([M], float("-inf"), tl.float32)
    head_top = tl.full([M], NO_PAGE, tl.int32)
    group_top = tl.max(head_top, 0)
    c = tl.arange(0, CH)
    bins = tl.arange(0, NB)
    hist = tl.zeros([NB, M], tl.float32)
    base_mass = tl.zeros([M], tl.float32)
    for c0 in range(blk * NPB, (blk + 1) * NPB, CH):
        est, err, cand, base = _int8_bounds(KQ, KS, q, q_err, q_off, q_off_err, b, h, c0, lo, hi, scored, skb, skh, skn,
                                            ssb, ssh, P, sqrt_d, D, D_PAD, P_PAD, CH, HALF, SLACK, PRECISION, UPCAST)
        u = est + err  # [keys, rows]: every row has its head's upper bound
        page_bins = _group_bins(u - shift[None, :], cand, real, CH, P_PAD)
        tl.store(PAGE_BIN + row * n_pages + c0 + c, page_bins.to(tl.int16), mask=c0 + c < n_pages)
        top = tl.maximum(top, tl.max(tl.where((cand | base)[:, None], u, float("-inf")), 0))
        new_head = _to_bin(tl.where(real, top, float("-inf")))
        new_group = tl.max(_to_bin(tl.where(real, top - shift, float("-inf"))), 0)
        # the tops rose: slots whose bins fell to or below the new lowest bin fold into its slot
        # (a no-op when the group's top stayed), the exps rescale to the new tops
        lowest = new_group - NB + 1
        fold = group_top - ((group_top - bins) & (NB - 1)) <= lowest  # the bin each slot held, low enough
        folded = tl.sum(tl.where(fold[:, None], hist, 0.0), 0)
        hist = tl.where(fold[:, None], 0.0, hist) + tl.where((bins == (lowest & (NB - 1)))[:, None], folded[None, :], 0.0)
        scale = tl.exp((head_top - new_head).to(tl.float32) * BIN_WIDTH)
        hist = hist * scale[None, :]
        base_mass = base_mass * scale
        head_top = new_head
        group_top = new_group
        e = tl.exp(est + sign[None, :] * err - ((head_top + 1).to(tl.float32) * BIN_WIDTH)[None, :])
        base_mass += tl.sum(tl.where(base[:, None] & real[None, :], e, 0.0), 0)
        key_bin = tl.maximum(page_bins, lowest) & (NB - 1)  # each key in its page's bin's slot
        if P_PAD > 1:
            key_bin = tl.reshape(tl.broadcast_to(key_bin[:, None], [CH, P_PAD]), [CH * P_PAD])
        one_hot = tl.where(bins[:, None] == key_bin[None, :], 1.0, 0.0).to(tl.bfloat16)  # (bool to bf16 is 0 interpreted)
        w = _bf16_outward(tl.where(cand[:, None] & real[None, :], e, 0.0), upper[None, :])
        hist += _dot(one_hot, w, "tf32", INTERP)
    hist = tl.gather(hist, tl.broadcast_to(((group_top - bins) & (NB - 1))[:, None], [NB, M]), 0)  # counted down
    at = (row * n_blocks + blk) * G2 + head
    tl.store(GTOP + row * n_blocks + blk, group_top)
    tl.store(HTOP + at, head_top, mask=upper & real)
    tl.store(HREST + at[None, :] * NB + bins[:, None], tl.cumsum(hist, 0, reverse=True), mask=(upper & real)[None, :])
    tl.store(HKEPT + at[None, :] * NB + bins[:, None], tl.cumsum(hist, 0), mask=(~upper & real)[None, :])
    if TAIL:
        tl.store(HLREST + at[None, :] * NB + bins[:, None], tl.cumsum(hist, 0, reverse=True),
                 mask=(~upper & real)[None, :])
    tl.store(HBASE + at, base_mass, mask=~upper & real)


@triton.jit
def _page_threshold(GTOP, HTOP, HREST, HKEPT, HBASE, HLREST, BOUNDS, THRESHOLD, LOG_REST, TAIL_U, TAIL_L, GTOP_OUT,
                    n_blocks, block_keys, c, G: tl.constexpr, G2: tl.constexpr, NB: tl.constexpr, CB: tl.constexpr,
                    TAIL: tl.constexpr):
    """page_threshold pass 2, one program per query head: the blocks' histograms aligned on the
    group's top bin (bins are absolute multiples of BIN_WIDTH, so a block's shifts by a whole
    number of bins), rescaled to the head's top and summed, then the fewest top bins whose rest is
    <= c times the kept l. With TAIL, also the log suffix sums of both bounds and the
    group's top (reference.Tail)."""
    pid = tl.program_id(0)  # = b * Hq + query head
    row = pid // G
    g = pid % G
    live = tl.cdiv(tl.maximum(tl.load(BOUNDS) - 1, 0), block_keys)
    i = tl.arange(0, CB)
    group_top = tl.full([CB], NO_PAGE, tl.int32)
    head_top = tl.full([CB], NO_PAGE, tl.int32)
    for i0 in range(0, live, CB):
        ok = i0 + i < live
        group_top = tl.maximum(group_top, tl.load(GTOP + row * n_blocks + i0 + i, mask=ok, other=NO_PAGE))
        head_top = tl.maximum(head_top, tl.load(HTOP + (row * n_blocks + i0 + i) * G2 + g, mask=ok, other=NO_PAGE))
    group_top = tl.max(group_top, 0)
    head_top = tl.max(head_top, 0)
    bins = tl.arange(0, NB)
    rest = tl.zeros([NB], tl.float32)
    kept = tl.zeros([NB], tl.float32)  # kept[j]: the top j bins' sum of exp(l)
    low_rest = tl.zeros([NB], tl.float32)  # TAIL: the rest of exp(l)
    base_mass = tl.zeros([CB], tl.float32)
    for i0 in range(0, live, CB):
        ok = i0 + i < live
        at = (row * n_blocks + i0 + i) * G2 + g
        shift = group_top - tl.load(GTOP + row * n_blocks + i0 + i, mask=ok, other=0)
        weight = tl.where(ok, tl.exp((tl.load(HTOP + at, mask=ok, other=0) - head_top).to(tl.float32) * BIN_WIDTH), 0.0)
        aligned = at[:, None] * NB + tl.maximum(bins[None, :] - shift[:, None], 0)
        r = tl.load(HREST + aligned, mask=ok[:, None], other=0.0)
        if TAIL:
            low_rest += tl.sum(weight[:, None] * tl.load(HLREST + aligned, mask=ok[:, None], other=0.0), 0)
        jk = bins[None, :] - 1 - shift[:, None]
        k = tl.load(HKEPT + at[:, None] * NB + jk, mask=ok[:, None] & (jk >= 0), other=0.0)
        rest += tl.sum(weight[:, None] * r, 0)
        kept += tl.sum(weight[:, None] * k, 0)
        base_mass += weight * tl.load(HBASE + at, mask=ok, other=0.0)
    kept += tl.sum(base_mass, 0)
    need = tl.sum((rest > c * kept).to(tl.int32), 0)  # keeping all NB bins leaves nothing: it always holds
    need = tl.where(c > 0, need, NB)  # eps = 0: every bin (as the reference)
    tl.store(THRESHOLD + pid, tl.where(need < NB, group_top - need + 1, NO_PAGE))
    left = tl.sum(tl.where(bins == need, rest, 0.0), 0)
    ref = (head_top + 1).to(tl.float32) * BIN_WIDTH
    tl.store(LOG_REST + pid, tl.where(left > 0, tl.log(left) + ref, float("-inf")))
    if TAIL:
        tl.store(TAIL_U + pid * NB + bins, tl.where(rest > 0, tl.log(rest) + ref, float("-inf")))
        tl.store(TAIL_L + pid * NB + bins, tl.where(low_rest > 0, tl.log(low_rest) + ref, float("-inf")))
        tl.store(GTOP_OUT + pid, group_top)


@triton.jit
def _kept(PAGE_BIN, TH, row, chunk, lo, hi, spb, P, G: tl.constexpr, G2: tl.constexpr, CHUNK: tl.constexpr):
    """Positions chunk * CHUNK + [0, CHUNK) and which of them some head of KV group `row` keeps."""
    th = tl.min(tl.load(TH + row * G + tl.arange(0, G2), mask=tl.arange(0, G2) < G, other=2147483647), 0)
    pos = chunk * CHUNK + tl.arange(0, CHUNK)
    cand = (pos >= lo) & (pos < hi)
    return pos, cand & (tl.load(PAGE_BIN + row * spb + pos // P, mask=cand, other=0) >= th)


@triton.jit
def _kept_count(PAGE_BIN, TH, BOUNDS, CNT, spb, P, n_chunks, G: tl.constexpr, G2: tl.constexpr, CHUNK: tl.constexpr):
    """How many positions of each chunk the KV group keeps (0 past the candidates)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    _, keep = _kept(PAGE_BIN, TH, row, chunk, tl.load(BOUNDS + 1), tl.load(BOUNDS + 2), spb, P, G, G2, CHUNK)
    tl.store(CNT + row * n_chunks + chunk, tl.sum(keep.to(tl.int32), 0))


@triton.jit
def _kept_scatter(PAGE_BIN, TH, BOUNDS, CNT, IDX, COUNT, spb, sib, P, n_chunks, G: tl.constexpr, G2: tl.constexpr,
                  CHUNK: tl.constexpr, CB: tl.constexpr):
    """Each chunk's kept positions, in order, after those of the chunks before it (it reads only
    their counts); the last chunk also writes the list's length."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    pos, keep = _kept(PAGE_BIN, TH, row, chunk, tl.load(BOUNDS + 1), tl.load(BOUNDS + 2), spb, P, G, G2, CHUNK)
    i = tl.arange(0, CB)
    before = tl.zeros([CB], tl.int32)
    for i0 in range(0, chunk, CB):
        before += tl.load(CNT + row * n_chunks + i0 + i, mask=i0 + i < chunk, other=0)
    start = tl.sum(before, 0)
    kept = tl.cumsum(keep.to(tl.int32), 0)
    tl.store(IDX + row * sib + start + kept - 1, pos, mask=keep)
    if chunk == n_chunks - 1:
        tl.store(COUNT + row, start + tl.sum(keep.to(tl.int32), 0))


KEPT = {"chunk": 1024, "counts_per_tile": 1024}  # kept_list: positions per program, counts summed per step


def kept_list(page_bin: torch.Tensor, threshold: torch.Tensor, bounds: torch.Tensor, page_size: int,
              capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate positions some head of each KV group keeps (page_bin >= its threshold), in
    order: idx [B, Hkv, capacity] (int32, valid up to count) and count [B, Hkv] (int32), in two
    launches (counts per chunk, then each chunk writes after the chunks before it)."""
    B, Hkv, _ = page_bin.shape
    G = threshold.shape[1] // Hkv
    chunk = KEPT["chunk"]
    n_chunks = triton.cdiv(capacity, chunk)
    counts = torch.empty(B * Hkv, n_chunks, device=page_bin.device, dtype=torch.int32)
    idx = torch.empty(B, Hkv, capacity, device=page_bin.device, dtype=torch.int32)
    count = torch.empty(B, Hkv, device=page_bin.device, dtype=torch.int32)
    assert page_bin.is_contiguous() and threshold.is_contiguous()
    meta = dict(G=G, G2=_pow2(G, 1), CHUNK=chunk)
    _launch(_kept_count, (B * Hkv, n_chunks), page_bin, threshold, bounds, counts, page_bin.stride(1), page_size,
            n_chunks, **meta)
    _launch(_kept_scatter, (B * Hkv, n_chunks), page_bin, threshold, bounds, counts, idx, count, page_bin.stride(1),
            idx.stride(1), page_size, n_chunks, **meta, CB=KEPT["counts_per_tile"])
    return idx, count


# page_threshold's launch settings (H200, bench/tune_threshold.py at 32q/4kv fp16 and 14q/2kv bf16):
# keys per pass-1 program (at least block_keys, more once the capacity would need over `programs`
# of them: pass 2 reads every block's histogram), keys per pass-1 tile (each tile's fixed work, its
# reductions and one-hot product, is spread over more keys: 256 beat 128 at every length),
# pass 1's warps and software-pipelining stages (1: prefetching the next int8 tile cost more than
# it hid, but at 1M for 14q/2kv), pass-2 blocks per tile, and the sampled cut's anchor-and-window
# keys per tile and the warps of its program (its tile of SHIFT_SAMPLES keys; bench/tune_cut.py).
PAGE_SCAN = {"block_keys": 512, "programs": 512, "tile_keys": 256, "warps": 4, "stages": 1, "blocks_per_tile": 16,
             "cut_base_keys": 256, "cut_warps": 8}


def sampled_cut(q: torch.Tensor, kq: torch.Tensor, kscale: torch.Tensor, chan: torch.Tensor, offset: torch.Tensor,
                bounds: torch.Tensor, eps: float) -> torch.Tensor:
    """Each query head's cut [B, Hq] (int32) estimated on reference.SHIFT_SAMPLES candidates from
    the int8 copies of positions [0, n - 1), one program per KV group; see reference.sampled_cut."""
    B, Hq, D = q.shape
    Hkv = kq.shape[1]
    G, G2 = Hq // Hkv, _pow2(Hq // Hkv, 1)
    cut = torch.empty(B, Hq, device=q.device, dtype=torch.int32)
    _launch(_sampled_cut, (B * Hkv,),
        q, kq, kscale, chan, offset, bounds, cut, q.stride(0), q.stride(1), *kq.stride()[:3], *kscale.stride()[:2],
        *chan.stride()[:2], math.sqrt(D), reference.rest_ratio(eps), Hkv,
        G=G, G2=G2, M=max(16, 2 * G2), D=D, D_PAD=_pow2(D), S=reference.SHIFT_SAMPLES, BT=PAGE_SCAN["cut_base_keys"],
        NB=reference.PAGE_BINS, STEPS=reference.PAGE_BINS.bit_length(),
        HALF=0.5 + reference.SHADOW_SLACK, SLACK=reference.SHADOW_SLACK, **_precision(q),
        num_warps=PAGE_SCAN["cut_warps"],
    )
    return cut


def page_threshold(q: torch.Tensor, k: torch.Tensor, kq: torch.Tensor, kscale: torch.Tensor, chan: torch.Tensor,
                   offset: torch.Tensor, bounds, eps: float, page_size: int, tail: reference.Tail | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Certified page selection from the int8 copies in three launches: each head's sampled cut,
    then the scan, which writes the newest key's copy (and with tail, the candidates' value sum),
    then the thresholds; see reference.page_threshold. page_bin
    is written for pages holding scored positions (those [0, n - 1) of bounds) only."""
    B, Hq, D = q.shape
    Hkv, cap = kq.shape[1], kq.shape[2]
    G, rows = Hq // Hkv, B * Hkv
    assert kq.stride(-1) == 1 and kscale.stride(-1) == 1 and k.stride(-1) == 1 and chan.stride(-1) == 1
    assert offset.stride() == chan.stride()
    bounds = reference.as_bounds(bounds, None, q.device)
    P_PAD = _pow2(page_size, 1)
    CH = max(1, PAGE_SCAN["tile_keys"] // P_PAD)
    block_keys = max(PAGE_SCAN["block_keys"], _pow2(triton.cdiv(cap * rows, PAGE_SCAN["programs"]), 1))
    NPB = max(CH, block_keys // P_PAD)
    n_pages = triton.cdiv(cap, page_size)
    n_blocks = triton.cdiv(n_pages, NPB)
    G2, NB = _pow2(G, 1), reference.PAGE_BINS
    page_bin = torch.empty(B, Hkv, n_pages, device=q.device, dtype=torch.int16)
    group_top = torch.empty(rows, n_blocks, device=q.device, dtype=torch.int32)
    head_top = torch.empty(rows, n_blocks, G2, device=q.device, dtype=torch.int32)
    rest = torch.empty(rows, n_blocks, G2, NB, device=q.device, dtype=torch.float32)
    kept = torch.empty_like(rest)
    base = torch.empty(rows, n_blocks, G2, device=q.device, dtype=torch.float32)
    log_rest = torch.empty(B, Hq, device=q.device, dtype=torch.float32)
    v, vsum, upto, low_rest, t_u, t_l, gtop = k, base, group_top, rest, log_rest, log_rest, log_rest  # unused unless tail
    if tail is not None:
        v, vsum, upto, t_u, t_l, gtop = tail
        assert v.stride() == k.stride() and all(x.is_contiguous() for x in (vsum, upto, t_u, t_l, gtop))
        low_rest = torch.empty_like(rest)
    cut = sampled_cut(q, kq, kscale, chan, offset, bounds, eps)
    _launch(_page_scan, (rows, n_blocks),
        q, k, v, kq, kscale, chan, offset, bounds, cut, page_bin, group_top, head_top, rest, kept, base, low_rest, vsum, upto,
        q.stride(0), q.stride(1),
        *k.stride()[:3], *kq.stride()[:3], *kscale.stride()[:2], *chan.stride()[:2], n_pages, n_blocks, page_size, math.sqrt(D), Hkv,
        G=G, G2=G2, M=max(16, 2 * G2), D=D, D_PAD=_pow2(D), P_PAD=P_PAD, CH=CH, NPB=NPB, NB=NB,
        HALF=0.5 + reference.SHADOW_SLACK, SLACK=reference.SHADOW_SLACK, **_precision(q), INTERP=INTERPRETED.value,
        TAIL=tail is not None, num_warps=PAGE_SCAN["warps"], num_stages=PAGE_SCAN["stages"],
    )
    threshold = torch.empty(B, Hq, device=q.device, dtype=torch.int32)
    _launch(_page_threshold, (B * Hq,),
        group_top, head_top, rest, kept, base, low_rest, bounds, threshold, log_rest, t_u, t_l, gtop, n_blocks,
        NPB * page_size, reference.rest_ratio(eps), G=G, G2=G2, NB=NB, CB=PAGE_SCAN["blocks_per_tile"],
        TAIL=tail is not None,
    )
    return page_bin, threshold, log_rest