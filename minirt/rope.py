"""Rotary position embeddings: full or partial rotary, with linear and llama3 frequency scaling.

Keys are cached after rotation, so a cached key never needs its position again; that is what
lets the sparse cache keep keys in a ring buffer and gather them in any order.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # not meta
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling.get("original_max_position_embeddings", cfg.max_seq_len)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, blended, scaled)


class Rotary:
    """cos/sin tables precomputed per device and dtype for a cache's capacity; the rotation itself
    is kernels.rope_qkv_ (on q and k together, in place)."""

    # Not an nn.Module buffer on purpose: model.to(bf16) must not round the frequencies.
    def __init__(self, cfg: ModelConfig):
        self.inv_freq = inverse_frequencies(cfg)
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (device, dtype) -> cos, sin [positions, rot]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [T, rotary_dim], computed in fp32 then cast (as transformers does)."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def reserve(self, n: int, device: torch.device | str, dtype: torch.dtype) -> None:
        """Precompute cos/sin for positions [0, n) on device (a cache reserves its capacity)."""
        positions = torch.arange(n, device=device)
        have = self.tables.get((positions.device, dtype))
        if have is None or have[0].shape[0] < n:
            self.tables[(positions.device, dtype)] = self.cos_sin(positions, dtype)

    def table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if (device, dtype) not in self.tables:
            raise RuntimeError("no RoPE table for this device and dtype: make caches with LLM.new_cache, which reserves it")
        return self.tables[(device, dtype)]
