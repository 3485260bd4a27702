"""Hugging Face tensor names -> minirt parameter names, one table per family.

Each entry maps a minirt parameter (with `{i}` for the layer) to the HF tensors it is built from
and how they combine:
  copy      one tensor as is
  cat       projections stacked along the output dim: q|k|v into the fused wqkv, gate|up into gate_up
  conv1d    GPT-2's Conv1D stores [in, out]; transpose to nn.Linear's [out, in]
  neox_qkv  GPT-NeoX's fused QKV is interleaved per head ([heads, 3, head_dim]); regroup to q|k|v
  llama_qkv like cat, after undoing the q/k row permutation llama.cpp writes into Llama GGUF files

GGUF files (llama.cpp's tensor names) have tables of their own, GGUF_NAME_MAPS.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import ModelConfig

Spec = tuple[str, tuple[str, ...]]

_LLAMA: dict[str, Spec] = {
    "embed.weight": ("copy", ("model.embed_tokens.weight",)),
    "norm.weight": ("copy", ("model.norm.weight",)),
    "lm_head.weight": ("copy", ("lm_head.weight",)),
    "layers.{i}.attn_norm.weight": ("copy", ("model.layers.{i}.input_layernorm.weight",)),
    "layers.{i}.mlp_norm.weight": ("copy", ("model.layers.{i}.post_attention_layernorm.weight",)),
    **{
        f"layers.{{i}}.attn.wqkv.{p}": ("cat", tuple(f"model.layers.{{i}}.self_attn.{x}_proj.{p}" for x in "qkv"))
        for p in ("weight", "bias")
    },
    "layers.{i}.attn.wo.weight": ("copy", ("model.layers.{i}.self_attn.o_proj.weight",)),
    "layers.{i}.attn.wo.bias": ("copy", ("model.layers.{i}.self_attn.o_proj.bias",)),
    **{
        f"layers.{{i}}.mlp.gate_up.{p}": ("cat", tuple(f"model.layers.{{i}}.mlp.{x}_proj.{p}" for x in ("gate", "up")))
        for p in ("weight", "bias")
    },
    **{f"layers.{{i}}.mlp.down.{p}": ("copy", (f"model.layers.{{i}}.mlp.down_proj.{p}",)) for p in ("weight", "bias")},
}

_GPT2: dict[str, Spec] = {
    "embed.weight": ("copy", ("transformer.wte.weight",)),
    "pos_embed.weight": ("copy", ("transformer.wpe.weight",)),
    "norm.weight": ("copy", ("transformer.ln_f.weight",)),
    "norm.bias": ("copy", ("transformer.ln_f.bias",)),
    **{
        f"layers.{{i}}.{ours}.{p}": ("copy", (f"transformer.h.{{i}}.{theirs}.{p}",))
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2"))
        for p in ("weight", "bias")
    },
    **{
        f"layers.{{i}}.{ours}.weight": ("conv1d", (f"transformer.h.{{i}}.{theirs}.weight",))
        for ours, theirs in (("attn.wqkv", "attn.c_attn"), ("attn.wo", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj"))
    },
    **{
        f"layers.{{i}}.{ours}.bias": ("copy", (f"transformer.h.{{i}}.{theirs}.bias",))
        for ours, theirs in (("attn.wqkv", "attn.c_attn"), ("attn.wo", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj"))
    },
}

_NEOX: dict[str, Spec] = {
    "embed.weight": ("copy", ("gpt_neox.embed_in.weight",)),
    "norm.weight": ("copy", ("gpt_neox.final_layer_norm.weight",)),
    "norm.bias": ("copy", ("gpt_neox.final_layer_norm.bias",)),
    "lm_head.weight": ("copy", ("embed_out.weight",)),
    **{
        f"layers.{{i}}.{ours}.{p}": ("copy", (f"gpt_neox.layers.{{i}}.{theirs}.{p}",))
        for ours, theirs in (
            ("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
            ("attn.wo", "attention.dense"), ("mlp.up", "mlp.dense_h_to_4h"), ("mlp.down", "mlp.dense_4h_to_h"),
        )
        for p in ("weight", "bias")
    },
    **{
        f"layers.{{i}}.attn.wqkv.{p}": ("neox_qkv", (f"gpt_neox.layers.{{i}}.attention.query_key_value.{p}",))
        for p in ("weight", "bias")
    },
}

def _gguf_map(qkv: str) -> dict[str, Spec]:
    """llama.cpp's names; the families differ in how separate q/k/v or one fused qkv are stored."""
    blk = "blk.{i}."
    table: dict[str, Spec] = {
        "embed.weight": ("copy", ("token_embd.weight",)),
        "pos_embed.weight": ("copy", ("position_embd.weight",)),
        "lm_head.weight": ("copy", ("output.weight",)),
    }
    for p in ("weight", "bias"):
        table |= {
            f"norm.{p}": ("copy", (f"output_norm.{p}",)),
            f"layers.{{i}}.attn_norm.{p}": ("copy", (f"{blk}attn_norm.{p}",)),
            f"layers.{{i}}.mlp_norm.{p}": ("copy", (f"{blk}ffn_norm.{p}",)),
            f"layers.{{i}}.attn.wo.{p}": ("copy", (f"{blk}attn_output.{p}",)),
            **{f"layers.{{i}}.mlp.{x}.{p}": ("copy", (f"{blk}ffn_{x}.{p}",)) for x in ("up", "down")},
            f"layers.{{i}}.mlp.gate_up.{p}": ("cat", (f"{blk}ffn_gate.{p}", f"{blk}ffn_up.{p}")),
            f"layers.{{i}}.attn.wqkv.{p}": (
                ("copy", (f"{blk}attn_qkv.{p}",)) if qkv == "fused" else (qkv, tuple(f"{blk}attn_{x}.{p}" for x in "qkv"))),
        }
    return table


