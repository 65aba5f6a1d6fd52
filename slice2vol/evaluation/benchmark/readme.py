"""Copying a finished benchmark's table and figures into a README between marker comments."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from slice2vol.errors import Slice2VolError
from slice2vol.evaluation.benchmark.settings import PLOT_QUALITY, PLOT_TIME, RESULTS_CSV, RESULTS_MD

log = logging.getLogger("slice2vol")


# ------------------------------------------------------------------------------------ README


def replace_between_markers(text: str, name: str, content: str) -> str:
    """Replace what lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` by ``content``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1:
        raise Slice2VolError(f"the README needs exactly one {start} ... {end} pair")
    return pattern.sub(lambda _: f"{start}\n{content.strip()}\n{end}", text)


def update_readme(readme: Path, results_dir: Path, report_picture: Path | None = None,
                  assets: str = "benchmarks/results") -> list[Path]:
    """Copy ``results_dir``'s table and plots into ``readme`` (between ``benchmark`` markers) and
    optionally one report picture (between ``report-picture`` markers).

    Pictures are copied to ``ASSETS/`` beside the README (so the README never links into a
    scratch folder) as ``benchmark_*.png`` and ``report_picture.png``; the CSV as
    ``benchmark_results.csv``.  Returns the files written.
    """
    from slice2vol import io

    readme = Path(readme)
    results_dir = Path(results_dir)
    md = results_dir / RESULTS_MD
    if not md.is_file():
        raise Slice2VolError(f"{md} not found: run slice2vol benchmark --output {results_dir} first")
    text = readme.read_text(encoding="utf-8")
    folder = readme.parent / assets
    written = []

    def copy(src: Path, name: str) -> str:
        dst = folder / name
        io.atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
        written.append(dst)
        return f"{assets}/{name}"

    parts = [md.read_text(encoding="utf-8").strip()]
    pics = [(PLOT_QUALITY, "PSNR and SSIM vs motion"), (PLOT_TIME, "time per method")]
    links = [f"![{alt}]({copy(results_dir / f, 'benchmark_' + f)})" for f, alt in pics if (results_dir / f).is_file()]
    if links:
        parts.append("\n".join(links))
    if (results_dir / RESULTS_CSV).is_file():
        parts.append(f"Per-case figures: [`{copy(results_dir / RESULTS_CSV, 'benchmark_results.csv')}`]"
                     f"({assets}/benchmark_results.csv).")
    text = replace_between_markers(text, "benchmark", "\n\n".join(parts))
    if report_picture is not None:
        rel = copy(Path(report_picture), "report_picture.png")
        text = replace_between_markers(text, "report-picture", f"![report: {Path(report_picture).name}]({rel})")
    io.atomic_write(readme, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return written + [readme]
