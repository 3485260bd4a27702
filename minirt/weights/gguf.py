"""GGUF files (llama.cpp's format) through the `gguf` library: config, weights and tokenizer metadata.

The metadata is the config: each supported architecture maps its llama.cpp keys onto the Hugging
Face config fields that ModelConfig.from_hf already reads, so both formats share one validation.
Tensors are dequantised by `gguf.quants.dequantize` (F32/F16/BF16, Q4_0..Q8_0, the K-quants, IQ*).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, ModelConfig


class GGUFError(RuntimeError):
    """A GGUF file is damaged, or uses an architecture or quantisation minirt does not run."""


# llama.cpp key (after "<arch>.") -> Hugging Face config field, per GGUF architecture.
_LLAMA_KEYS = {
    "block_count": "num_hidden_layers", "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
ARCHITECTURES: dict[str, tuple[str, dict[str, str]]] = {  # GGUF architecture -> (model_type, keys)
    "llama": ("llama", _LLAMA_KEYS),
    "qwen2": ("qwen2", _LLAMA_KEYS),
    "gpt2": ("gpt2", {
        "block_count": "n_layer", "context_length": "n_positions", "embedding_length": "n_embd",
        "feed_forward_length": "n_inner", "attention.head_count": "n_head",
        "attention.layer_norm_epsilon": "layer_norm_epsilon",
    }),
    "gptneox": ("gpt_neox", {
        "block_count": "num_hidden_layers", "context_length": "max_position_embeddings",
        "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
        "attention.head_count": "num_attention_heads", "attention.layer_norm_epsilon": "layer_norm_eps",
        "use_parallel_residual": "use_parallel_residual", "rope.freq_base": "rope_theta",
    }),
}


class GGUFFile:
    """One GGUF file, memory-mapped: metadata fields and tensors by name."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except FileNotFoundError:
            raise GGUFError(f"{self.path}: file not found") from None
        except Exception as e:  # the reader raises ValueError, IndexError, ... on damaged files
            raise GGUFError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.get("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise GGUFError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported "
                            f"(minirt runs {', '.join(ARCHITECTURES)})")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value.tolist() if isinstance(value, np.ndarray) else value

    def hf_config(self) -> dict[str, Any]:
        """The file's metadata as a Hugging Face config dict."""
        model_type, keys = ARCHITECTURES[self.architecture]
        arch = self.architecture
        hf: dict[str, Any] = {"model_type": model_type}
        for key, field in keys.items():
            value = self.get(f"{arch}.{key}")
            if value is not None:
                hf[field] = value
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise GGUFError(f"{self.path}: no token_embd.weight tensor")
        hf["vocab_size"] = int(embed.shape[1])  # GGUF shapes are innermost-first
        hf["tie_word_embeddings"] = "output.weight" not in self.tensors
        heads = hf.get("num_attention_heads", hf.get("n_head"))
        head_dim = hf.get("head_dim") or (hf.get("hidden_size", hf.get("n_embd", 0)) // heads if heads else 0)
        rotary = self.get(f"{arch}.rope.dimension_count")
        if rotary is not None and head_dim:
            hf["partial_rotary_factor"] = rotary / head_dim
        scaling = self.get(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            hf["rope_scaling"] = {"rope_type": scaling, "factor": self.get(f"{arch}.rope.scaling.factor", 1.0)}
        if "rope_freqs.weight" in self.tensors:
            raise GGUFError(f"{self.path}: per-frequency RoPE factors (rope_freqs.weight, llama3 scaling) are not supported")
        for token in ("bos", "eos"):
            value = self.get(f"tokenizer.ggml.{token}_token_id")
            if value is not None:
                hf[f"{token}_token_id"] = value
        return hf

    def config(self) -> ModelConfig:
        try:
            return ModelConfig.from_hf(self.hf_config(), str(self.path))
        except ConfigError as e:
            raise GGUFError(str(e)) from None

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` dequantised to fp32, in PyTorch's [out, in] layout."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {name} is stored as {t.tensor_type.name}, "
                            "a type minirt cannot dequantise") from None
        values = np.ascontiguousarray(values, dtype=np.float32)
        return torch.from_numpy(values if values.flags.writeable else values.copy())  # F32: a view of the map


def unpermute_llama(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row order llama.cpp's converter gives Llama q/k projections (its RoPE rotates
    adjacent pairs; minirt's, like transformers', rotates halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
