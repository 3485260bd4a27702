"""Attention kernels. Each op runs the Triton kernel for CUDA tensors and the PyTorch reference
(kernels/reference.py) otherwise. MINIRT_KERNELS=reference forces the reference everywhere;
MINIRT_KERNELS=triton forces Triton everywhere (on CPU only under TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import torch

from . import reference
from .reference import causal_attention, group_scores, topk_positions  # noqa: F401  (SDPA / torch ops)


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


def sparse_attention(q, ring_k, ring_v, ring_valid, k, v, idx) -> tuple[torch.Tensor, torch.Tensor]:
    # The kernel takes one index list per KV group; per-head lists (scope="head") use the reference.
    impl = _triton() if use_triton(q) and idx.dim() == 3 else reference
    return impl.sparse_attention(q, ring_k, ring_v, ring_valid, k, v, idx)


def group_max_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return (_triton() if use_triton(q) else reference).group_max_scores(q, k)


def page_topk(q, k, kmin, kmax, lo, hi, k_top, page_size, oversample, scope) -> torch.Tensor:
    impl = _triton() if use_triton(q) else reference
    return reference.page_topk(q, k, kmin, kmax, lo, hi, k_top, page_size, oversample, scope,
                               bounds_fn=impl.page_bounds, scores_at_fn=impl.gathered_group_max_scores)
