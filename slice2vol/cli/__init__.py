"""The command line: one parser module (:mod:`.parser`, every command registered once with
``set_defaults(func=...)``) and the commands that are not a layer's own (:mod:`.commands`:
reconstruct, demo).  The top layer: it may import everything, nothing imports it."""
from __future__ import annotations


def main(argv=None) -> int:
    """Entry point of the ``slice2vol`` script (see :func:`slice2vol.cli.parser.main`)."""
    from slice2vol.cli.parser import main as _main

    return _main(argv)
