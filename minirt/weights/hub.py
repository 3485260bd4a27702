"""Resolve --model (local folder, alias, or HF repo id) to a local checkpoint folder."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..config import MODEL_ALIASES

# What minirt reads; nothing else is downloaded (no .bin, .gguf, onnx, ...).
HUB_FILES = [
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "chat_template.jinja",
]

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def models_dir() -> Path:
    """Where locally built checkpoints live (MINIRT_MODELS), checked before the hub."""
    return Path(os.environ.get("MINIRT_MODELS", Path.home() / ".cache" / "minirt-models"))


class ModelNotFoundError(RuntimeError):
    """--model named nothing minirt could find or download."""


def resolve_model(name: str) -> Path:
    """A local folder holding config.json for `name`, downloading from the HF hub if needed."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelNotFoundError(f"{local}: folder has no config.json")
        return local
    repo_id = MODEL_ALIASES.get(name.lower(), name)
    if not _REPO_ID.match(repo_id):
        aliases = ", ".join(sorted(MODEL_ALIASES))
        raise ModelNotFoundError(f"{name!r} is not a local folder, a known alias ({aliases}), or an HF repo id (owner/name)")
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
