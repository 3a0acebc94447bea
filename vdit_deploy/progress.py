"""Progress of long work on stderr: one line per stage and a tqdm bar per layer, call or step.

Shown when stderr is a terminal and quiet otherwise (pipes, logs, tests), so what a command prints on
stdout stays its result and a refusal stays one `Error:` line. VDIT_PROGRESS=1 shows it anyway,
VDIT_PROGRESS=0 hides it on a terminal too.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def shown() -> bool:
    forced = os.environ.get("VDIT_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def note(message: str) -> None:
    """A stage starting (what it does, and how long it takes when that is long)."""
    if shown():
        print(message, file=sys.stderr, flush=True)


def bar(iterable=None, show: bool = True, **options) -> tqdm:
    """tqdm on stderr when shown(); show=False keeps it hidden (a library caller's quiet run)."""
    return tqdm(iterable, disable=not (show and shown()), leave=False, file=sys.stderr,
                dynamic_ncols=True, **options)
