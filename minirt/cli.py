"""`python run.py`: generate with sparse (default) or full attention, or compare the two."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cache import CondensateConfig
from .generate import Sampling, check_length, encode_prompt, generate

DEFAULT_MODEL = "smollm2-135m"


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL, help="local folder, alias (e.g. TinyLlama, gpt2, smollm-135m) or HF repo id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", type=Path, help="file holding the prompt ('-' for stdin)")
    src.add_argument("--text", help="the prompt itself")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=_positive(int), default=128)
    p.add_argument("--attention", choices=["sparse", "full", "compare"], default="sparse")
    p.add_argument("--json", action="store_true", help="with --attention compare: print the report as JSON")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=_positive(int))
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s = p.add_argument_group("condensate sparse attention")
    d = CondensateConfig()
    s.add_argument("--anchor", type=int, default=d.anchor, help="first positions always attended")
    s.add_argument("--window", type=int, default=d.window, help="recent positions always attended")
    s.add_argument("--k", dest="sparse_k", type=int, default=d.top_k, help="distant positions chosen by Q·K")
    s.add_argument("--budget-alpha", type=float, default=d.budget_alpha, help="grow k as alpha * n^C")
    s.add_argument("--budget-exponent", type=float, default=d.budget_exponent, help="C in alpha * n^C")
    s.add_argument("--dense-layers", type=_layers, default=d.dense_layers, help="e.g. 0,1")
    s.add_argument("--scope", choices=["group", "head"], default=d.scope)
    s.add_argument("--selection", choices=["exact", "pages"], default=d.selection)
    s.add_argument("--page-size", type=int, default=d.page_size)
    s.add_argument("--summary-dtype", choices=["cache", "fp8"], default=d.summary_dtype,
                   help="page min/max summaries: fp8 rounded outward (half the bytes), or the cache dtype")
    s.add_argument("--max-dropped-mass", type=float, help="certificate bound: fall back to full attention above it")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto")
    r.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    r.add_argument("--allow-long-context", action="store_true", help="let RoPE models run past max_position_embeddings")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        policy = CondensateConfig(
            anchor=args.anchor, window=args.window, top_k=args.sparse_k, budget_alpha=args.budget_alpha,
            budget_exponent=args.budget_exponent, dense_layers=args.dense_layers, scope=args.scope,
            selection=args.selection, page_size=args.page_size, summary_dtype=args.summary_dtype,
            max_dropped_mass=args.max_dropped_mass)
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        parser.error(str(e))
    if args.json and args.attention != "compare":
        parser.error("--json needs --attention compare")
    if args.prompt is not None:
        if str(args.prompt) == "-":
            text = sys.stdin.read()
        elif not args.prompt.is_file():
            parser.error(f"--prompt {args.prompt}: no such file")
        else:
            text = args.prompt.read_text()
    else:
        text = args.text
    try:
        return _run(args, text, policy, sampling)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args, text: str, policy: CondensateConfig, sampling: Sampling) -> int:
    from .equivalence import compare
    from .llm import LLM

    t0 = time.perf_counter()
    llm = LLM.load(args.model, args.device, args.dtype, progress=True)
    print(f"loaded {llm.path} ({llm.cfg.family}, {llm.cfg.n_layers} layers) on {llm.model.device} "
          f"{str(llm.model.dtype).removeprefix('torch.')} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.attention == "compare":
        ids = encode_prompt(llm, text, args.chat)
        check_length(llm, len(ids), args.max_new_tokens, args.allow_long_context)
        report = compare(llm, ids, args.max_new_tokens, policy)
        print(report.to_json() if args.json else report.table())
        return 0
    result = generate(llm, text, args.max_new_tokens, sampling=sampling, stop=args.stop, attention=args.attention,
                      policy=policy, chat=args.chat, allow_long_context=args.allow_long_context,
                      on_text=lambda piece: print(piece, end="", flush=True))
    print()
    how = "full" if args.attention == "full" else (
        f"sparse A={policy.anchor} W={policy.window} k={policy.top_k} ({policy.selection})")
    print(f"prompt {result.prompt_tokens} tokens, generated {len(result.tokens)} ({result.finish_reason}), "
          f"prefill {result.prefill_s:.2f}s, decode {result.tokens_per_s:.1f} tok/s, attention {how}"
          + (f", fallbacks {result.fallbacks}" if policy.max_dropped_mass is not None else ""), file=sys.stderr)
    return 0
