"""Append a benchmark result (the Markdown table a bench script wrote) to BENCHMARKS.md.

    python bench/record.py RESULT.md --json RESULT.json --command "..." --commit SHA [--note "..."]

The table is copied verbatim from the file the benchmark wrote; numbers are never typed by hand.
The JSON is kept beside it under bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def body(text: str) -> str:
    """Markdown tables go in as they are; any other log text goes in a code block."""
    return text if text.lstrip().startswith(("|", "Device")) else f"```\n{text.rstrip()}\n```\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("table")
    ap.add_argument("--json", required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--title", required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    meta = json.loads(Path(args.json).read_text())["meta"]
    date = datetime.date.today().isoformat()
    kept = ROOT / "bench" / "results" / f"{date}-{args.commit}-{Path(args.json).name}"
    shutil.copyfile(args.json, kept)
    section = (f"\n## {args.title} ({date})\n\n- device: {meta['device']}\n- commit: {args.commit}\n"
               f"- command: `{args.command}`\n- software: torch {meta['torch']}, dtype {meta['dtype']}\n"
               f"- raw results: `{kept.relative_to(ROOT)}`\n" + (f"- note: {args.note}\n" if args.note else "")
               + "\n" + body(Path(args.table).read_text()))
    bench = ROOT / "BENCHMARKS.md"
    if not bench.exists():
        bench.write_text("# Benchmarks\n\nGPU results, appended by `bench/record.py` from the files the benchmark "
                         "scripts wrote. Never edit numbers by hand.\n")
    with bench.open("a") as f:
        f.write(section)


if __name__ == "__main__":
    main()
