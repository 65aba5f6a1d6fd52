#!/usr/bin/env python
"""Copy the benchmark scripts' saved outputs into README.md, so no figure there is typed by hand.

    python scripts/update_readme_results.py            # rewrite every block
    python scripts/update_readme_results.py --check    # exit 1 if a block differs from its file

A block is

    <!-- results: benchmarks/results/FILE.txt | COMMAND THAT WROTE IT -->
    ...generated...
    <!-- results: end -->

and its contents become ``$ COMMAND`` followed by FILE verbatim, in a code fence.  FILE is what
the command printed (saved with ``| tee``); the command is what a reader runs to measure it again.
The ``benchmark`` table has its own generator (``slice2vol benchmark --update-readme``).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results: (?P<file>[^|>]+?) \| (?P<cmd>[^>]+?) -->\n)(?P<body>.*?)(<!-- results: end -->)",
                   re.S)


def render(file: str, cmd: str, root: Path = ROOT) -> str:
    path = root / file
    if not path.is_file():
        raise FileNotFoundError(f"{file}: results file not found")
    text = path.read_text(encoding="utf-8").rstrip("\n")
    return f"```\n$ {cmd}\n{text}\n```\n"


def update(readme: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """``(new README text, files of the blocks that changed)``."""
    changed = []

    def sub(m):
        body = render(m["file"].strip(), m["cmd"].strip(), root)
        if body != m["body"]:
            changed.append(m["file"].strip())
        return m.group(1) + body + m.group(5)

    return BLOCK.sub(sub, readme), changed


def blocks(readme: str) -> list[tuple[int, int]]:
    """Character spans of the generated blocks (markers included)."""
    return [m.span() for m in BLOCK.finditer(readme)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--check", action="store_true", help="only report blocks that differ from their files")
    args = ap.parse_args(argv)
    old = args.readme.read_text(encoding="utf-8")
    try:
        new, changed = update(old, args.readme.parent)
    except FileNotFoundError as exc:
        print(f"update_readme_results: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for f in changed:
            print(f"out of date: {f}")
        return 1 if changed else 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{len(blocks(new))} block(s), {len(changed)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
