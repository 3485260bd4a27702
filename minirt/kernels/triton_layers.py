"""Triton kernels for the layer math around attention (references: kernels/reference.py).

At batch 1 a decode step is a few hundred small launches; RMSNorm, RoPE and the gated MLP's
activation written as PyTorch ops are most of them (an RMSNorm is seven kernels, a RoPE on q and k
a dozen). Each is one launch here, and the residual add rides along with the norm that follows it.
In a decode step (one row) they go further: the add and the norm, silu(gate) * up, and RoPE ride
inside the projections' GEMV (triton_linear.py), so a layer is four projections and attention.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference, triton_attention
from .triton_linear import ADD_NORM, NORM, SILU_MUL, gemv


@triton.jit
def _rms_norm(X, DELTA, XOUT, W, Y, N, eps, BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    mask = i < N
    x = tl.load(X + row * N + i, mask=mask, other=0.0)
    if ADD:  # the residual add, rounded to the stream's dtype before the norm reads it (as the reference)
        x = (x.to(tl.float32) + tl.load(DELTA + row * N + i, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(XOUT + row * N + i, x, mask=mask)
    x = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    y = (x * r).to(Y.dtype.element_ty)  # normalised in fp32, cast back before the weight (as the reference)
    w = tl.load(W + i, mask=mask)
    tl.store(Y + row * N + i, (w.to(tl.float32) * y.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x; see reference.rms_norm."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    assert x2.is_contiguous() and weight.is_contiguous()
    y = torch.empty_like(x2)
    _rms_norm[(x2.shape[0],)](x2, x2, x2, weight, y, N, eps, BLOCK=triton.next_power_of_2(N), ADD=False)
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x + delta and its RMSNorm in one launch (one fewer per norm in a decode step); see
    reference.add_rms_norm."""
    N = x.shape[-1]
    x2, d2 = x.reshape(-1, N).contiguous(), delta.reshape(-1, N).contiguous()
    assert weight.is_contiguous()
    out, y = torch.empty_like(x2), torch.empty_like(x2)
    _rms_norm[(x2.shape[0],)](x2, d2, out, weight, y, N, eps, BLOCK=triton.next_power_of_2(N), ADD=True)
    return out.view(x.shape), y.view(x.shape)


@triton.jit
def _rope(QKV, COS, SIN, POS, row_stride, n_rot_heads, D: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0)  # token (row of qkv)
    h = tl.program_id(1)  # a q or k head
    i = tl.arange(0, HALF_PAD)
    mask = i < HALF
    p = tl.load(POS + t).to(tl.int64)
    base = QKV + t * row_stride + h * D
    x1 = tl.load(base + i, mask=mask).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=mask).to(tl.float32)
    cos1 = tl.load(COS + p * 2 * HALF + i, mask=mask).to(tl.float32)
    cos2 = tl.load(COS + p * 2 * HALF + HALF + i, mask=mask).to(tl.float32)
    sin1 = tl.load(SIN + p * 2 * HALF + i, mask=mask).to(tl.float32)
    sin2 = tl.load(SIN + p * 2 * HALF + HALF + i, mask=mask).to(tl.float32)
    tl.store(base + i, (x1 * cos1 - x2 * sin1).to(QKV.dtype.element_ty), mask=mask)
    tl.store(base + HALF + i, (x2 * cos2 + x1 * sin2).to(QKV.dtype.element_ty), mask=mask)


