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
from dataclasses import dataclass

import torch

from . import kernels
from .config import ModelConfig


class CacheFullError(RuntimeError):
    """More tokens than the cache was allocated for."""


@dataclass(frozen=True)
class CondensateConfig:
    anchor: int = 4  # first positions always attended (the attention sink)
    window: int = 128  # most recent positions, kept in a ring buffer
    top_k: int = 32  # distant positions chosen by Q·K
    budget_alpha: float = 0.0  # if > 0: k = max(top_k, ceil(alpha * n ** budget_exponent))
    budget_exponent: float = 0.5
    dense_layers: tuple[int, ...] = ()  # layers that always attend to everything
    scope: str = "group"  # top-k shared by a KV group's query heads, or chosen per "head"
    selection: str = "exact"  # "exact": score every key; "pages": Quest-style page bounds first
    page_size: int = 32
    page_oversample: float = 16.0  # pages scored exactly = ceil(k * oversample / page_size)
    summary_dtype: str = "fp8"  # page min/max as fp8 rounded outward (half the bytes to scan), or "cache" dtype
    max_dropped_mass: float | None = None  # certificate: fall back to full attention above this

    def __post_init__(self) -> None:
        checks = [
            (self.anchor >= 0, "anchor must be >= 0"),
            (self.window >= 1, "window must be >= 1"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.budget_alpha >= 0, "budget_alpha must be >= 0"),
            (0 <= self.budget_exponent <= 1, "budget_exponent must be in [0, 1]"),
            (self.scope in ("group", "head"), "scope must be 'group' or 'head'"),
            (self.selection in ("exact", "pages"), "selection must be 'exact' or 'pages'"),
            (self.page_size >= 1, "page_size must be >= 1"),
            (self.page_oversample >= 1, "page_oversample must be >= 1"),
            (self.summary_dtype in ("cache", "fp8"), "summary_dtype must be 'cache' or 'fp8'"),
            (self.max_dropped_mass is None or 0 <= self.max_dropped_mass <= 1, "max_dropped_mass must be in [0, 1]"),
            (all(i >= 0 for i in self.dense_layers), "dense_layers must be layer indices >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def budget(self, n: int) -> int:
        """Top-k size at context length n (grows as alpha * n^C when alpha > 0)."""
        if self.budget_alpha > 0:
            return max(self.top_k, math.ceil(self.budget_alpha * n ** self.budget_exponent))
        return self.top_k


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

    def truncate(self, n: int) -> None:
        super().truncate(n)
        if n == 0:
            return
        # The ring and the last page may hold positions >= n: rebuild both from the history.
        first = max(0, n - self.policy.window)
        kernels.fill_ring(self.ring_k, self.ring_v, self.k[:, :, :, first:n], self.v[:, :, :, first:n], first)
        if self.kmin is not None:
            P = self.policy.page_size
            for layer in range(self.k.shape[0]):
                kernels.update_pages(self.k[layer], *self._pages(layer), (n - 1) // P * P, n, P)

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
