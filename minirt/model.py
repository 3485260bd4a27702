"""minirt's layer graph: one Transformer class for every family, configured by ModelConfig.

Attention does not own its KV storage or its attention algorithm: it hands rotated q/k/v to the
cache (cache.py), which appends them and attends with whatever policy it implements (dense,
condensate sparse) through the kernels in minirt.kernels. The model code never changes for that.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import Rotary

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class AttentionCache(Protocol):
    """What a layer needs from a KV cache (DenseCache and CondensateCache implement it)."""

    seq_len: int

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v [B, Hkv, T, D] at positions seq_len.. and return attention for q [B, Hq, T, D]."""
        ...

    def advance(self, n: int) -> None:
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the reference implementation does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, qkv_out, bias=cfg.qkv_bias)  # fused: one matmul per step
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: AttentionCache) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = Rotary.apply(q, *rope), Rotary.apply(k, *rope)
        out = cache.attend(self.layer, q, k, v)
        return self.wo(out.transpose(1, 2).reshape(B, T, q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.gated = cfg.gated_mlp
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias) if cfg.gated_mlp else None
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope, cache: AttentionCache) -> torch.Tensor:
        attn = self.attn(self.attn_norm(x), rope, cache)
        if self.parallel:
            return x + attn + self.mlp(self.mlp_norm(x))
        x = x + attn
        return x + self.mlp(self.mlp_norm(x))


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

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(self, tokens: torch.Tensor, cache: AttentionCache, last_only: bool = False) -> torch.Tensor:
        """Logits for tokens [B, T] continuing what `cache` holds; [B, 1, V] if last_only."""
        T = tokens.shape[1]
        positions = torch.arange(cache.seq_len, cache.seq_len + T, device=tokens.device)
        x = self.embed(tokens)
        if self.pos_embed is not None:
            if positions[-1] >= self.cfg.max_seq_len:
                raise ValueError(f"position {int(positions[-1])} is past the model's {self.cfg.max_seq_len} learned positions")
            x = x + self.pos_embed(positions)
        rope = self.rotary.cos_sin(positions, x.dtype) if self.rotary is not None else None
        for block in self.layers:
            x = block(x, rope, cache)
        cache.advance(T)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head)
