"""Triton decode-attention and selection kernels (references: kernels/reference.py).

Decode attention is flash-decoding: the key range is split across programs, each program serves
all G query heads of one KV head (so each K/V byte is read once per step, GQA-aware), keeps an
online softmax, and writes a partial output plus its log-sum-exp; a second kernel merges splits.
The sparse variant runs the same loop over a virtual sequence: W ring-buffer slots followed by K
gathered history positions (anchor + top-k), loaded in place with no gathered copy of K/V.

Selection fuses scoring with top-k: the group-max of q·k per position (exact selection), or the
Quest page bound q+·kmax + q-·kmin over page summaries and then q·k over the chosen pages' tokens
(page selection); each program keeps a running top-k, and one more launch merges programs.
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
def _attn_partial(
    Q, K, V, RK, RV, IDX, PAGES, OP, LP, OUT, LSE,
    sqb, sqh, skb, skh, skn, srb, srh, srn, sib, sih, spb, sph,
    n_keys, W, n_ctx, lo, hi, P, keys_per_split, scale, Hkv,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr, PAGED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    DIRECT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < G
    dmask = d < D
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
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
            raw = tl.load(IDX + b * sib + h * sih + (j - W - lo), mask=in_range & is_gather, other=-1)
            if PAGED:  # raw indexes the tokens of the selected pages
                page = tl.load(PAGES + b * spb + h * sph + raw // P, mask=in_range & is_gather & (raw >= 0), other=0)
                pos = page * P + raw % P
            else:
                pos = raw
            gather_ok = is_gather & (raw >= 0) & (pos >= lo) & (pos < hi)
            valid = in_range & ((is_ring & (ring_pos >= lo) & (ring_pos >= 0)) | is_anchor | gather_ok)
            hist_pos = tl.where(is_anchor, j - W, tl.where(gather_ok, pos, 0)).to(tl.int64)
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
        m = m_new
    lse = tl.where(l > 0, m + tl.log(l), float("-inf"))
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if DIRECT:  # a single split: this is the final result, skip the reduction launch
        head = pid_bh * G + g  # = b * Hq + query head
        tl.store(OUT + head[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
        tl.store(LSE + head, lse, mask=gmask)
        return
    part = pid_bh * n_splits + split
    tl.store(OP + (part * G_PAD + g)[:, None] * D_PAD + d[None, :], out)
    tl.store(LP + part * G_PAD + g, lse)


@triton.jit
def _attn_reduce(OP, LP, OUT, LSE, n_splits, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                 D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    pid = tl.program_id(0)  # = b * Hq + query head, since query head = kv head * G + g
    bh = pid // G
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
    tl.store(OUT + pid * D + d, out.to(OUT.dtype.element_ty), mask=d < D)
    tl.store(LSE + pid, mx_safe + tl.log(total))


def _pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(x))


def _precision(t: torch.Tensor) -> dict:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return dict(PRECISION="ieee" if t.dtype == torch.float32 else "tf32",
                UPCAST=interpreted and t.dtype == torch.bfloat16)


# Launch settings of the decode kernels; bench/tune_decode.py measures the alternatives.
DECODE = {"block_n": 64, "programs_per_sm": 2, "num_warps": 4, "num_stages": 3, "min_blocks": 4}
# A sparse step gathers a few hundred keys through dependent loads (index, page, key): latency,
# not bandwidth, so every block of 32 gets its own program.
SPARSE = {**DECODE, "block_n": 32, "min_blocks": 1}


def _splits(n_keys: int, programs: int, cfg: dict, device: torch.device) -> int:
    """Enough splits to give every SM `programs_per_sm` programs, each with at least `min_blocks` blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(n_keys, cfg["min_blocks"] * cfg["block_n"]),
                      triton.cdiv(cfg["programs_per_sm"] * sms, programs), 256))


