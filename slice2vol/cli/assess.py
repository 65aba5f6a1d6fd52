"""``slice2vol assess`` and the stack selection ``reconstruct`` runs by default.

The measurements and the decision rule are :mod:`slice2vol.methods.selection`; this module only
turns command-line options into a call, prints the table, and (for ``reconstruct``) narrows the
per-stack options to the kept stacks.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

import torch

from slice2vol import io
from slice2vol.core.image import Stack, Volume
from slice2vol.core.runtime import resolve_device
from slice2vol.methods.selection import Selection, assess_stacks

log = logging.getLogger("slice2vol")

__all__ = ["assess_command", "select_stacks"]


def _assess(args: argparse.Namespace, stacks: Sequence[Stack], mask: Volume | None, device,
            keep_all: bool) -> Selection:
    template = getattr(args, "template", None)
    protect = [template] if template is not None and 0 <= template < len(stacks) else []
    return assess_stacks(stacks, mask=mask, have_stack_masks=bool(getattr(args, "stack_masks", None)),
                         drop_outliers=not keep_all, max_stacks=getattr(args, "max_stacks", None), protect=protect,
                         device=device)


def select_stacks(args: argparse.Namespace, stacks: list[Stack], mask: Volume | None,
                  device: torch.device) -> tuple[list[Stack], dict]:
    """``reconstruct``'s stack selection: assess, log one warning line per dropped stack, and
    narrow the per-stack options of ``args`` (stack paths, masks, thicknesses, ``--packages``,
    ``--template``) to the kept stacks, in place, so every later step and record sees only them.

    Returns the kept stacks and the ``stack_selection`` record for the transforms JSON.
    """
    sel = _assess(args, stacks, mask, device, keep_all=bool(getattr(args, "keep_all_stacks", False)))
    kept = sel.kept
    for s in sel.stacks:
        if not s.keep:
            log.warning("stack %d (%s) left out of the reconstruction: %s", s.index, s.name, s.reason)
    record = sel.to_dict()
    if len(kept) == len(stacks):
        log.info("stack assessment (%.1f s): all %d stacks kept", sel.time_s, len(stacks))
        return stacks, record
    n = len(stacks)

    def narrow(values):
        return [values[i] for i in kept] if values is not None and len(values) == n else values

    for name in ("stacks", "stack_masks", "thickness", "packages"):
        if getattr(args, name, None) is not None:
            setattr(args, name, narrow(list(getattr(args, name))))
    if getattr(args, "template", None) is not None and args.template in kept:
        args.template = kept.index(args.template)
    log.info("stack assessment (%.1f s): %d of %d stacks kept", sel.time_s, len(kept), n)
    return [stacks[i] for i in kept], record


def assess_command(args: argparse.Namespace) -> int:
    """``slice2vol assess STACK...``: the table of per-stack scores and the decision ``reconstruct``
    would make with the same options."""
    device = resolve_device(args.device)
    inputs = list(args.stacks) + list(args.stack_masks or []) + ([args.mask] if args.mask else [])
    if args.json:
        io.check_output_path(args.json, inputs)
    from slice2vol.cli.commands import read_stack_inputs

    stacks, mask = read_stack_inputs(args)
    sel = _assess(args, stacks, mask, device, keep_all=False)
    print(sel.table())
    dropped = [s for s in sel.stacks if not s.keep]
    if dropped:
        print(f"reconstruct would keep {len(sel.kept)} of {len(stacks)} stacks and leave out "
              + "; ".join(f"{s.index} ({s.name})" for s in dropped) + f"; assessed in {sel.time_s:.1f} s")
    else:
        print(f"reconstruct would keep all {len(stacks)} stacks; assessed in {sel.time_s:.1f} s")
    if args.json:
        io.write_json(sel.to_dict(), args.json, protect=inputs)
        print(f"slice2vol: wrote {args.json}")
    return 0
