"""Attention kernels: Triton (triton_attention.py) and a PyTorch reference beside each
(reference.py). A cache picks one implementation when it is built (implementation()), never per
call: Triton for CUDA tensors, the reference elsewhere. MINIRT_KERNELS=reference forces the
reference everywhere; MINIRT_KERNELS=triton forces Triton everywhere (on CPU only under
TRITON_INTERPRET=1). Ops with no kernel of their own (prefill attention, ring/page rebuilds,
per-head scores) are the reference's on every device."""
from __future__ import annotations

import os
from types import ModuleType

import torch

from . import reference
from .reference import (  # noqa: F401  (torch ops used as they are on every device)
    causal_attention,
    fill_ring,
    group_scores,
    update_pages,
)


def _triton(device: torch.device | str) -> bool:
    mode = os.environ.get("MINIRT_KERNELS", "auto")
    if mode not in ("auto", "reference", "triton"):
        raise ValueError(f"MINIRT_KERNELS must be auto, reference or triton, not {mode!r}")
    return mode == "triton" or (mode == "auto" and torch.device(device).type == "cuda")


def layer_implementation(device: torch.device | str) -> ModuleType:
    """The module whose layer ops (norms, projections with what they fuse, RoPE, silu * up) a model
    on `device` runs."""
    if _triton(device):
        from . import triton_layers

        return triton_layers
    return reference


def implementation(device: torch.device | str) -> ModuleType:
    """The module whose decode_attention, sparse_attention, exact_select, page_select and
    append_kv a cache on `device` runs."""
    if _triton(device):
        from . import triton_attention  # imported lazily: CPU-only runs never need Triton

        return triton_attention
    return reference
