"""KV caches. Each one stores keys/values and decides how a layer attends over them.

DenseCache: preallocated [layers, B, Hkv, capacity, D] storage, full attention.
CondensateCache: the same full history (so top-k can reach any position) plus an anchor (the
first A positions), a ring buffer holding the last W keys/values, and top-k selection of distant
positions by Q·K; decode attends with an exact softmax over anchor ∪ window ∪ top-k. It can also
certify each step by the attention mass the sparse set left out, and fall back to full attention
for heads where that mass exceeds a bound.
"""
from __future__ import annotations

import math

import torch

from . import kernels
from .config import CondensateConfig, ModelConfig


class CacheFullError(RuntimeError):
    """More tokens than the cache was allocated for."""


class DenseCache:
    def __init__(self, cfg: ModelConfig, capacity: int, batch: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.seq_len = 0

    def _reserve(self, n: int) -> tuple[int, int]:
        start, end = self.seq_len, self.seq_len + n
        if end > self.capacity:
            raise CacheFullError(f"cache holds {self.capacity} positions; {end} requested")
        return start, end

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
        start, end = self._reserve(k.shape[2])
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return start, end

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _, end = self._store(layer, k, v)
        return self._full(layer, q, end)

    def _full(self, layer: int, q: torch.Tensor, end: int) -> torch.Tensor:
        kh, vh = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if q.shape[2] == 1:
            return kernels.decode_attention(q[:, :, 0], kh, vh)[0][:, :, None]
        return kernels.causal_attention(q, kh, vh)

    def advance(self, n: int) -> None:
        self.seq_len += n

    def truncate(self, n: int) -> None:
        """Forget every position from n on (reuse a shared prefix, e.g. one document, many questions)."""
        if not 0 <= n <= self.seq_len:
            raise ValueError(f"cannot truncate a cache of {self.seq_len} positions to {n}")
        self.seq_len = n
        if n:
            self._derive(n - 1, n)

    def copy_prefix(self, src: "DenseCache") -> None:
        """Hold what `src` holds (prefill once, decode several ways): its keys/values and length,
        and whatever this cache derives from them."""
        n = src.seq_len
        self._reserve(n - self.seq_len)
        self.k[:, :, :, :n] = src.k[:, :, :, :n]
        self.v[:, :, :, :n] = src.v[:, :, :, :n]
        self.seq_len = n
        if n:
            self._derive(0, n)

    def _derive(self, start: int, end: int) -> None:
        """Rebuild what is derived from history positions [start, end), the last ones held (nothing here)."""


class CondensateCache(DenseCache):
    def __init__(self, cfg: ModelConfig, policy: CondensateConfig, capacity: int, batch: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 certify: bool = False):
        super().__init__(cfg, capacity, batch, device, dtype)
        bad = [i for i in policy.dense_layers if i >= cfg.n_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} out of range: the model has {cfg.n_layers} layers")
        self.policy = policy
        ring = (cfg.n_layers, batch, cfg.n_kv_heads, policy.window, cfg.head_dim)
        self.ring_k = torch.zeros(ring, device=device, dtype=dtype)
        self.ring_v = torch.zeros(ring, device=device, dtype=dtype)
        self.kmin = self.kmax = None
        if policy.selection == "pages":
            pages = (cfg.n_layers, batch, cfg.n_kv_heads, math.ceil(capacity / policy.page_size), cfg.head_dim)
            # fp8 summaries are rounded outward (kernels.reference.round_outward): still bounds
            summary = torch.float8_e4m3fn if policy.summary_dtype == "fp8" else dtype
            self.kmin = torch.empty(pages, device=device, dtype=summary)
            self.kmax = torch.empty(pages, device=device, dtype=summary)
        # Certificate: per decode step, the attention mass each head's sparse set left out.
        self.certify = certify or policy.max_dropped_mass is not None
        self.dropped = torch.zeros(cfg.n_layers, batch, cfg.n_heads)
        # With page selection and the certificate on: per layer, the fraction of the exact top-k
        # (by the same group-max score) that the page path found, for the last decode step.
        self.recall = torch.full((cfg.n_layers,), float("nan"))
        self.fallbacks = 0  # (layer, head, step) triples that fell back to full attention

    def _pages(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if self.kmin is None else (self.kmin[layer], self.kmax[layer])

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
        start, end = self._reserve(k.shape[2])
        kernels.append_kv(self.k[layer], self.v[layer], self.ring_k[layer], self.ring_v[layer], *self._pages(layer),
                          k, v, start, self.policy.page_size)
        return start, end

    def _derive(self, start: int, end: int) -> None:
        # The ring holds the last W positions; pages touching [start, end) are summarised again
        # (after truncate, the last page may have held positions past the new end).
        first = max(0, end - self.policy.window)
        kernels.fill_ring(self.ring_k, self.ring_v, self.k[:, :, :, first:end], self.v[:, :, :, first:end], first)
        if self.kmin is not None:
            P = self.policy.page_size
            for layer in range(self.k.shape[0]):
                kernels.update_pages(self.k[layer], *self._pages(layer), start // P * P, end, P)

    @staticmethod
    def _recall(scores: torch.Tensor, chosen: torch.Tensor, lo: int, hi: int, k_top: int) -> float:
        exact = kernels.topk_positions(scores.amax(dim=2), lo, hi, k_top)  # [B, Hkv, k]
        if exact.shape[-1] == 0:
            return 1.0
        hits = (exact[..., :, None] == chosen[..., None, :]).any(-1)  # chosen outside [lo, hi) never hit
        return float(hits.float().mean())

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _, end = self._store(layer, k, v)
        if q.shape[2] > 1 or layer in self.policy.dense_layers:
            self.dropped[layer] = 0.0
            return self._full(layer, q, end)  # prefill and dense layers: full attention
        return self._sparse(layer, q[:, :, 0], end)[:, :, None]

    def _sparse(self, layer: int, q: torch.Tensor, n: int) -> torch.Tensor:
        p = self.policy
        B, Hq, D = q.shape
        kh, vh = self.k[layer, :, :, :n], self.v[layer, :, :, :n]
        anchor = min(p.anchor, n)
        lo, hi = anchor, max(anchor, n - p.window)  # top-k candidates: neither anchor nor window
        scores = kernels.group_scores(q, kh) if self.certify else None  # per head, for the certificate
        k_top = p.budget(n)
        if p.selection == "pages":
            idx = kernels.page_select(q, self.k[layer], *self._pages(layer), lo, hi, k_top,
                                      p.page_size, p.page_oversample, p.scope)
        elif p.scope == "head":
            idx = kernels.topk_positions(scores if scores is not None else kernels.group_scores(q, kh), lo, hi, k_top)
        elif scores is not None:  # the certificate already scored every key: no second pass over them
            idx = kernels.topk_positions(scores.amax(dim=2), lo, hi, k_top)
        else:
            idx = kernels.exact_select(q, kh, lo, hi, k_top)
        out, lse = kernels.sparse_attention(q, self.ring_k[layer], self.ring_v[layer], kh, vh, idx, n, p.anchor)
        if not self.certify:
            return out
        if p.selection == "pages" and p.scope == "group":
            self.recall[layer] = self._recall(scores, idx, lo, hi, k_top)
        lse_all = torch.logsumexp(scores, dim=-1).reshape(B, Hq)
        dropped = (1 - torch.exp(lse - lse_all)).clamp(min=0)
        self.dropped[layer] = dropped.cpu()
        if p.max_dropped_mass is not None:
            fall = dropped > p.max_dropped_mass
            if fall.any():
                self.fallbacks += int(fall.sum())
                full = kernels.decode_attention(q, kh, vh)[0]
                out = torch.where(fall[..., None], full, out)
        return out
