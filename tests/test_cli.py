"""run.py end to end on the real SmolLM2 checkpoint, and its usage errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, input=stdin)


def test_generates_text_from_prompt_file(smollm2):
    done = run("--model", str(smollm2), "--prompt", "prompts/story.txt", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) > 10
    assert "generated 12 (length)" in done.stderr and "tok/s" in done.stderr


def test_full_attention_and_stdin_prompt(smollm2):
    done = run("--model", str(smollm2), "--prompt", "-", "--attention", "full", "--max-new-tokens", "5", stdin="Hello, my name is")
    assert done.returncode == 0, done.stderr
    assert "attention full" in done.stderr


def test_compare_json(smollm2):
    done = run("--model", str(smollm2), "--prompt", "prompts/story.txt", "--attention", "compare", "--json",
               "--max-new-tokens", "6", "--window", "8", "--k", "4")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["steps"] == 6 and 0 <= report["token_match"] <= 1
    assert report["policy"]["window"] == 8 and len(report["dropped_mass_by_layer"]) == 30


@pytest.mark.parametrize("args, message", [
    (["--text", "hi", "--max-new-tokens", "0"], "must be > 0"),
    (["--text", "hi", "--attention", "bogus"], "invalid choice"),
    (["--text", "hi", "--window", "0"], "window must be >= 1"),
    (["--text", "hi", "--summary-dtype", "fp4"], "invalid choice"),
    (["--text", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--text", "hi", "--dense-layers", "a,b"], "comma-separated layer indices"),
    (["--text", "hi", "--json"], "--json needs --attention compare"),
    (["--prompt", "no/such/file.txt"], "no such file"),
    ([], "one of the arguments --prompt --text is required"),
])
def test_usage_errors_exit_2(args, message):
    done = run(*args)
    assert done.returncode == 2
    assert "usage:" in done.stderr and message in done.stderr


def test_runtime_errors_exit_1_with_one_line(smollm2):
    done = run("--model", str(smollm2), "--text", "hi", "--dense-layers", "99")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "error: dense_layers [99] out of range: the model has 30 layers"