# GGUF stores GPT-2's projections as [out, in] and GPT-NeoX's fused qkv already as q|k|v.
GGUF_NAME_MAPS: dict[str, dict[str, Spec]] = {
    "llama": _gguf_map("llama_qkv"), "mistral": _gguf_map("llama_qkv"), "qwen2": _gguf_map("cat"),
    "gpt2": _gguf_map("fused"), "gpt_neox": _gguf_map("fused"),
}

NAME_MAPS: dict[str, dict[str, Spec]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2, "gpt_neox": _NEOX,
}

# Older checkpoints (the original gpt2 upload, some Pythia exports) store names without this prefix.
BASE_PREFIXES = {"gpt2": "transformer.", "gpt_neox": "gpt_neox.", "llama": "model.", "mistral": "model.", "qwen2": "model."}


def _neox_qkv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    rest = t.shape[1:]  # (dim,) for the weight, () for the bias
    head_dim = t.shape[0] // (3 * n_heads)
    return t.view(n_heads, 3, head_dim, *rest).transpose(0, 1).reshape(t.shape)


def _llama_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    from .gguf import unpermute_llama

    return torch.cat((unpermute_llama(q, cfg.n_heads), unpermute_llama(k, cfg.n_kv_heads), v), dim=0)


def combine(op: str, tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    ops: dict[str, Callable[[], torch.Tensor]] = {
        "copy": lambda: tensors[0],
        "cat": lambda: torch.cat(tensors, dim=0),
        "conv1d": lambda: tensors[0].t(),
        "neox_qkv": lambda: _neox_qkv(tensors[0], cfg.n_heads),
        "llama_qkv": lambda: _llama_qkv(*tensors, cfg),
    }
    return ops[op]()


def spec_for(family: str, param: str, maps: dict[str, dict[str, Spec]] = NAME_MAPS) -> tuple[str, list[str]] | None:
    """The (op, source names) a minirt parameter is built from, or None if the family has no entry."""
    parts = param.split(".")
    layer = None
    if parts[0] == "layers":
        layer, parts[1] = parts[1], "{i}"
    entry = maps[family].get(".".join(parts))
    if entry is None:
        return None
    op, sources = entry
    return op, [s.replace("{i}", layer) if layer is not None else s for s in sources]
