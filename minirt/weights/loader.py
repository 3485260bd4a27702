"""Read a checkpoint folder (config.json + safetensors, single or sharded) into a Transformer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..model import Transformer
from .names import BASE_PREFIXES, combine, spec_for


class WeightsError(RuntimeError):
    """A checkpoint's files are missing, damaged, or do not match its config."""


class Checkpoint:
    """The safetensors files of one folder, single or sharded, opened lazily."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._handles: dict[Path, object] = {}
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise WeightsError(f"{index}: not a valid shard index ({e})") from None
            self.where = {name: folder / file for name, file in weight_map.items()}
            for file in sorted(set(self.where.values())):
                if not file.exists():
                    raise WeightsError(f"{index}: shard {file.name} is missing from {folder}")
        elif single.exists():
            self.where = {name: single for name in self._open(single).keys()}
        else:
            raise WeightsError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                               "(only safetensors checkpoints are supported)")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{file}: cannot read safetensors file ({e})") from None
        return self._handles[file]

    def read(self, name: str) -> torch.Tensor:
        file = self.where[name]
        try:
            return self._open(file).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{file}: cannot read tensor {name} ({e})") from None


def load_weights(model: Transformer, folder: Path, progress: bool = False) -> None:
    """Fill every parameter of `model` from the checkpoint in `folder`, checking each shape."""
    cfg = model.cfg
    ckpt = Checkpoint(folder)
    prefix = BASE_PREFIXES[cfg.family]
    params = dict(model.named_parameters())
    for n, (param_name, param) in enumerate(params.items()):
        spec = spec_for(cfg.family, param_name)
        if spec is None:
            raise WeightsError(f"no {cfg.family} weight mapping for minirt parameter {param_name}")
        op, sources = spec
        tensors = []
        for src in sources:
            name = src if src in ckpt.where or not src.startswith(prefix) else src[len(prefix):]
            if name not in ckpt.where:
                raise WeightsError(f"{folder}: tensor {src} not found in any safetensors file")
            tensors.append(ckpt.read(name))
        try:
            value = combine(op, tensors, cfg.n_heads)
        except RuntimeError as e:
            raise WeightsError(f"{ckpt.where[name]}: tensors {' + '.join(sources)} do not fit {param_name} ({e})") from None
        if value.shape != param.shape:
            raise WeightsError(
                f"{ckpt.where[name]}: tensor {' + '.join(sources)} has shape {tuple(value.shape)}, "
                f"expected {tuple(param.shape)} for {param_name} from config.json"
            )
        with torch.no_grad():
            param.copy_(value)
        if progress and (n + 1) % 50 == 0:
            print(f"\rloading weights {n + 1}/{len(params)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(f"\rloaded {len(params)} tensors from {folder}", file=sys.stderr)


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = False) -> Transformer:
    """Build a Transformer from config.json and load its safetensors weights."""
    folder = Path(folder)
    cfg = ModelConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    load_weights(model, folder, progress)
    return model.eval()
