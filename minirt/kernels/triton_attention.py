"""Triton decode-attention and selection kernels (references: kernels/reference.py).

Decode attention is flash-decoding: the key range is split across programs, each program serves
all G query heads of one KV head (so each K/V byte is read once per step, GQA-aware), keeps an
online softmax, and writes a partial output plus its log-sum-exp; a second kernel merges splits.
The sparse variant runs the same loop over a virtual sequence: W ring-buffer slots followed by K
gathered history positions (anchor + top-k), loaded in place with no gathered copy of K/V.

Scoring computes the group-max of q·k per position (exact top-k input), either over a contiguous
range or over gathered positions, and the Quest page bound q+·kmax + q-·kmin over page summaries.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's CPU interpreter computes tl.dot on bf16 operands wrongly (seen with 3.9: values
    # ~1e10), so under TRITON_INTERPRET bf16 operands are upcast; their bf16 rounding is kept.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attn_partial(
    Q, K, V, RK, RV, RVALID, IDX, OP, LP,
    sqb, sqh, skb, skh, skn, srb, srh, srn, sib, sih,
    n_keys, W, keys_per_split, scale, Hkv,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
            is_ring = j < W
            ring_ok = tl.load(RVALID + j, mask=in_range & is_ring, other=0) != 0
            pos = tl.load(IDX + b * sib + h * sih + (j - W), mask=in_range & (j >= W), other=-1)
            valid = in_range & ((is_ring & ring_ok) | ((j >= W) & (pos >= 0)))
            ring_off = (b * srb + h * srh + j * srn)[:, None] + d[None, :]
            hist_off = (b * skb + h * skh + pos.to(tl.int64) * skn)[:, None] + d[None, :]
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


def _splits(n_keys: int, programs: int, block: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs, each with at least a few blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(n_keys, 4 * block), triton.cdiv(2 * sms, programs), 256))


def _attention(q, k, v, n_keys, sparse_args, out=None, block_n: int = 64):
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride() == k.stride()
    G_PAD, D_PAD = _pow2(G), _pow2(D)
    S = _splits(n_keys, B * Hkv, block_n, q.device)
    per_split = triton.cdiv(triton.cdiv(n_keys, S), block_n) * block_n
    S = triton.cdiv(n_keys, per_split) if n_keys else 1
    op = torch.empty(B * Hkv * S, G_PAD, D_PAD, device=q.device, dtype=torch.float32)
    lp = torch.empty(B * Hkv * S, G_PAD, device=q.device, dtype=torch.float32)
    if sparse_args is None:
        rk = rv = rvalid = idx = k  # unused placeholders
        ring_strides, idx_strides, W, sparse = (0, 0, 0), (0, 0), 0, False
    else:
        rk, rv, rvalid, idx = sparse_args
        assert rv.stride() == rk.stride() and rk.stride(-1) == 1 and idx.stride(-1) == 1
        ring_strides, idx_strides, W, sparse = rk.stride()[:3], idx.stride()[:2], rk.shape[2], True
    _attn_partial[(B * Hkv, S)](
        q, k, v, rk, rv, rvalid, idx, op, lp,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), *ring_strides, *idx_strides,
        n_keys, W, per_split, 1.0 / math.sqrt(D), Hkv,
        G=G, G_PAD=G_PAD, D=D, D_PAD=D_PAD, BLOCK_N=block_n, SPARSE=sparse, **_precision(q),
    )
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty(B, Hq, device=q.device, dtype=torch.float32)
    _attn_reduce[(B * Hq,)](op, lp, out, lse, S, G=G, G_PAD=G_PAD, D=D, D_PAD=D_PAD, S_PAD=_pow2(S, 1))
    return out, lse


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode attention over k/v [B, Hkv, n, D]; see reference.decode_attention."""
    return _attention(q, k, v, k.shape[2], None, out)


def sparse_attention(q, ring_k, ring_v, ring_valid, k, v, idx, out: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring window + gathered positions idx [B, Hkv, K]; see reference.sparse_attention."""
    valid = ring_valid.to(torch.int8)
    return _attention(q, k, v, ring_k.shape[2] + idx.shape[2], (ring_k, ring_v, valid, idx.contiguous()), out)


@triton.jit
def _scores(
    Q, K, K2, IDX, OUT, sqb, sqh, skb, skh, skn, sib, sih, n, scale, Hkv,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MODE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """MODE 0: max over the group of q·k[j]; 1: the same at gathered positions IDX[j];
    2: page bound max_g (q+·K[j] + q-·K2[j]) with K = page max, K2 = page min."""
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gmask = g < G
    dmask = d < D
    jmask = j < n
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    if MODE == 1:
        pos = tl.load(IDX + b * sib + h * sih + j, mask=jmask, other=0).to(tl.int64)
    else:
        pos = j.to(tl.int64)
    off = (b * skb + h * skh + pos * skn)[:, None] + d[None, :]
    lmask = jmask[:, None] & dmask[None, :]
    k = tl.load(K + off, mask=lmask, other=0.0)
    if MODE == 2:
        kmin = tl.load(K2 + off, mask=lmask, other=0.0)
        qf = q.to(tl.float32)  # split signs in fp32 (exact; also sidesteps the interpreter's bf16)
        s = _dot(tl.maximum(qf, 0.0).to(k.dtype), tl.trans(k), PRECISION, UPCAST)
        s += _dot(tl.minimum(qf, 0.0).to(k.dtype), tl.trans(kmin), PRECISION, UPCAST)
    else:
        s = _dot(q, tl.trans(k), PRECISION, UPCAST)
    s = tl.where(gmask[:, None], s * scale, float("-inf"))
    tl.store(OUT + pid_bh * n + j, tl.max(s, 0), mask=jmask)


def _launch_scores(q, k, k2, idx, n, mode, block_n: int = 64) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.empty(B, Hkv, n, device=q.device, dtype=torch.float32)
    if n == 0:
        return out
    assert k.stride(-1) == 1 and (k2 is None or k2.stride() == k.stride())
    idx_strides = idx.stride()[:2] if idx is not None else (0, 0)
    _scores[(B * Hkv, triton.cdiv(n, block_n))](
        q, k, k2 if k2 is not None else k, idx if idx is not None else k, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), *idx_strides, n, 1.0 / math.sqrt(D), Hkv,
        G=G, G_PAD=_pow2(G), D=D, D_PAD=_pow2(D), BLOCK_N=block_n, MODE=mode, **_precision(q),
    )
    return out


def group_max_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """max over each KV group's query heads of q·k / sqrt(D): [B, Hkv, n] (fp32)."""
    return _launch_scores(q, k, None, None, k.shape[2], mode=0)


def gathered_group_max_scores(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """group_max_scores at positions idx [B, Hkv, m] (all valid): [B, Hkv, m]."""
    idx = idx.contiguous()
    return _launch_scores(q, k, None, idx, idx.shape[2], mode=1)


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest upper bound per page, max over the group: [B, Hkv, pages]; see reference.page_bounds."""
    return _launch_scores(q, kmax, kmin, None, kmax.shape[2], mode=2)