def rope_qkv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              n_rot_heads: int, head_dim: int) -> None:
    """Rotate, in place, the first n_rot_heads heads (q then k) of the fused projection qkv [B, T, *]
    at positions [T], with the tables cos/sin [positions, rot]; see reference.rope_qkv_."""
    B, T, width = qkv.shape
    rot = cos.shape[-1]
    assert qkv.is_contiguous() and cos.is_contiguous() and B * T == positions.numel() * B
    rows = qkv.view(B * T, width)
    pos = positions.repeat(B) if B > 1 else positions
    _rope[(B * T, n_rot_heads)](rows, cos, sin, pos, width, n_rot_heads, D=head_dim, HALF=rot // 2,
                                 HALF_PAD=triton.next_power_of_2(rot // 2))


@triton.jit
def _silu_mul(GU, Y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < F
    g = tl.load(GU + row * 2 * F + col, mask=mask).to(tl.float32)
    u = tl.load(GU + row * 2 * F + F + col, mask=mask).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty)  # rounded as the reference's F.silu is
    tl.store(Y + row * F + col, (silu.to(tl.float32) * u).to(Y.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused projection [..., 2F] -> [..., F]; see reference.silu_mul."""
    F = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * F)
    assert x.is_contiguous()
    y = torch.empty(x.shape[0], F, device=x.device, dtype=x.dtype)
    BLOCK = 1024
    _silu_mul[(x.shape[0], triton.cdiv(F, BLOCK))](x, y, F, BLOCK=BLOCK)
    return y.view(*gate_up.shape[:-1], F)


def _one_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): the Triton GEMV for one row (a decode step), cuBLAS otherwise."""
    if not _one_row(x):
        return F.linear(x, weight, bias)
    return gemv(x.contiguous().view(-1), weight, bias)[1].view(*x.shape[:-1], -1)


def norm_linear(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None, rope: tuple | None = None,
                append: reference.AppendTarget | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See reference.norm_linear. One row: one launch, the add and the norm in the GEMV's prologue,
    RoPE (full-width rotary) and the KV append in its epilogue; otherwise the norm kernel, cuBLAS,
    the RoPE kernel and the append kernel."""
    if _one_row(x) and (rope is None or rope[0].shape[-1] == rope[4]):
        prologue = NORM if delta is None else ADD_NORM
        xout, y = gemv(x.contiguous().view(-1), weight, bias, prologue=prologue,
                       delta=None if delta is None else delta.contiguous().view(-1),
                       norm_weight=norm_weight, eps=eps, rope=rope, append=append)
        return xout.view(x.shape), y.view(*x.shape[:-1], -1)
    return reference.norm_linear(x, delta, norm_weight, eps, weight, bias, rope, append, ops=sys.modules[__name__])


def append_qkv(qkv: torch.Tensor, target: reference.AppendTarget) -> None:
    """See reference.append_qkv: one append launch (when the projection could not fuse it)."""
    reference.append_qkv(qkv, target, ops=triton_attention)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """See reference.silu_mul_linear. One row: silu(gate) * up in the GEMV's prologue (one launch)."""
    if not _one_row(gate_up):
        return F.linear(silu_mul(gate_up), weight, bias)
    return gemv(gate_up.contiguous().view(-1), weight, bias, prologue=SILU_MUL)[1].view(*gate_up.shape[:-1], -1)


@triton.jit
def _greedy_choice(LOGITS, OUT, NEXT, TOKEN, V, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int64)
    for v0 in range(0, V, BLOCK):
        i = v0 + tl.arange(0, BLOCK)
        mask = i < V
        x = tl.load(LOGITS + row * stride + i, mask=mask, other=float("-inf")).to(tl.float32)
        tl.store(OUT + row * V + i, x, mask=mask)
        block_best = tl.max(x, 0)
        better = block_best > best  # strictly: an earlier block keeps a tie, as torch.argmax
        best_i = tl.where(better, v0 + tl.argmax(x, 0, tie_break_left=True).to(tl.int64), best_i)
        best = tl.maximum(best, block_best)
    tl.store(NEXT + row, best_i)
    tl.store(TOKEN + row, best_i)


def greedy_choice(logits: torch.Tensor, logits_out: torch.Tensor, next_token: torch.Tensor, token: torch.Tensor) -> None:
    """reference.greedy_choice in one launch (four there: copy, argmax and two copies)."""
    B, V = logits.shape
    assert logits.stride(-1) == 1 and logits_out.is_contiguous() and logits_out.dtype == torch.float32
    assert next_token.is_contiguous() and token.is_contiguous()
    # one program per row; 16K-wide blocks and 16 warps: 5.3 us for 32K logits, 23 us for 152K (H200)
    _greedy_choice[(B,)](logits, logits_out, next_token, token, V, logits.stride(0), BLOCK=16384, num_warps=16)
