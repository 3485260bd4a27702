"""Model resolution: local folders, aliases, the local model cache and the HF hub client."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from minirt.weights.hub import ModelNotFoundError, resolve_model


def resolve_in_subprocess(name: str, env: dict) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE when imported, hence a fresh process.
    code = f"from minirt.weights.hub import resolve_model; print(resolve_model({name!r}))"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


def test_local_folder(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    assert resolve_model(str(folder)) == folder


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_bad_name_lists_aliases():
    with pytest.raises(ModelNotFoundError, match="known model .*qwen2.5-coder-0.5b.*smollm2-135m.*tinyllama"):
        resolve_model("not a model!")


def test_alias_uses_locally_built_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    folder = tiny_checkpoint("llama")
    built = tmp_path / "models" / "TinyLlama-1.1B-Chat-v1.0"
    folder.rename(built.parent.mkdir() or built)
    monkeypatch.setenv("MINIRT_MODELS", str(tmp_path / "models"))
    assert resolve_model("TinyLlama") == built


def test_pypi_model_installed_is_used_without_pip(tmp_path, monkeypatch):
    """A PyPI model already in MINIRT_MODELS resolves to its GGUF file (any spelling of its name)."""
    gguf = tmp_path / "smollm2-135m" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"")
    monkeypatch.setenv("MINIRT_MODELS", str(tmp_path))
    monkeypatch.setattr("minirt.weights.pypi._download", lambda *a: pytest.fail("pip was called"))
    assert resolve_model("smollm2-135m") == resolve_model("SmolLM-135M") == gguf


def test_repo_id_through_snapshot_download_cache(tmp_path, tiny_checkpoint):
    """A repo id goes through huggingface_hub.snapshot_download; offline it serves the HF cache."""
    folder = tiny_checkpoint("qwen2")
    repo = tmp_path / "hub" / "models--someone--tiny-qwen"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "MINIRT_MODELS": str(tmp_path / "none")}
    done = resolve_in_subprocess("someone/tiny-qwen", env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(snapshot)
    missing = resolve_in_subprocess("someone/absent", env)
    assert missing.returncode != 0
    assert "tried local folder 'someone/absent' (not found)" in missing.stderr
    assert "HF hub repo 'someone/absent': the hub cannot be reached (offline?)" in missing.stderr


def test_cli_reports_offline_hub_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "MINIRT_MODELS": str(tmp_path)}
    done = subprocess.run([sys.executable, "run.py", "--model", "TinyLlama", "--text", "hi"], env=env,
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: tried local folder 'TinyLlama' (not found), {tmp_path / 'TinyLlama-1.1B-Chat-v1.0'} (not found), "
        "HF hub repo 'TinyLlama/TinyLlama-1.1B-Chat-v1.0': the hub cannot be reached (offline?) and the model is "
        "not in the local HF cache"]


def test_transformers_still_imports_beside_minirt():
    """minirt nests kernels/weights/tokenizer, so PyPI names such as `kernels` stay free."""
    import minirt  # noqa: F401

    for name in ("kernels", "weights", "tokenizer"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "minirt" not in str(spec.origin)
    code = "import minirt, transformers; from transformers import AutoModelForCausalLM; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
