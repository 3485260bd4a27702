"""Add a benchmark result (the Markdown table a bench script wrote) to BENCHMARKS.md, newest first:
the file opens with the current numbers and superseded runs follow below.

    python bench/record.py RESULT.md --json RESULT.json --command "..." --commit SHA --title "..." [--note "..."]
    python bench/record.py LOG.txt --device "..." --command "..." --commit SHA --title "..."   (a plain log)

The table or log is copied verbatim from the file the benchmark wrote; numbers are never typed by
hand. A JSON result is kept beside it under bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("# Benchmarks\n\nGPU results, added by `bench/record.py` from the files the benchmark scripts wrote, newest "
          "first. Never edit numbers by hand.\n")


def body(text: str) -> str:
    """Markdown tables go in as they are; any other log text goes in a code block."""
    return text if text.lstrip().startswith(("|", "Device")) else f"```\n{text.rstrip()}\n```\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("table")
    ap.add_argument("--json", help="machine-readable result (its meta names device and software)")
    ap.add_argument("--device", help="for a plain log without JSON")
    ap.add_argument("--command", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--title", required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if (args.json is None) == (args.device is None):
        ap.error("give exactly one of --json and --device")
    date = datetime.date.today().isoformat()
    lines = [f"\n## {args.title} ({date})\n"]
    if args.json:
        meta = json.loads(Path(args.json).read_text())["meta"]
        kept = ROOT / "bench" / "results" / f"{date}-{args.commit}-{Path(args.json).name}"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.json, kept)
        software = ", ".join(f"{key} {meta[key]}" for key in ("torch", "triton", "transformers", "dtype") if key in meta)
        lines += [f"- device: {meta['device']}", f"- software: {software}", f"- raw results: `{kept.relative_to(ROOT)}`"]
    else:
        lines.append(f"- device: {args.device}")
    lines += [f"- commit: {args.commit}", f"- command: `{args.command}`"] + ([f"- note: {args.note}"] if args.note else [])
    section = "\n".join(lines) + "\n\n" + body(Path(args.table).read_text())
    bench = ROOT / "BENCHMARKS.md"
    text = bench.read_text() if bench.exists() else HEADER
    start = text.find("\n## ")  # the newest section goes first, under the header
    start = len(text) if start < 0 else start
    bench.write_text(text[:start].rstrip("\n") + "\n" + section + text[start:])


if __name__ == "__main__":
    main()
