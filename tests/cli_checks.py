"""Helpers shared by the CLI tests (imported by test modules; not a test module itself)."""
from __future__ import annotations

import re

from slice2vol.cli.parser import main


def refused(argv: list, capsys, pattern: str, code: int = 2) -> str:
    """Run the CLI; check the exit status, one ``slice2vol: error:`` line last, no traceback."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("slice2vol: error:"), err
    assert sum(line.startswith("slice2vol: error:") for line in lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]
