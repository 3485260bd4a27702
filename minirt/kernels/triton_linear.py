"""The decode step's projections as one Triton matrix-vector product each (batch 1, one token),
with the op before and the op after fused in (references: reference.norm_linear, silu_mul_linear).

At batch 1 a projection reads its weight once and does almost no math, so what costs is the launch
and the pass over memory around it: RMSNorm (with the residual add) is recomputed in each
program's prologue from the 2-16 KB input row, silu(gate) * up likewise, and RoPE is applied in
the epilogue of the fused q|k|v projection. A decoder layer is then four projections, the KV
append and attention: seven launches, not twelve. Prefill (many rows) stays on cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PLAIN, NORM, ADD_NORM, SILU_MUL = 0, 1, 2, 3  # the prologue: what the row multiplied by W is


@triton.jit
def _residual(X, DELTA, kk, kmask, PROLOGUE: tl.constexpr):
    x = tl.load(X + kk, mask=kmask, other=0.0)
    if PROLOGUE == 2:  # x + delta rounded to the stream's dtype, as the reference adds
        x = (x.to(tl.float32) + tl.load(DELTA + kk, mask=kmask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    return x


@triton.jit
def _gemv(X, DELTA, XOUT, NW, W, BIAS, Y, COS, SIN, POS, N, K, eps, n_rot_rows,
          PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr,
          P: tl.constexpr, BLOCK_K: tl.constexpr):
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


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prologue: int = PLAIN,
         delta: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         rope: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = prologue(x) @ weight.T (+ bias), then RoPE if given, for one row x [K] (SILU_MUL: [2K]);
    returns (the residual x + delta when prologue is ADD_NORM else x, y [N]).
    rope = (cos, sin, positions [1], n_rot_heads, head_dim): rotate the first n_rot_heads heads."""
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
    _gemv[(triton.cdiv(N, 2 * P),)](
        x, delta if delta is not None else x, xout, norm_weight if norm_weight is not None else x, weight,
        bias if bias is not None else y, y, cos, sin, pos, N, K, eps, n_rot_rows,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, ROPE=rope is not None, HALF=half, P=P, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return xout, y
