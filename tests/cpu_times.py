"""Sums the per-test CPU seconds a ``pytest --cpu-times PATH`` run wrote (not a test itself).

    python -m pytest -n 3 --dist worksteal --cpu-times /tmp/cpu.jsonl
    python tests/cpu_times.py /tmp/cpu.jsonl [--top 30]

Prints the total (the tests' own processes and their children), the split between tests
marked slow (what `make test-all` adds to `make test`) and the rest, the CPU seconds of each
test file, and the tests that took the most.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path


def load(path: Path) -> list[dict]:
    """The records, each with ``total``: its CPU seconds and its children's."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in records:
        r["total"] = r["cpu"] + r["children_cpu"]
    return records


def summary(records: list[dict], top: int = 30) -> str:
    total = sum(r["total"] for r in records)
    slow = sum(r["total"] for r in records if r["slow"])
    children = sum(r["children_cpu"] for r in records)
    lines = [
        f"{len(records)} tests, {total:,.0f} CPU-s: marked slow {slow:,.0f}, the rest "
        f"{total - slow:,.0f}; in child processes {children:,.0f}",
        "",
        "CPU-s by file:",
    ]
    by_file: collections.Counter = collections.Counter()
    for r in records:
        by_file[r["test"].split("::")[0]] += r["total"]
    lines += [f"{seconds:8,.1f}  {name}" for name, seconds in by_file.most_common()]
    lines += ["", f"the {top} tests with the most CPU-s (CPU-s, of it in children, wall s):"]
    for r in sorted(records, key=lambda r: -r["total"])[:top]:
        mark = " [slow]" if r["slow"] else ""
        lines.append(
            f"{r['total']:8,.1f} {r['children_cpu']:8,.1f} {r['wall']:8,.1f}  {r['test']}{mark}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    if not args.path.exists():
        sys.exit(f"error: {args.path} does not exist; write it with "
                 f"`python -m pytest --cpu-times {args.path}`")
    print(summary(load(args.path), args.top))


if __name__ == "__main__":
    main()
