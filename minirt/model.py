"""minirt's layer graph: one Transformer class for every family, configured by ModelConfig.

Attention does not own its KV storage or its attention algorithm: it hands rotated q/k/v to the
cache (cache.py), which appends them and attends with whatever policy it implements (dense,
condensate sparse) through the kernels in minirt.kernels. The model code never changes for that.
"""
from __future__ import annotations

from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kernels import reference
from .rope import Rotary

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class AttentionCache(Protocol):
    """What a layer needs from a KV cache (DenseCache and CondensateCache implement it)."""

    def begin(self, T: int) -> torch.Tensor:
        """Positions [T] (on the device) of the T tokens about to be attended."""
        ...

    def append_target(self, layer: int) -> reference.AppendTarget:
        """Where a decode step's q|k|v projection writes the new key and value of `layer`."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        """Store k, v [B, Hkv, T, D] at those positions (None: a decode step's projection stored
        them at append_target) and return attention for q [B, Hq, T, D]."""
        ...


class RMSNorm(nn.Module):
    kernels: ModuleType = reference  # the layer ops (kernels.layer_implementation): set by Transformer.use_kernels

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add_norm_linear(self, x: torch.Tensor, delta: torch.Tensor | None, linear: nn.Module,
                        rope: tuple | None = None,
                        append: reference.AppendTarget | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, linear(norm(x + delta)), rotated if rope is given, its key and value stored at
        append if given). In a decode step the add and the norm run in the projection's prologue,
        RoPE and the KV append in its epilogue: one launch."""
        return self.kernels.norm_linear(x, delta, self.weight, self.eps, linear.weight, getattr(linear, "bias", None),
                                        rope, append)


class LayerNorm(nn.LayerNorm):
    kernels: ModuleType = reference

    def add_norm_linear(self, x: torch.Tensor, delta: torch.Tensor | None, linear: nn.Module,
                        rope: tuple | None = None,
                        append: reference.AppendTarget | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is not None:
            x = x + delta
        y = F.linear(self(x), linear.weight, getattr(linear, "bias", None))
        if rope is not None:
            self.kernels.rope_qkv_(y, *rope)
        if append is not None:
            self.kernels.append_qkv(y, append)
        return x, y


def make_norm(cfg: ModelConfig) -> RMSNorm | LayerNorm:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return LayerNorm(cfg.dim, eps=cfg.norm_eps)


class Attention(nn.Module):
    kernels: ModuleType = reference

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, qkv_out, bias=cfg.qkv_bias)  # fused: one matmul per step
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm | LayerNorm,
                rope: tuple[torch.Tensor, ...] | None, cache: AttentionCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream x + delta, and attention over its norm."""
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if rope is not None:  # (cos table, sin table, positions): q and k rotated as they are projected
            rope = (*rope, self.n_heads + self.n_kv_heads, self.head_dim)
        append = cache.append_target(self.layer) if T == 1 else None  # a decode step: k, v go to the cache at once
        x, qkv = norm.add_norm_linear(x, delta, self.wqkv, rope, append)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if append is None:
            k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        else:
            k = v = None
        out = cache.attend(self.layer, q, k, v)
        return x, self.kernels.linear(out.transpose(1, 2).reshape(B, T, q_size), self.wo.weight, self.wo.bias)


class MLP(nn.Module):
    kernels: ModuleType = reference

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        if cfg.gated_mlp:  # gate and up fused: one matmul per step
            self.gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=cfg.mlp_bias)
        else:
            self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None,
                norm: RMSNorm | LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream x + delta, and the MLP of its norm."""
        act, down = ACTIVATIONS[self.activation], self.down
        if not hasattr(self, "gate_up"):
            x, h = norm.add_norm_linear(x, delta, self.up)
            return x, self.kernels.linear(act(h), down.weight, down.bias)
        x, gate_up = norm.add_norm_linear(x, delta, self.gate_up)
        if self.activation == "silu":
            return x, self.kernels.silu_mul_linear(gate_up, down.weight, down.bias)
        gate, up = gate_up.chunk(2, dim=-1)
        return x, self.kernels.linear(act(gate) * up, down.weight, down.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, rope,
                cache: AttentionCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual stream x and the previous block's not yet added output delta -> the same
        pair after this block (each add happens where the norm that reads its result runs)."""
        x, attn = self.attn(x, delta, self.attn_norm, rope, cache)
        if self.parallel:
            return x + attn + self.mlp(x, None, self.mlp_norm)[1], None
        return self.mlp(x, attn, self.mlp_norm)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.learned_positions else None
        self.rotary = Rotary(cfg) if cfg.uses_rope else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def use_kernels(self, kernels: ModuleType) -> None:
        """Which implementation of the layer ops (norms, projections, RoPE) the layers run (decided once)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, LayerNorm, Attention, MLP)):
                module.kernels = kernels

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(self, tokens: torch.Tensor, cache: AttentionCache, last_only: bool = False) -> torch.Tensor:
        """Logits for tokens [B, T] continuing what `cache` holds; [B, 1, V] if last_only. The
        caller advances the cache (generation.py: prefill and the decode step); positions stay on
        the device, so a one-token call has static shapes."""
        positions = cache.begin(tokens.shape[1])
        x = self.embed(tokens)
        if self.pos_embed is not None:  # positions past the table are refused by the caller, on the host
            x = x + self.pos_embed(positions)
        rope = (*self.rotary.table(positions.device, x.dtype), positions) if self.rotary is not None else None
        delta = None
        for block in self.layers:
            x, delta = block(x, delta, rope, cache)
        if last_only:
            x, delta = x[:, -1:], None if delta is None else delta[:, -1:]
        return self.norm.add_norm_linear(x, delta, self.embed if self.lm_head is None else self.lm_head)[1]
