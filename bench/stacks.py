"""Summarises a collapsed-stack profile (``frame;frame;... count`` per line).

``python -m bench.stacks FILE [--top N]``: the functions with the most samples on CPU, by self
time (the innermost frame) and by inclusive time (anywhere on the stack), as shares of all
samples; plus shares by top-level area (package or library) of the innermost frame.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")
_AREAS = (
    ("outbox_notifier", "outbox_notifier"),
    ("httpcore", "httpcore"),
    ("httpx_aiohttp", "httpx_aiohttp"),
    ("httpx", "httpx"),
    ("aiohttp", "aiohttp"),
    ("h11", "h11"),
    ("anyio", "anyio"),
    ("psycopg_pool", "psycopg_pool"),
    ("psycopg", "psycopg"),
    ("uvloop", "uvloop"),
    ("asyncpg", "asyncpg"),
    ("pgqueuer", "pgqueuer"),
    ("procrastinate", "procrastinate"),
    ("msgspec", "msgspec"),
    ("asyncio", "asyncio"),
    ("logging", "logging"),
    ("bench", "bench"),
)


def _key(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if not match:
        return frame, ""
    path = match["file"]
    short = "/".join(path.split("/")[-2:])
    return f"{match['func']} ({short})", path


def _area(path: str) -> str:
    for needle, name in _AREAS:
        if f"/{needle}/" in path or path.startswith(f"{needle}/"):
            return name
    return "other" if path else "native/idle"


def summarise(text: str, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_key(f) for f in stack.split(";")]
        leaf, leaf_path = frames[-1]
        own[leaf] += count
        areas[_area(leaf_path)] += count
        for name in {name for name, _ in frames}:
            inclusive[name] += count
    if not total:
        return "no samples"
    out = [f"{total} samples"]
    out.append("\nby area of the innermost frame:")
    out += [f"  {n / total:6.1%}  {name}" for name, n in areas.most_common()]
    out.append(f"\ntop {top} by self time:")
    out += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    out.append(f"\ntop {top} by inclusive time:")
    out += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stacks")
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with open(args.file) as handle:
        print(summarise(handle.read(), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
