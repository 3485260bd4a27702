"""KV caches. Each one stores keys/values and decides how a layer attends over them.

DenseCache: preallocated [layers, B, Hkv, capacity, D] storage, full attention.
CondensateCache: the same full history (so top-k can reach any position) plus an anchor (the
first A positions), a ring buffer holding the last W keys/values, and top-k selection of distant
positions by Q·K; decode attends with an exact softmax over anchor ∪ window ∪ top-k. It can also
certify each step by the attention mass the sparse set left out, and fall back to full attention
for heads where that mass exceeds a bound.

Two paths. Prefill (T > 1 tokens) is eager and uses the host's count `seq_len`. A decode step
(one token) has static shapes: the new token's position lives on the device (`position`), the
step's lengths are computed there (`bounds`, see kernels.reference), and every kernel reads them
from memory, so a CUDA graph of the step replays at any length. Which kernels run is fixed when
the cache is built (the plan); a combination the GPU kernels do not implement is refused then.
"""
from __future__ import annotations

import copy
import math

import torch

from . import kernels
from .config import CondensateConfig, ModelConfig
from .kernels import reference

NEG_INF = float("-inf")


class CacheFullError(RuntimeError):
    """More tokens than the cache was allocated for."""


class DenseCache:
    anchor, window = 0, 0  # a decode step's bounds: (n, 0, n)

    def __init__(self, cfg: ModelConfig, capacity: int, batch: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.seq_len = 0  # positions held, as the host counts them
        self.ops = kernels.implementation(device)  # the plan: which kernels a decode step runs
        self.position = torch.zeros(1, dtype=torch.int64, device=device)  # the decode step's token position
        self.bounds = torch.zeros(3, dtype=torch.int32, device=device)  # the decode step's (n, lo, hi)
        self._set_length(0)

    @property
    def graphable(self) -> bool:
        """Whether a decode step runs without host syncs (so it can be captured in a CUDA graph)."""
        return self.ops is not reference and self.k.is_cuda

    def reserve(self, n: int) -> tuple[int, int]:
        """Positions [start, end) for n more tokens; CacheFullError past the capacity."""
        start, end = self.seq_len, self.seq_len + n
        if end > self.capacity:
            raise CacheFullError(f"cache holds {self.capacity} positions; {end} requested")
        return start, end

    def begin(self, T: int) -> torch.Tensor:
        """Positions [T] of the tokens about to be attended. One token: a decode step, whose
        position and bounds are already on the device (set by the step before, or the prefill)."""
        if T > 1:
            start, end = self.reserve(T)
            return torch.arange(start, end, device=self.k.device)
        return self.position

    def advance(self, T: int) -> None:
        """After T tokens were attended: the host's count, and after a prefill the device's position
        and bounds (a decode step moves them itself: end_step)."""
        self.seq_len += T
        if T > 1:
            self._set_length(self.seq_len)

    def end_step(self) -> None:
        """The decode step's last op: its position moves on and the next step's bounds follow, on the device."""
        self.ops.next_step(self.position, self.bounds, self.anchor, self.window)

    def append_target(self, layer: int) -> reference.AppendTarget:
        """Where a decode step's new key and value go (the q|k|v projection writes them there)."""
        return reference.AppendTarget(self.k[layer], self.v[layer], None, None, None, None, self.bounds, 0)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        """Store k, v [B, Hkv, T, D] and return attention for q [B, Hq, T, D]. A decode step's k and
        v may be None: its projection already wrote them at append_target."""
        if q.shape[2] > 1:
            start, end = self.seq_len, self.seq_len + q.shape[2]
            self._store(layer, k, v, start)
            return kernels.causal_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end])
        self._store_step(layer, k, v)
        return self._dense_step(layer, q[:, :, 0])[:, :, None]

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        self.k[layer, :, :, start:start + k.shape[2]] = k
        self.v[layer, :, :, start:start + k.shape[2]] = v

    def _store_step(self, layer: int, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        if k is not None:
            reference.append_new(self.append_target(layer), k, v, self.ops)

    def _dense_step(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.ops.decode_attention(q, self.k[layer], self.v[layer], self.bounds)[0]

    def truncate(self, n: int) -> None:
        """Forget every position from n on (reuse a shared prefix, e.g. one document, many questions)."""
        if not 0 <= n <= self.seq_len:
            raise ValueError(f"cannot truncate a cache of {self.seq_len} positions to {n}")
        self._set_length(n)
        if n:
            self._derive(n - 1, n)

    def reset_counts(self) -> None:
        """Zero what the cache counts over decode steps (nothing here; the certificate's fallbacks below)."""

    def copy_prefix(self, src: "DenseCache") -> None:
        """Hold what `src` holds (prefill once, decode several ways): its keys/values and length,
        and whatever this cache derives from them."""
        n = src.seq_len
        self.reserve(n - self.seq_len)
        self.k[:, :, :, :n] = src.k[:, :, :, :n]
        self.v[:, :, :, :n] = src.v[:, :, :, :n]
        self.hold(n)

    def hold(self, n: int) -> None:
        """Take the first n positions of the key/value stores, written directly (a copied prefix, or
        a benchmark's synthetic cache), as held: set the length and rebuild what derives from them."""
        self.reserve(n - self.seq_len)
        self._set_length(n)
        if n:
            self._derive(0, n)

    def fork(self) -> "DenseCache":
        """An independent copy of this cache's state, to continue two ways from one point."""
        twin = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(twin, name, value.clone())
        return twin

    def _set_length(self, n: int) -> None:
        """Hold n positions: the next decode step's position n and bounds, set from the host."""
        self.seq_len = n
        self.position.fill_(n)
        self.bounds.copy_(reference.step_bounds(*reference.sparse_bounds(n + 1, self.anchor, self.window), "cpu"))

    def _derive(self, start: int, end: int) -> None:
        """Rebuild what is derived from history positions [start, end), the last ones held (nothing here)."""


class CondensateCache(DenseCache):
    def __init__(self, cfg: ModelConfig, policy: CondensateConfig, capacity: int, batch: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 certify: bool = False):
        self.anchor, self.window = policy.anchor, policy.window  # before the base sets the first step's bounds
        self.tail_sums = None
        super().__init__(cfg, capacity, batch, device, dtype)
        bad = [i for i in policy.dense_layers if i >= cfg.n_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} out of range: the model has {cfg.n_layers} layers")
        self.policy = policy
        # certify: measure every head's dropped mass exactly (scores every key); int8 selection's
        # certified mode decides fallbacks from its own bound and needs no exact scores
        self.certify = certify or (policy.max_dropped_mass is not None and not policy.shadowed)
        self._check_plan(capacity)
        ring = (cfg.n_layers, batch, cfg.n_kv_heads, policy.window, cfg.head_dim)
        self.ring_k = torch.zeros(ring, device=device, dtype=dtype)
        self.ring_v = torch.zeros(ring, device=device, dtype=dtype)
        self.kmin = self.kmax = None
        if policy.paged:
            pages = (cfg.n_layers, batch, cfg.n_kv_heads, math.ceil(capacity / policy.page_size), cfg.head_dim)
            # fp8 summaries are rounded outward (kernels.reference.round_outward): still bounds
            summary = torch.float8_e4m3fn if policy.summary_dtype == "fp8" else dtype
            self.kmin = torch.empty(pages, device=device, dtype=summary)
            self.kmax = torch.empty(pages, device=device, dtype=summary)
        # int8 selection: each key's int8 copy and scale, made with per-channel offsets and scales
        # set from the keys of the first prefill (kernels.reference.quantize_keys, key_offsets,
        # channel_scales)
        self.kq = self.kscale = self.kchan = self.koffset = None
        if policy.shadowed:
            self.kq = torch.zeros(cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim, device=device,
                                  dtype=torch.int8)
            self.kscale = torch.zeros(cfg.n_layers, batch, cfg.n_kv_heads, capacity, device=device)
            self.kchan = torch.ones(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, device=device)
            self.koffset = torch.zeros_like(self.kchan)
            self.rotary_dim = cfg.rotary_dim if cfg.uses_rope else 0
        # the tail estimate's page summaries: fp32 key and value sums (mean = sum / page size)
        self.ksum = self.vsum = None
        if policy.tail and policy.whole_pages:
            self.ksum = torch.zeros(pages, device=device)
            self.vsum = torch.zeros(pages, device=device)
        # int8-threshold's tail: the candidates' value sum and the bins' sums (kernels.reference.Tail)
        if policy.tail and policy.selection == "int8-threshold":
            heads = (cfg.n_layers, batch, cfg.n_heads)
            self.tail_sums = (torch.zeros(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, device=device),
                              torch.full((cfg.n_layers, batch, cfg.n_kv_heads), -1, dtype=torch.int32, device=device),
                              torch.zeros(*heads, reference.PAGE_BINS, device=device),
                              torch.zeros(*heads, reference.PAGE_BINS, device=device),
                              torch.zeros(heads, dtype=torch.int32, device=device))
        # Certificate, on the device: per decode step, the attention mass each head's sparse set
        # left out; with page selection, per layer the fraction of the exact top-k (same group-max
        # score) it found; and how many (layer, head, step) triples fell back to full attention.
        self.dropped = torch.zeros(cfg.n_layers, batch, cfg.n_heads, device=device)
        self.recall = torch.full((cfg.n_layers,), float("nan"), device=device)
        self.fallback_count = torch.zeros((), dtype=torch.int64, device=device)
        # with certify: distant keys (top-k or certified) each KV group attended at each layer's last step
        self.selected = torch.zeros(cfg.n_layers, batch, cfg.n_kv_heads, device=device)
        # With page selection, scope group, on the reference path: an upper bound on each head's
        # dropped mass from the page bounds selection computed (kernels.reference.dropped_mass_bound);
        # certified int8-threshold selection writes its bound here only with certify (else into dropped).
        self.dropped_bound = torch.full((cfg.n_layers, batch, cfg.n_heads), float("nan"), device=device)

    def _check_plan(self, capacity: int) -> None:
        """Refuse, now, what the Triton decode step does not implement (never a silent slow path)."""
        p = self.policy
        if self.ops is reference:
            return
        k_top = min(p.top_k, capacity)
        fits = (self.ops.can_page_select(capacity, k_top, p.page_size, p.page_oversample, p.whole_pages) if p.paged
                else self.certify or p.shadowed or self.ops.can_exact_select(capacity, k_top))
        problems = [
            (p.scope == "head", "scope='head' (one top-k per query head) has no GPU kernel; use scope='group'"),
            (p.budget_alpha > 0, "a top-k that grows with the context (budget_alpha) has no GPU kernel"),
            (p.tail and p.whole_pages, "whole pages' tail estimate (tail=True) has no GPU kernel; int8-threshold's has"),
            (k_top > 0 and not fits, f"top_k={p.top_k} with {p.selection} selection is past the selection "
                                     "kernel's limits"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(f"{message} (or run the PyTorch reference: MINIRT_KERNELS=reference, no CUDA graph)")

    @property
    def fallbacks(self) -> int:
        return int(self.fallback_count)

    def reset_counts(self) -> None:
        self.fallback_count.zero_()

    def _set_length(self, n: int) -> None:
        super()._set_length(n)
        if self.tail_sums is not None:  # the candidates' value sum is summed again from scratch
            self.tail_sums[1].fill_(-1)

    def _tail(self, layer: int) -> reference.Tail | None:
        return None if self.tail_sums is None else reference.Tail(self.v[layer], *(x[layer] for x in self.tail_sums))

    def _pages(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if self.kmin is None else (self.kmin[layer], self.kmax[layer])

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        reference.append_kv(self.k[layer], self.v[layer], self.ring_k[layer], self.ring_v[layer], *self._pages(layer),
                            k, v, start, self.policy.page_size)
        self._update_sums(layer, start, start + k.shape[2])
        self._update_shadow(layer, start, start + k.shape[2])

    def append_target(self, layer: int) -> reference.AppendTarget:
        return reference.AppendTarget(self.k[layer], self.v[layer], self.ring_k[layer], self.ring_v[layer],
                                      *self._pages(layer), self.bounds, self.policy.page_size)

    def _store_step(self, layer: int, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        super()._store_step(layer, k, v)
        if self.kq is not None and self.policy.selection != "int8-threshold":  # (page_threshold writes its own)
            # the new key's int8 copy, at the position held on the device
            position = (self.bounds[:1] - 1).long()
            kq, scale = reference.quantize_keys(self.k[layer].index_select(2, position), *self._frame(layer))
            self.kq[layer].index_copy_(2, position, kq)
            self.kscale[layer].index_copy_(2, position, scale)
        if self.ksum is not None:  # the reference path only (_check_plan): the position is read on the host
            position = int(self.bounds[0]) - 1
            self._update_sums(layer, position, position + 1)

    def _update_sums(self, layer: int, start: int, end: int) -> None:
        if self.ksum is not None:
            reference.update_page_sums(self.k[layer], self.v[layer], self.ksum[layer], self.vsum[layer], start, end,
                                       self.policy.page_size)

    def _update_shadow(self, layer: int, start: int, end: int) -> None:
        if self.kq is not None:
            keys = self.k[layer, :, :, start:end]
            if start == 0:  # the first keys set the offsets and scales; every later key is quantised with them
                self.kchan[layer], self.koffset[layer] = reference.key_frame(keys, self.rotary_dim)
            self.kq[layer, :, :, start:end], self.kscale[layer, :, :, start:end] = reference.quantize_keys(
                keys, *self._frame(layer))

    def _frame(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's channel scales and offsets, shaped to broadcast against keys [B, Hkv, n, D]."""
        return self.kchan[layer][:, :, None], self.koffset[layer][:, :, None]

    def _derive(self, start: int, end: int) -> None:
        # The ring holds the last W positions; pages touching [start, end) are summarised again
        # (after truncate, the last page may have held positions past the new end).
        first = max(0, end - self.policy.window)
        kernels.fill_ring(self.ring_k, self.ring_v, self.k[:, :, :, first:end], self.v[:, :, :, first:end], first)
        if self.kmin is not None:
            P = self.policy.page_size
            for layer in range(self.k.shape[0]):
                kernels.update_pages(self.k[layer], *self._pages(layer), start // P * P, end, P)
                self._update_sums(layer, start // P * P, end)
        for layer in range(self.k.shape[0]):
            self._update_shadow(layer, start, end)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        if q.shape[2] > 1:  # prefill: full attention
            self.dropped[layer] = 0.0
            return super().attend(layer, q, k, v)
        self._store_step(layer, k, v)
        if layer in self.policy.dense_layers:
            self.dropped[layer] = 0.0
            return self._dense_step(layer, q[:, :, 0])[:, :, None]
        return self._sparse_step(layer, q[:, :, 0])[:, :, None]

    def _top_k(self) -> int:
        p = self.policy  # a growing budget runs on the reference only (_check_plan), where n is at hand
        return min(p.budget(int(self.bounds[0])) if p.budget_alpha > 0 else p.top_k, self.capacity)

    def _in_range(self, scores: torch.Tensor, k_top: int) -> torch.Tensor:
        """The k_top best positions in [lo, hi) of scores [..., capacity], -1 where fewer: static shapes."""
        s = scores.masked_fill(~reference.candidates(scores, self.bounds), NEG_INF)
        best, idx = s.topk(min(k_top, s.shape[-1]), dim=-1)
        return reference.padded(torch.where(best > NEG_INF, idx, -1), k_top)

    def _sparse_step(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        p = self.policy
        if p.selection == "int8-threshold":
            return self._threshold_step(layer, q)
        ks, vs = self.k[layer], self.v[layer]
        k_top = self._top_k()
        scores = lse_all = shadow = None
        if self.certify or p.scope == "head":  # per head, every live key: the certificate's exact mass
            scores, lse_all = self._exact_scores(layer, q)
        if self.kq is not None:  # every key's logit from its int8 copy, and its error bound
            shadow = reference.shadow_scores(q, self.kq[layer], self.kscale[layer], self.bounds[0],
                                             self.kchan[layer], self.koffset[layer])
        idx = self._select(layer, q, k_top, scores, lse_all, shadow)
        if self.certify:  # measured for equivalence reports only: no extra launches on the plain decode path
            self.selected[layer] = (idx >= 0).flatten(2).sum(-1) / (idx.shape[2] if idx.dim() == 4 else 1)
        tail = None if self.ksum is None else (self.ksum[layer], self.vsum[layer], p.page_size)
        out, lse = self.ops.sparse_attention(q, self.ring_k[layer], self.ring_v[layer], ks, vs, idx, self.bounds, p.anchor,
                                             tail=tail)
        bound = None
        if shadow is not None and p.max_dropped_mass is not None:
            bound = reference.shadow_bound(*shadow, self.bounds, idx, lse)
            self.dropped_bound[layer] = bound
        if not self.certify:
            if bound is None:
                return out
            self.dropped[layer] = bound  # no exact scores: the bound stands for the dropped mass
            return self._fall_back(layer, q, out, bound)
        if p.paged and p.scope == "group":
            exact = self._in_range(scores.amax(dim=2), k_top)
            valid = exact >= 0
            hits = ((exact[..., :, None] == idx[..., None, :]).any(-1) & valid).sum()
            self.recall[layer] = torch.where(valid.any(), hits / valid.sum().clamp(min=1), 1.0)
        if p.paged and p.scope == "group" and self.ops is reference:  # whole pages: every token of the pages counted
            self.dropped_bound[layer] = reference.dropped_mass_bound(
                q, ks, *self._pages(layer), self.bounds, idx, lse, k_top, p.page_size,
                1.0 if p.whole_pages else p.page_oversample)
        dropped = self._exact_dropped(layer, q, lse, lse_all)
        if p.max_dropped_mass is None:
            return out
        return self._fall_back(layer, q, out, dropped if bound is None else bound)

    def _exact_scores(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's logits over the cache [B, Hkv, G, capacity] (-inf past n), and their log-sum-exp [B, Hkv, G]."""
        j = torch.arange(self.k.shape[3], device=q.device)
        scores = kernels.group_scores(q, self.k[layer]).masked_fill(j >= self.bounds[0], NEG_INF)
        return scores, torch.logsumexp(scores, dim=-1)

    def _exact_dropped(self, layer: int, q: torch.Tensor, lse: torch.Tensor, lse_all: torch.Tensor) -> torch.Tensor:
        """Each head's attention mass outside its attended set (lse) from every key's (lse_all), recorded."""
        dropped = (1 - torch.exp(lse - lse_all.reshape(lse.shape))).clamp(min=0)
        self.dropped[layer] = dropped
        return dropped

    def _threshold_step(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Certified whole pages from the int8 copies (kernels.reference.page_threshold): the bound
        U / (Z_set + U) decides each head's fallback; with certify the exact dropped mass is recorded."""
        p, ks, vs, tail = self.policy, self.k[layer], self.v[layer], self._tail(layer)
        page_bin, threshold, log_rest = self.ops.page_threshold(q, ks, self.kq[layer], self.kscale[layer],
                                                                self.kchan[layer], self.koffset[layer], self.bounds,
                                                                p.max_dropped_mass,
                                                                p.page_size, tail)
        # the attention writes the bound where it is kept, no copy: without certify it stands for the dropped mass
        kept_at = (self.dropped_bound if self.certify else self.dropped)[layer]
        out, lse, bound = self.ops.page_filtered_attention(q, self.ring_k[layer], self.ring_v[layer], ks, vs,
                                                           page_bin, threshold, log_rest, self.bounds, p.anchor,
                                                           p.page_size, tail=tail, bound=kept_at)
        if self.certify:  # measured for equivalence reports: keys attended, exact dropped mass
            keep = reference.kept_positions(page_bin, threshold, p.page_size, ks.shape[2])
            self.selected[layer] = (keep & reference.candidates(keep, self.bounds)).sum(-1)
            self._exact_dropped(layer, q, lse, self._exact_scores(layer, q)[1])
        return self._fall_back(layer, q, out, bound)

    def _select(self, layer: int, q: torch.Tensor, k_top: int, scores: torch.Tensor | None,
                lse_all: torch.Tensor | None, shadow: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The distant positions to attend, [B, Hkv, K] (or [B, Hkv, G, K] per head), -1 padded."""
        p, ks = self.policy, self.k[layer]
        if k_top == 0:  # anchor and window only
            return torch.empty(q.shape[0], ks.shape[1], 0, dtype=torch.int64, device=q.device)
        if p.certified and shadow is not None:  # as few keys as provably keep every head within eps
            return reference.bounded_select(*shadow, self.bounds, p.max_dropped_mass, k_top)
        if p.certified:  # as few keys as keep every head of the group within eps, by exact scores
            return reference.certified_select(scores, lse_all, self.bounds, p.max_dropped_mass, k_top)
        if shadow is not None:
            return self._in_range(shadow[0].amax(dim=2), k_top)
        if p.paged:
            return self.ops.page_select(q, ks, *self._pages(layer), self.bounds, k_top, p.page_size,
                                        p.page_oversample, p.scope, p.whole_pages)
        if p.scope == "head":
            return self._in_range(scores, k_top)
        if scores is not None:  # the certificate already scored every key: no second pass over them
            return self._in_range(scores.amax(dim=2), k_top)
        return self.ops.exact_select(q, ks, self.bounds, k_top)

    def _fall_back(self, layer: int, q: torch.Tensor, out: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """Full attention for the heads whose dropped mass (or its bound) is not below
        max_dropped_mass (so eps = 0 is full attention, exactly). Launched every step (a static
        graph has no branches), but the kernel reads keys only for the KV groups that fall back."""
        return self.ops.fall_back(q, self.k[layer], self.v[layer], self.bounds, out, dropped,
                                  self.policy.max_dropped_mass, self.fallback_count)
