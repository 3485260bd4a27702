"""run.py end to end on the real SmolLM2 model, as a user runs it (a subprocess). Bad input, case
by case, is in test_bad_input.py."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minirt import generate

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, input=stdin)


def test_generates_text_from_prompt_file(smollm2, smollm2_llm):
    done = run("--model", str(smollm2), "--prompt", "prompts/story.txt", "--max-new-tokens", "12", "--attention", "full")
    assert done.returncode == 0, done.stderr
    expected = generate(smollm2_llm, (REPO / "prompts/story.txt").read_text(), 12, attention="full")
    assert done.stdout == expected.text + "\n"
    assert f"generated {len(expected.tokens)} ({expected.finish_reason})" in done.stderr and "tok/s" in done.stderr
    assert "\r" not in done.stderr  # no progress bars redrawn into a pipe or a log


def test_stdin_prompt_sparse(smollm2, smollm2_llm):
    done = run("--model", str(smollm2), "--prompt", "-", "--max-new-tokens", "5", "--quiet", stdin="Hello, my name is")
    assert done.returncode == 0, done.stderr
    assert done.stdout == generate(smollm2_llm, "Hello, my name is", 5).text + "\n"
    assert "attention sparse A=4 W=512 k=32 (exact)" in done.stderr
    assert "loaded" not in done.stderr  # --quiet


def test_compare_json(smollm2):
    done = run("--model", str(smollm2), "--prompt", "prompts/story.txt", "--attention", "compare", "--json",
               "--max-new-tokens", "6", "--sparse-window", "8", "--sparse-k", "4")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["steps"] == 6 and 0 <= report["token_match"] <= 1
    assert report["policy"]["window"] == 8 and len(report["dropped_mass_by_layer"]) == 30
    assert report["attended_keys"] < report["context"]  # 4 + 8 + 4 of ~45 positions


def test_compare_plot(smollm2, tmp_path):
    """--plot draws the comparison (a PNG); the JSON carries what it draws: KL per step and each
    layer's dropped mass per decode step."""
    out = tmp_path / "compare.png"
    done = run("--model", str(smollm2), "--prompt", "prompts/story.txt", "--attention", "compare", "--json",
               "--max-new-tokens", "6", "--sparse-window", "8", "--sparse-k", "4", "--plot", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["kl_by_step"]) == 6 and max(report["kl_by_step"]) == pytest.approx(report["kl_max"])
    assert len(report["dropped_mass_by_step"]) == 5 and all(len(row) == 30 for row in report["dropped_mass_by_step"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run("--text", "hi", "--plot", str(tmp_path / "x.png"))  # not a comparison
    assert bad.returncode == 2 and "--plot needs --attention compare" in bad.stderr
    bad = run("--text", "hi", "--attention", "compare", "--plot", str(tmp_path / "x.txt"))
    assert bad.returncode == 2 and ".png, .pdf or .svg" in bad.stderr


def test_compare_table_shows_both_texts(smollm2):
    done = run("--model", str(smollm2), "--prompt", "prompts/story.txt", "--attention", "compare",
               "--max-new-tokens", "4", "--window", "8", "--k", "2")  # the old spellings still work
    assert done.returncode == 0, done.stderr
    for line in ("token match (free-running)", "keys attended per step (mean)", "--- full attention decoded ---",
                 "--- sparse attention decoded ---"):
        assert line in done.stdout


def test_usage_error_is_one_line_and_exit_2():
    done = run("--text", "hi", "--k", "-1")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["run.py: error: --sparse-k must be >= 0 (see run.py --help)"]


def test_help_is_fast_shows_defaults_and_needs_no_torch():
    t0 = time.perf_counter()
    done = run("--help")
    assert done.returncode == 0 and time.perf_counter() - t0 < 3.0
    assert "(default: smollm2-135m)" in done.stdout and "--sparse-k TOP_K, --k TOP_K" in done.stdout
    code = "import sys; from minirt.cli import build_parser; build_parser().parse_args(['--text', 'x']); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("args, code, line", [
    (["--prompt", "{tmp}/bin.txt"], 2, "run.py: error: --prompt {tmp}/bin.txt: not UTF-8 text (byte 0xff at offset 0) (see run.py --help)"),
    (["--prompt", "{tmp}"], 2, "run.py: error: --prompt {tmp}: is a folder, not a file (see run.py --help)"),
    (["--prompt", "{tmp}/empty.txt"], 2, "run.py: error: --prompt {tmp}/empty.txt: the prompt is empty (see run.py --help)"),
    (["--text", "hi", "--device", "gpu"], 2, "run.py: error: argument --device: expected auto, cpu, cuda or cuda:N, got 'gpu' (see run.py --help)"),
    (["--text", "hi", "--model", "./my-ckpt"], 1, "error: ./my-ckpt: no such file or folder"),
])
def test_first_contact_errors_in_a_subprocess(tmp_path, args, code, line):
    """The first-contact findings, as a user meets them: one line, the right exit code, nothing on stdout."""
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "empty.txt").write_text("\n")
    done = run(*(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == code and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == line.format(tmp=tmp_path)
    assert "Traceback" not in done.stderr
