"""Argument types shared by the sub-commands: counts that refuse what they cannot mean (argparse prints the error
with the option's name and exits 2, before anything runs), and `UsageError` for flags that parse one by one but not
together."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)
count = int_at_least(0)  # where 0 means "all"


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (a weight): `nan` or a negative one would be refused only after a model had loaded, or
    not at all (a negative retrieval weight silently inverts the retrieval order's say)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


nonneg_float.__name__ = "number >= 0"


class UsageError(SystemExit):
    """Flags that cannot go together (or a missing one that argparse cannot express): `llmrec` prints the message
    and exits with status 2, as argparse does for its own usage errors, before anything is loaded. A SystemExit, so
    that it ends the command wherever it is raised; `str(e)` is the message, `e.code` is 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2
