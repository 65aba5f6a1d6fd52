"""The package's layers (issue 12 item 15): a module imports only from its own layer or the layers
below it, so the architecture stays readable (README "How it works")."""
from __future__ import annotations

import ast
from pathlib import Path

import slice2vol

PKG = Path(slice2vol.__file__).resolve().parent
#: bottom to top
LAYERS = ["errors", "core", "io", "simulation", "methods", "evaluation", "training", "report", "cli"]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "slice2vol" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (the layout uses absolute imports)"
            if node.module == "slice2vol":
                out += [f"slice2vol.{a.name}" for a in node.names]
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_imports_point_down_only():
    upward = []
    for path in PKG.rglob("*.py"):
        module = "slice2vol." + ".".join(path.relative_to(PKG).with_suffix("").parts)
        mine = _layer(module.removesuffix(".__init__"))
        if mine is None:
            continue
        for target in _imports(path):
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_every_module_is_in_a_layer():
    loose = [p.name for p in PKG.glob("*.py") if p.stem not in ("__init__", "errors", "io")]
    assert not loose, f"modules outside the layers: {loose}"
