"""Attention kernels. Each op runs the Triton kernel for CUDA tensors and the PyTorch reference
(kernels/reference.py) otherwise. MINIRT_KERNELS=reference forces the reference everywhere;
MINIRT_KERNELS=triton forces Triton everywhere (on CPU only under TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import torch

from . import reference
from .reference import (  # noqa: F401  (torch ops used as they are on every device)
    LayerKV,
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


def append_kv(k_store, v_store, ring_k, ring_v, kmin, kmax, k, v, start: int, page_size: int) -> None:
    # One fused kernel for the one-token decode append; prefill (T > 1) uses the reference.
    impl = _triton() if use_triton(k) and k.shape[2] == 1 else reference
    impl.append_kv(k_store, v_store, ring_k, ring_v, kmin, kmax, k, v, start, page_size)


def sparse_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kv: LayerKV, pos: int, anchor: int,
                  k_top: int, page_size: int, oversample: float, scope: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step of a condensate layer: choose up to k_top positions of [a, hi) (a =
    min(anchor, n), hi = n - W, n = pos + 1) by exact Q·K, or with page summaries (kv.kmin set)
    Quest-style; append k_new/v_new [B, Hkv, 1, D] at pos; attend over window ∪ anchor ∪ chosen.

    Selection reads the cache as it was before this step: the new key is in the window, never
    a candidate, and page bounds do not yet include it. Returns out [B, Hq, D], the log-sum-exp
    of the attended logits [B, Hq] and the chosen positions (-1: none; [B, Hkv, K] for scope
    "group", [B, Hkv, G, K] for "head"). Two Triton launches where they fit, else the ops below.
    """
    n, W = pos + 1, kv.ring_k.shape[2]
    lo = min(anchor, n)
    hi = max(lo, n - W)
    pages = kv.kmin is not None
    if use_triton(q) and scope == "group" and _triton().can_sparse_decode(lo, hi, k_top, page_size, oversample, pages):
        return _triton().sparse_decode(q, k_new, v_new, kv, pos, anchor, k_top, page_size, oversample)
    if pages:
        idx = reference.page_select(q, kv.k, kv.kmin, kv.kmax, lo, hi, k_top, page_size, oversample, scope)
    elif scope == "head":
        idx = topk_positions(group_scores(q, kv.k[:, :, :hi]), lo, hi, k_top)
    else:
        idx = reference.exact_select(q, kv.k, lo, hi, k_top)
    append_kv(*kv, k_new, v_new, pos, page_size)
    out, lse = sparse_attention(q, kv.ring_k, kv.ring_v, kv.k[:, :, :n], kv.v[:, :, :n], idx, n, anchor)
    return out, lse, idx