def _attention(q, k, v, n_keys, sparse=None, out=None, config: dict | None = None):
    cfg = {**DECODE, **(config or {})}
    block_n = cfg["block_n"]
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride() == k.stride()
    G_PAD, D_PAD = _pow2(G), _pow2(D)
    S = _splits(n_keys, B * Hkv, cfg, q.device)
    per_split = triton.cdiv(triton.cdiv(n_keys, S), block_n) * block_n
    S = triton.cdiv(n_keys, per_split) if n_keys else 1
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty(B, Hq, device=q.device, dtype=torch.float32)
    direct = S == 1
    op = lp = out  # partials are only needed when several splits must be merged
    if not direct:
        op = torch.empty(B * Hkv * S, G_PAD, D_PAD, device=q.device, dtype=torch.float32)
        lp = torch.empty(B * Hkv * S, G_PAD, device=q.device, dtype=torch.float32)
    if sparse is None:
        ring_k = ring_v = idx = pages = k  # unused
        W = n_ctx = lo = hi = P = 0
    else:
        ring_k, ring_v, idx, pages, n_ctx, lo, hi, P = sparse
        assert ring_v.stride() == ring_k.stride() and ring_k.stride(-1) == 1 and idx.stride(-1) == 1
        W = ring_k.shape[2]
    paged = sparse is not None and pages is not None
    _attn_partial[(B * Hkv, S)](
        q, k, v, ring_k, ring_v, idx, pages if paged else k, op, lp, out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), *ring_k.stride()[:3], *idx.stride()[:2],
        *(pages.stride()[:2] if paged else (0, 0)),
        n_keys, W, n_ctx, lo, hi, P, per_split, 1.0 / math.sqrt(D), Hkv,
        G=G, G_PAD=G_PAD, D=D, D_PAD=D_PAD, BLOCK_N=block_n, SPARSE=sparse is not None, PAGED=paged, **_precision(q),
        DIRECT=direct, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not direct:
        _attn_reduce[(B * Hq,)](op, lp, out, lse, S, G=G, G_PAD=G_PAD, D=D, D_PAD=D_PAD, S_PAD=_pow2(S, 1))
    return out, lse


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None,
                     config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode attention over k/v [B, Hkv, n, D]; see reference.decode_attention."""
    return _attention(q, k, v, k.shape[2], None, out, config)


def sparse_attention(q, ring_k, ring_v, k, v, idx, n: int, anchor: int, pages=None, page_size: int = 1,
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Window ∪ anchor ∪ gathered idx [B, Hkv, K]; see reference.sparse_attention."""
    a = min(anchor, n)
    hi = max(a, n - ring_k.shape[2])
    sparse = (ring_k, ring_v, idx.contiguous(), None if pages is None else pages.contiguous(), n, a, hi, page_size)
    return _attention(q, k, v, ring_k.shape[2] + a + idx.shape[2], sparse, out, SPARSE)


