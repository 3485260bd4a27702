"""Attention kernels. Each op here picks the Triton kernel on CUDA and the PyTorch reference
(kernels/reference.py) elsewhere; MINIRT_KERNELS=reference forces the reference everywhere."""
from __future__ import annotations

from .reference import (  # noqa: F401  (ops without a Triton version yet)
    causal_attention,
    decode_attention,
    group_scores,
    page_topk,
    sparse_attention,
    topk_positions,
)
