"""README figures are generated, never typed (issue 12 item 12).

Every results block of README.md is the saved output of the command written on its first line
(``scripts/update_readme_results.py``); the tables in the figure sections live in such blocks or
in the benchmark block that ``slice2vol benchmark --update-readme`` writes.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIGURE_SECTIONS = ("## Results", "## Large motion")


def _updater():
    spec = importlib.util.spec_from_file_location("update_readme_results", ROOT / "scripts" / "update_readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sections(text: str) -> list[tuple[int, int]]:
    heads = [m.start() for m in re.finditer(r"^## ", text, flags=re.M)] + [len(text)]
    return [(a, b) for a, b in zip(heads, heads[1:]) if text.startswith(FIGURE_SECTIONS, a)]


def test_every_results_block_matches_its_file():
    mod = _updater()
    text = README.read_text(encoding="utf-8")
    assert len(mod.blocks(text)) >= 4
    _, changed = mod.update(text, ROOT)
    assert not changed, f"README blocks differ from their files (run scripts/update_readme_results.py): {changed}"


def test_figure_sections_hold_no_typed_tables():
    mod = _updater()
    text = README.read_text(encoding="utf-8")
    generated = mod.blocks(text)
    bench = [(m.start(), m.end()) for m in re.finditer(r"<!-- benchmark:start -->.*?<!-- benchmark:end -->", text, re.S)]
    sections = _sections(text)
    assert len(sections) == len(FIGURE_SECTIONS)
    typed = []
    for a, b in sections:
        for m in re.finditer(r"^\|.*\|$", text[a:b], flags=re.M):
            pos = a + m.start()
            if not any(x <= pos < y for x, y in generated + bench):
                typed.append(m.group(0)[:80])
    assert not typed, f"typed table rows in README figure sections: {typed[:3]}"


def test_update_refuses_a_block_without_its_file(tmp_path):
    mod = _updater()
    text = "x\n<!-- results: benchmarks/results/none.txt | python nothing.py -->\n<!-- results: end -->\n"
    with pytest.raises(FileNotFoundError):
        mod.update(text, tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "none.txt").write_text("figure 1.0\n")
    new, changed = mod.update(text, tmp_path)
    assert changed == ["benchmarks/results/none.txt"] and "$ python nothing.py\nfigure 1.0\n" in new
    assert mod.update(new, tmp_path)[1] == []
