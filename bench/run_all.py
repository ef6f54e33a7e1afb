"""Run every benchmark in bench/ (each `bench_*.py`, by name) one after another with its default args.

Each writes its own results file under bench/results/. Extra arguments filter by name:

    .venv/bin/python bench/run_all.py                 # all of them
    .venv/bin/python bench/run_all.py trainer         # only bench_trainer.py

Exits non-zero if any script crashed (a missed target is reported by the script, not a crash).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent


def scripts(filters: list[str]) -> list[Path]:
    """bench_*.py in bench/, sorted; only those whose name contains one of `filters` when given."""
    found = sorted(BENCH_DIR.glob("bench_*.py"))
    return [p for p in found if not filters or any(f in p.stem for f in filters)]


def main(argv: list[str] | None = None) -> int:
    """Run the scripts from the repository root; print a summary of exit codes and durations."""
    chosen = scripts(list(sys.argv[1:] if argv is None else argv))
    if not chosen:
        print("no bench_*.py matched", file=sys.stderr)
        return 2
    summary: list[tuple[str, int, float]] = []
    for script in chosen:
        print(f"=== {script.relative_to(ROOT)}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(script.relative_to(ROOT))], cwd=ROOT)
        summary.append((script.name, code, time.monotonic() - started))
    print("\n=== summary")
    for name, code, seconds in summary:
        print(f"{name:<36} {'ok' if code == 0 else f'exit {code}':<8} {seconds:7.0f}s")
    return 0 if all(code == 0 for _, code, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
