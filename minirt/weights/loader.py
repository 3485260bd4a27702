"""Read a checkpoint into a Transformer: a folder (config.json + safetensors, single or sharded)
or a GGUF file (config and quantised tensors in one file, dequantised on load)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..model import Transformer
from .gguf import GGUFFile
from .names import BASE_PREFIXES, GGUF_NAME_MAPS, NAME_MAPS, combine, spec_for


class WeightsError(RuntimeError):
    """A checkpoint's files are missing, damaged, or do not match its config."""


class Checkpoint:
    """The safetensors files of one folder, single or sharded, opened lazily."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.source = str(folder)
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


class GGUFCheckpoint:
    """The tensors of one GGUF file, with the Checkpoint interface."""

    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf
        self.source = str(gguf.path)
        self.where = {name: gguf.path for name in gguf.tensors}

    def read(self, name: str) -> torch.Tensor:
        return self.gguf.read(name)


def load_weights(model: Transformer, ckpt: Checkpoint | GGUFCheckpoint, maps: dict, config_source: str,
                 progress: bool = False) -> None:
    """Fill every parameter of `model` from `ckpt` (names mapped by `maps`), checking each shape."""
    from tqdm import tqdm

    cfg = model.cfg
    prefix = BASE_PREFIXES[cfg.family] if maps is NAME_MAPS else ""
    params = dict(model.named_parameters())
    for param_name, param in tqdm(params.items(), desc="loading weights", unit="tensor", disable=None if progress else True,
                                  file=sys.stderr, leave=False):
        spec = spec_for(cfg.family, param_name, maps)
        if spec is None:
            raise WeightsError(f"no {cfg.family} weight mapping for minirt parameter {param_name}")
        op, sources = spec
        tensors = []
        for src in sources:
            name = src if src in ckpt.where or not src.startswith(prefix) else src[len(prefix):]
            if name not in ckpt.where:
                raise WeightsError(f"{ckpt.source}: tensor {src} not found")
            tensors.append(ckpt.read(name))
        try:
            value = combine(op, tensors, cfg)
        except RuntimeError as e:
            raise WeightsError(f"{ckpt.where[name]}: tensors {' + '.join(sources)} do not fit {param_name} ({e})") from None
        if value.shape != param.shape:
            raise WeightsError(
                f"{ckpt.where[name]}: tensor {' + '.join(sources)} has shape {tuple(value.shape)}, "
                f"expected {tuple(param.shape)} for {param_name} from {config_source}"
            )
        with torch.no_grad():
            param.copy_(value)


def load_model(path: str | Path | GGUFFile, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = False) -> Transformer:
    """Build a Transformer from a checkpoint folder (config.json + safetensors) or a GGUF file."""
    if isinstance(path, GGUFFile) or Path(path).suffix == ".gguf":
        gguf = path if isinstance(path, GGUFFile) else GGUFFile(path)
        cfg, ckpt, maps, source = gguf.config(), GGUFCheckpoint(gguf), GGUF_NAME_MAPS, "its metadata"
    else:
        path = Path(path)
        cfg = ModelConfig.from_file(path / "config.json")
        ckpt, maps, source = Checkpoint(path), NAME_MAPS, "config.json"
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    load_weights(model, ckpt, maps, source, progress)
    return model.eval()