@triton.jit(do_not_specialize=["pos"])  # Triton would make pos == 1 a compile-time constant
def _append(KN, VN, K, V, RK, RV, KMIN, KMAX, pos, W, P, snb, snh, svb, svh, skb, skh, skn, srb, srh, srn, spb, sph, spn, Hkv,
            D: tl.constexpr, D_PAD: tl.constexpr, PAGES: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    d = tl.arange(0, D_PAD)
    dmask = d < D
    kn = tl.load(KN + b * snb + h * snh + d, mask=dmask)
    vn = tl.load(VN + b * svb + h * svh + d, mask=dmask)
    hist = b * skb + h * skh + pos.to(tl.int64) * skn + d
    tl.store(K + hist, kn, mask=dmask)
    tl.store(V + hist, vn, mask=dmask)
    ring = b * srb + h * srh + (pos % W) * srn + d
    tl.store(RK + ring, kn, mask=dmask)
    tl.store(RV + ring, vn, mask=dmask)
    if PAGES:
        page = b * spb + h * sph + (pos // P) * spn + d
        first = pos % P == 0  # a new page starts with this key as its min and max
        kf = kn.to(tl.float32)  # compare in fp32 (exact; the interpreter mishandles bf16 max)
        lo = tl.load(KMIN + page, mask=dmask).to(tl.float32)
        hi = tl.load(KMAX + page, mask=dmask).to(tl.float32)
        tl.store(KMIN + page, tl.where(first, kf, tl.minimum(lo, kf)).to(kn.dtype), mask=dmask)
        tl.store(KMAX + page, tl.where(first, kf, tl.maximum(hi, kf)).to(kn.dtype), mask=dmask)


def append_kv(k_store, v_store, ring_k, ring_v, kmin, kmax, k, v, start: int, page_size: int) -> None:
    """One-token append (k/v [B, Hkv, 1, D]) in one launch; see reference.append_kv."""
    B, Hkv, T, D = k.shape
    assert T == 1 and k.stride(-1) == v.stride(-1) == 1 and k_store.stride() == v_store.stride() and ring_k.stride() == ring_v.stride()
    pages = kmin is not None
    _append[(B * Hkv,)](
        k, v, k_store, v_store, ring_k, ring_v, kmin if pages else k, kmax if pages else k, start, ring_k.shape[2], page_size,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_store.stride()[:3], *ring_k.stride()[:3], *(kmin.stride()[:3] if pages else (0, 0, 0)),
        Hkv, D=D, D_PAD=_pow2(D), PAGES=pages,
    )


@triton.jit
def _block_scores(Q, K, K2, PAGES, b, h, j, sqb, sqh, skb, skh, skn, spb, sph, n, lo, hi, P, scale,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                  MODE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Scores of entries j of KV head (b, h), max over the group's query heads, -inf where masked.
    MODE 0: q·k at position j; 1: q·k at token j of the pages PAGES, -inf outside positions
    [lo, hi); 2: page bound q+·K[j] + q-·K2[j] (K = page max, K2 = page min), -inf for pages j < lo."""
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < G
    dmask = d < D
    jmask = j < n
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    if MODE == 1:
        page = tl.load(PAGES + b * spb + h * sph + j // P, mask=jmask, other=0)
        pos = (page * P + j % P).to(tl.int64)
        jmask = jmask & (pos >= lo) & (pos < hi)
    else:
        pos = j.to(tl.int64)
    off = (b * skb + h * skh + pos * skn)[:, None] + d[None, :]
    lmask = jmask[:, None] & dmask[None, :]
    k = tl.load(K + off, mask=lmask, other=0.0)
    if MODE == 2:
        jmask = jmask & (j >= lo)
        kmin = tl.load(K2 + off, mask=lmask, other=0.0)
        qf = q.to(tl.float32)  # split signs in fp32 (exact; also sidesteps the interpreter's bf16)
        s = _dot(tl.maximum(qf, 0.0).to(k.dtype), tl.trans(k), PRECISION, UPCAST)
        s += _dot(tl.minimum(qf, 0.0).to(k.dtype), tl.trans(kmin), PRECISION, UPCAST)
    else:
        s = _dot(q, tl.trans(k), PRECISION, UPCAST)
    s = tl.where(gmask[:, None] & jmask[None, :], s * scale, float("-inf"))
    return tl.max(s, 0)


@triton.jit
def _pack(x, i):
    """fp32 score and int index -> one int64 whose integer order is the score order (ties: larger
    index first), so top-k over the packed keys carries the indices along."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    return (ordered.to(tl.int64) << 32) | i.to(tl.int64)


@triton.jit
def _select(
    Q, K, K2, PAGES, X, OUT, sqb, sqh, skb, skh, skn, spb, sph, sx,
    r_lo, r_hi, per_split, lo, hi, P, scale, Hkv, k_out,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr, MODE: tl.constexpr, FINAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Fused score + top-k. Each program scores its share of entries [r_lo, r_hi) of one row,
    BLOCK_N at a time, and keeps a running top K_PAD of packed (score, index) keys; a block is
    merged only if its best key beats the current K_PAD-th, so most blocks of a long row cost
    just their scores. MODE 0-2 score like _block_scores; MODE 3 reads packed candidates X
    (the merge step). FINAL writes the k_out best indices (-1 where none), else the K_PAD
    packed candidates of this program."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    lowest = -9223372036854775807 - 1
    start = r_lo + split * per_split
    end = tl.minimum(start + per_split, r_hi)
    best = tl.full([K_PAD], lowest, tl.int64)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        if MODE == 3:
            key = tl.load(X + row * sx + j, mask=j < end, other=lowest)
        else:
            s = _block_scores(Q, K, K2, PAGES, row // Hkv, row % Hkv, j, sqb, sqh, skb, skh, skn, spb, sph, end, lo, hi,
                              P, scale, G, G_PAD, D, D_PAD, MODE, PRECISION, UPCAST)
            key = tl.where(s == float("-inf"), lowest, _pack(s, j))
        if tl.max(key, 0) > tl.min(best, 0):
            both = tl.reshape(tl.join(best, tl.topk(key, K_PAD)), [2 * K_PAD])
            best = tl.topk(both, K_PAD)
    r = tl.arange(0, K_PAD)
    if FINAL:  # tl.topk sorts descending: the first k_out are the best
        tl.store(OUT + row * k_out + r, tl.where(best == lowest, -1, best & 0xFFFFFFFF), mask=r < k_out)
    else:
        tl.store(OUT + (row * tl.num_programs(1) + split) * K_PAD + r, best)


# Selection launch settings: a long row is split over programs like split-K decode, each keeping
# its own top-k; one more launch merges their candidates.
SELECT = {"block_n": 64, "programs_per_sm": 2, "num_warps": 4, "min_blocks": 8}
MAX_K = 256  # larger top-k goes to torch.topk (the running merge keeps 2 * K_PAD keys in registers)


def _topk(rows: int, r_lo: int, r_hi: int, k_out: int, mode: int, q: torch.Tensor, keys: torch.Tensor | None = None,
          keys2: torch.Tensor | None = None, pages: torch.Tensor | None = None, lo: int = 0, hi: int = 0,
          page_size: int = 1, x: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """Indices [rows, k_out] of the k_out best entries in [r_lo, r_hi) of each row (see _select)."""
    K_PAD = _pow2(k_out, 1)
    assert 0 < k_out and K_PAD <= MAX_K
    block_n = max(SELECT["block_n"], K_PAD)
    if splits is None:
        splits = _splits(r_hi - r_lo, rows, {**SELECT, "block_n": block_n}, q.device) if mode != 3 else 1
    per_split = triton.cdiv(triton.cdiv(r_hi - r_lo, splits), block_n) * block_n
    splits = max(1, triton.cdiv(r_hi - r_lo, per_split))
    final = splits == 1
    out = torch.empty((rows, k_out) if final else (rows, splits, K_PAD), device=q.device, dtype=torch.int64)
    keys = q if keys is None else keys
    B, Hq, D = q.shape
    Hkv = rows // B
    _select[(rows, splits)](
        q, keys, keys if keys2 is None else keys2, keys if pages is None else pages, out if x is None else x, out,
        q.stride(0), q.stride(1), *(keys.stride()[:3] if keys.dim() == 4 else (0, 0, 0)),
        *(pages.stride()[:2] if pages is not None else (0, 0)), 0 if x is None else x.stride(0),
        r_lo, r_hi, per_split, lo, hi, page_size, 1.0 / math.sqrt(D), Hkv, k_out,
        G=Hq // Hkv, G_PAD=_pow2(Hq // Hkv), D=D, D_PAD=_pow2(D), BLOCK_N=block_n, K_PAD=K_PAD, MODE=mode,
        FINAL=final, **_precision(q), num_warps=SELECT["num_warps"],
    )
    if final:
        return out
    return _topk(rows, 0, splits * K_PAD, k_out, 3, q, x=out.view(rows, -1))


def exact_select(q: torch.Tensor, k: torch.Tensor, lo: int, hi: int, k_top: int) -> torch.Tensor:
    """Exact group-max top-k over positions [lo, hi) of k, fused; see reference.exact_select."""
    B, Hkv = k.shape[:2]
    assert k.stride(-1) == 1
    take = min(k_top, hi - lo)
    return _topk(B * Hkv, lo, hi, take, 0, q, k).view(B, Hkv, take)


def page_select(q: torch.Tensor, k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lo: int, hi: int,
                k_top: int, page_size: int, oversample: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest-style selection, scope "group", in two fused top-k passes (page bounds, then the
    chosen pages' tokens); see reference.page_select."""
    B, Hkv = k.shape[:2]
    assert k.stride(-1) == 1 and kmin.stride() == kmax.stride() and kmax.stride(-1) == 1
    p_lo, p_hi, n_sel = reference.page_plan(lo, hi, k_top, page_size, oversample)
    pages = _topk(B * Hkv, p_lo, p_hi, n_sel, 2, q, kmax, kmin, lo=p_lo).view(B, Hkv, n_sel)
    take = min(k_top, n_sel * page_size)
    idx = _topk(B * Hkv, 0, n_sel * page_size, take, 1, q, k, pages=pages, lo=lo, hi=hi, page_size=page_size)
    return pages, idx.view(B, Hkv, take)
