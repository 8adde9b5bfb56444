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


def float_at_least(low: float, strict: bool = False) -> Callable[[str], float]:
    """argparse type of a finite number >= `low` (> `low` with `strict`): a weight, a timeout. `nan`, `inf` or one out
    of range would be refused only after a model had loaded, or not at all (a negative retrieval weight silently
    inverts the retrieval order's say; an infinite timeout leaves a run unbounded)."""
    op = ">" if strict else ">="

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(v) and (v > low if strict else v >= low)):
            raise argparse.ArgumentTypeError(f"must be a finite number {op} {low:g}, got {text}")
        return v

    parse.__name__ = f"number {op} {low:g}"
    return parse


nonneg_float = float_at_least(0.0)
positive_float = float_at_least(0.0, strict=True)


def positive_ints(text: str) -> list[int]:
    """argparse type of a comma list of integers >= 1 (`1,8,16`): a `0` or a word is refused at parsing, not deep in a
    run (a level with no client thread, a traceback after a service had started)."""
    out = [positive_int(x.strip()) for x in text.split(",") if x.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of integers >= 1, e.g. 1,8,16")
    return out


class UsageError(SystemExit):
    """Flags that cannot go together (or a missing one that argparse cannot express): `llmrec` prints the message
    and exits with status 2, as argparse does for its own usage errors, before anything is loaded. A SystemExit, so
    that it ends the command wherever it is raised; `str(e)` is the message, `e.code` is 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2
