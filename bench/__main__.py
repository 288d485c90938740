"""`make bench`: run every benchmark, print each figure and write bench/results.json.

`python -m bench --quick` runs smaller sizes (a smoke run; its figures are not the targets' evidence).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCHMARKS = ("transform", "ingest", "freshness", "gateway", "query", "pruning", "compaction", "forward", "service")
RESULTS = Path(__file__).with_name("results.json")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks one after another (never concurrently: the machine has two cores)."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", default=list(BENCHMARKS), help=f"subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    results: dict[str, Any] = {}
    if RESULTS.exists() and set(args.names) != set(BENCHMARKS):
        results = json.loads(RESULTS.read_text()).get("results", {})
    for name in args.names:
        print(f"== {name} ==", flush=True)
        started = time.perf_counter()
        module = importlib.import_module(f"bench.{name}")
        results[name] = module.run(quick=args.quick)
        print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
    document = {
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": _cpus()},
        "results": results,
    }
    RESULTS.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"wrote {RESULTS}")
    failed = [f"{name}.{key}" for name, figures in results.items() for key, ok in figures.items() if ok is False]
    if failed:
        print("targets missed: " + ", ".join(failed))
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
