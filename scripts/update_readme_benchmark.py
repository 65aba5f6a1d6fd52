#!/usr/bin/env python
"""Copy a finished ``slice2vol benchmark`` folder's table and plots into README.md.

    python scripts/update_readme_benchmark.py bench_out/grid [--readme README.md] [--report-picture demo_out/report/views.png]

Same as ``slice2vol benchmark ... --update-readme README.md`` without re-running the benchmark
command: the table (``DIR/results.md``) goes between ``<!-- benchmark:start -->`` and
``<!-- benchmark:end -->``, the plots and ``results.csv`` are copied to ``benchmarks/results/``
beside the README, and the optional report picture goes between ``<!-- report-picture:start -->``
and ``<!-- report-picture:end -->``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slice2vol.errors import Slice2VolError
from slice2vol.evaluation.benchmark import update_readme


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, metavar="DIR", help="output folder of slice2vol benchmark")
    ap.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md",
                    help="README to update (default: the repository's)")
    ap.add_argument("--report-picture", type=Path, metavar="PNG", help="report picture, e.g. REPORT_DIR/views.png")
    args = ap.parse_args(argv)
    try:
        if args.report_picture is not None and not args.report_picture.is_file():
            raise Slice2VolError(f"--report-picture {args.report_picture}: file not found")
        for p in update_readme(args.readme, args.results, args.report_picture):
            print(f"wrote {p}")
    except Slice2VolError as exc:
        print(f"update_readme_benchmark: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
