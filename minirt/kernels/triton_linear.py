"""The decode step's projections as one Triton matrix-vector product each (batch 1, one token),
with the op before and the op after fused in (references: reference.norm_linear, silu_mul_linear).

At batch 1 a projection reads its weight once and does almost no math, so what costs is the launch
and the pass over memory around it: RMSNorm (with the residual add) is recomputed in each
program's prologue from the 2-16 KB input row, silu(gate) * up likewise, and RoPE is applied in
the epilogue of the fused q|k|v projection, which also writes the new key and value into the
cache. A decoder layer is then four projections and attention (two): six launches. Prefill (many
rows) stays on cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_attention import _update_page

PLAIN, NORM, ADD_NORM, SILU_MUL = 0, 1, 2, 3  # the prologue: what the row multiplied by W is


@triton.jit
def _residual(X, DELTA, kk, kmask, PROLOGUE: tl.constexpr):
    x = tl.load(X + kk, mask=kmask, other=0.0)
    if PROLOGUE == 2:  # x + delta rounded to the stream's dtype, as the reference adds
        x = (x.to(tl.float32) + tl.load(DELTA + kk, mask=kmask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    return x


@triton.jit
def _append_rows(a, r, m, KC, VC, RK, RV, KMIN, KMAX, BOUNDS, k_first, kv_size, head_dim,
                 skh, skn, srh, srn, sph, spn, ring, page, RING: tl.constexpr, PAGES: tl.constexpr):
    """Rows r of a decode step's q|k|v output (values a, valid where m) that are the new key or
    value, written into the cache at position n - 1 (see triton_attention._append: the same
    stores, ring slot and page min/max, each element by the one program that computed it)."""
    pos = (tl.load(BOUNDS) - 1).to(tl.int64)
    j = r - k_first
    is_k = m & (j >= 0) & (j < kv_size)
    is_v = m & (j >= kv_size)
    j = tl.where(is_v, j - kv_size, j)
    h = j // head_dim
    d = j % head_dim
    x = a.to(KC.dtype.element_ty)
    tl.store(KC + h * skh + pos * skn + d, x, mask=is_k)
    tl.store(VC + h * skh + pos * skn + d, x, mask=is_v)
    if RING:
        tl.store(RK + h * srh + (pos % ring) * srn + d, x, mask=is_k)
        tl.store(RV + h * srh + (pos % ring) * srn + d, x, mask=is_v)
    if PAGES:
        _update_page(KMIN, KMAX, h * sph + (pos // page) * spn + d, x, pos % page == 0, is_k)


@triton.jit
def _gemv(X, DELTA, XOUT, NW, W, BIAS, Y, COS, SIN, POS, N, K, eps, n_rot_rows,
          KC, VC, RK, RV, KMIN, KMAX, BOUNDS, k_first, kv_size, head_dim, skh, skn, srh, srn, sph, spn, ring, page,
          PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr,
          P: tl.constexpr, BLOCK_K: tl.constexpr, APPEND: tl.constexpr, RING: tl.constexpr, PAGES: tl.constexpr):
    pid = tl.program_id(0)
    # Each program computes 2P outputs as two sets of P rows. With RoPE, row i and row i + HALF
    # of a head (the two halves the rotation mixes) land in the same program, one in each set.
    if ROPE:
        p = pid * P + tl.arange(0, P)
        r1 = (p // HALF) * (2 * HALF) + p % HALF
        r2 = r1 + HALF
    else:
        r1 = pid * 2 * P + tl.arange(0, P)
        r2 = r1 + P
    m1, m2 = r1 < N, r2 < N
    k = tl.arange(0, BLOCK_K)
    dtype = Y.dtype.element_ty
    r = 1.0
    if PROLOGUE == 1 or PROLOGUE == 2:  # the norm's scale needs the whole row first (L2-resident)
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k
            x = _residual(X, DELTA, kk, kk < K, PROLOGUE)
            if PROLOGUE == 2:
                if pid == 0:
                    tl.store(XOUT + kk, x, mask=kk < K)
            xf = x.to(tl.float32)
            ss += xf * xf
        r = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
    acc1 = tl.zeros([P, BLOCK_K], tl.float32)
    acc2 = tl.zeros([P, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        kmask = kk < K
        if PROLOGUE == 0:
            h = tl.load(X + kk, mask=kmask, other=0.0)
        elif PROLOGUE == 3:  # rounded as the reference's F.silu(gate) * up
            g = tl.load(X + kk, mask=kmask, other=0.0).to(tl.float32)
            u = tl.load(X + K + kk, mask=kmask, other=0.0).to(tl.float32)
            h = ((g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * u).to(dtype)
        else:  # normalised in fp32, rounded, times the norm's weight, rounded (as reference.rms_norm)
            x = _residual(X, DELTA, kk, kmask, PROLOGUE)
            y = (x.to(tl.float32) * r).to(dtype)
            h = (tl.load(NW + kk, mask=kmask, other=0.0).to(tl.float32) * y.to(tl.float32)).to(dtype)
        hf = h.to(tl.float32)[None, :]
        w1 = tl.load(W + r1.to(tl.int64)[:, None] * K + kk[None, :], mask=m1[:, None] & kmask[None, :], other=0.0)
        w2 = tl.load(W + r2.to(tl.int64)[:, None] * K + kk[None, :], mask=m2[:, None] & kmask[None, :], other=0.0)
        acc1 += w1.to(tl.float32) * hf
        acc2 += w2.to(tl.float32) * hf
    a1 = tl.sum(acc1, 1)
    a2 = tl.sum(acc2, 1)
    if HAS_BIAS:
        a1 += tl.load(BIAS + r1, mask=m1, other=0.0).to(tl.float32)
        a2 += tl.load(BIAS + r2, mask=m2, other=0.0).to(tl.float32)
    if ROPE:  # on the projection's rounded output, rows of q and k heads only (v is not rotated)
        a1 = a1.to(dtype).to(tl.float32)
        a2 = a2.to(dtype).to(tl.float32)
        pos = tl.load(POS).to(tl.int64)
        i = p % HALF
        c1 = tl.load(COS + pos * 2 * HALF + i).to(tl.float32)
        c2 = tl.load(COS + pos * 2 * HALF + HALF + i).to(tl.float32)
        s1 = tl.load(SIN + pos * 2 * HALF + i).to(tl.float32)
        s2 = tl.load(SIN + pos * 2 * HALF + HALF + i).to(tl.float32)
        rotate = r1 < n_rot_rows
        a1, a2 = tl.where(rotate, a1 * c1 - a2 * s1, a1), tl.where(rotate, a2 * c2 + a1 * s2, a2)
    if APPEND:
        _append_rows(a1, r1, m1, KC, VC, RK, RV, KMIN, KMAX, BOUNDS, k_first, kv_size, head_dim,
                     skh, skn, srh, srn, sph, spn, ring, page, RING, PAGES)
        _append_rows(a2, r2, m2, KC, VC, RK, RV, KMIN, KMAX, BOUNDS, k_first, kv_size, head_dim,
                     skh, skn, srh, srn, sph, spn, ring, page, RING, PAGES)
    tl.store(Y + r1, a1.to(dtype), mask=m1)
    tl.store(Y + r2, a2.to(dtype), mask=m2)


def config(N: int, K: int) -> tuple[int, int, int, int]:
    """Launch settings (rows per program, K block, warps, pipeline stages) for a weight [N, K],
    from bench/tune_linear.py --fused on an H200 (BENCHMARKS.md): two rows per program and
    512-wide blocks are the best setting for the q|k|v, o and down projections of TinyLlama and
    Qwen2.5-1.5B; the widest (gate|up, lm head) want more rows per program and narrower blocks."""
    if N >= 16384:
        return 32, 128, 8, 3
    if N >= 8192:
        return 16, 128, 8, 3
    return 2, 512, 4, 3


def _append_args(append, y: torch.Tensor) -> tuple[tuple, dict]:
    """_gemv's arguments for the KV append in its epilogue (unused pointers: y)."""
    if append is None:
        return (y,) * 7 + (0,) * 11, dict(APPEND=False, RING=False, PAGES=False)
    k, v, ring_k, ring_v, kmin, kmax, bounds, page_size = append
    B, Hkv, _, D = k.shape
    ring, pages = ring_k is not None, kmin is not None
    assert B == 1 and k.dtype == y.dtype and k.stride() == v.stride() and k.stride(-1) == 1
    assert not ring or (ring_k.stride() == ring_v.stride() and ring_k.stride(-1) == 1)
    assert not pages or (kmin.stride() == kmax.stride() and kmin.stride(-1) == 1)
    rs = ring_k.stride()[1:3] if ring else (0, 0)
    ps = kmin.stride()[1:3] if pages else (0, 0)
    ptrs = (k, v, ring_k if ring else y, ring_v if ring else y, kmin if pages else y, kmax if pages else y, bounds)
    scalars = (y.numel() - 2 * Hkv * D, Hkv * D, D, *k.stride()[1:3], *rs, *ps,
               ring_k.shape[2] if ring else 1, page_size if pages else 1)
    return ptrs + scalars, dict(APPEND=True, RING=ring, PAGES=pages)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prologue: int = PLAIN,
         delta: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         rope: tuple | None = None, append=None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = prologue(x) @ weight.T (+ bias), then RoPE if given, for one row x [K] (SILU_MUL: [2K]);
    returns (the residual x + delta when prologue is ADD_NORM else x, y [N]).
    rope = (cos, sin, positions [1], n_rot_heads, head_dim): rotate the first n_rot_heads heads.
    append (a reference.AppendTarget): y is a q|k|v row whose key and value are also stored there."""
    N, K = weight.shape
    assert weight.is_contiguous() and x.is_contiguous() and x.numel() == (2 * K if prologue == SILU_MUL else K)
    y = torch.empty(N, device=x.device, dtype=x.dtype)
    xout = torch.empty_like(x) if prologue == ADD_NORM else x
    rows, block_k, warps, stages = config(N, K)
    half, n_rot_rows, cos, sin, pos = 1, 0, y, y, y
    if rope is not None:
        cos, sin, pos, n_rot_heads, head_dim = rope
        assert cos.shape[-1] == head_dim and N % head_dim == 0, "the fused rotation needs full-width rotary"
        half, n_rot_rows = head_dim // 2, n_rot_heads * head_dim
    P = rows // 2
    append_args, append_flags = _append_args(append, y)
    _gemv[(triton.cdiv(N, 2 * P),)](
        x, delta if delta is not None else x, xout, norm_weight if norm_weight is not None else x, weight,
        bias if bias is not None else y, y, cos, sin, pos, N, K, eps, n_rot_rows, *append_args,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, ROPE=rope is not None, HALF=half, P=P, BLOCK_K=block_k,
        **append_flags, num_warps=warps, num_stages=stages)
    return xout, y
