"""Attention kernels. Each op runs the Triton kernel for CUDA tensors and the PyTorch reference
(kernels/reference.py) otherwise. MINIRT_KERNELS=reference forces the reference everywhere;
MINIRT_KERNELS=triton forces Triton everywhere (on CPU only under TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import torch

from . import reference
from .reference import (  # noqa: F401  (torch ops used as they are on every device)
    causal_attention,
    fill_ring,
    group_scores,
    topk_positions,
    update_pages,
)


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("MINIRT_KERNELS", "auto")
    if mode not in ("auto", "reference", "triton"):
        raise ValueError(f"MINIRT_KERNELS must be auto, reference or triton, not {mode!r}")
    return mode == "triton" or (mode == "auto" and t.is_cuda)


def _triton():
    from . import triton_attention  # imported lazily: CPU-only runs never need Triton

    return triton_attention


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (_triton() if use_triton(q) else reference).decode_attention(q, k, v)


def sparse_attention(q, ring_k, ring_v, k, v, idx, n: int, anchor: int):
    # The kernel takes one index list per KV group; per-head lists (scope="head") use the reference.
    impl = _triton() if use_triton(q) and idx.dim() == 3 else reference
    return impl.sparse_attention(q, ring_k, ring_v, k, v, idx, n, anchor)


def exact_select(q: torch.Tensor, k: torch.Tensor, lo: int, hi: int, k_top: int) -> torch.Tensor:
    fused = use_triton(q) and _triton().can_exact_select(lo, hi, k_top)
    return (_triton() if fused else reference).exact_select(q, k, lo, hi, k_top)


def page_select(q, k, kmin, kmax, lo: int, hi: int, k_top: int, page_size: int, oversample: float, scope: str):
    # The kernels keep one list per KV group; scope "head" and sizes past their limits use the reference.
    if use_triton(q) and scope == "group" and _triton().can_page_select(lo, hi, k_top, page_size, oversample):
        return _triton().page_select(q, k, kmin, kmax, lo, hi, k_top, page_size, oversample)
    return reference.page_select(q, k, kmin, kmax, lo, hi, k_top, page_size, oversample, scope)


def append_kv(k_store, v_store, ring_k, ring_v, kmin, kmax, k, v, start: int, page_size: int) -> None:
    # One fused kernel for the one-token decode append; prefill (T > 1) uses the reference.
    impl = _triton() if use_triton(k) and k.shape[2] == 1 else reference
    impl.append_kv(k_store, v_store, ring_k, ring_v, kmin, kmax, k, v, start, page_size)
