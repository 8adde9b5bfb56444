"""Untrusted text -> safe prompt text: item titles, field values and user text are quoted, escaped and capped so
that they can never act as an instruction (no newlines, no control characters, no unbalanced quotes)."""

from __future__ import annotations

import re
import unicodedata

TITLE_MAX_CHARS = 120
FIELD_MAX_CHARS = 80
_WS = re.compile(r"\s+")
# chat / control-token markup that HF tokenizers turn into special tokens even inside plain text: `<|im_end|>`,
# `<|start_header_id|>`, `</s>`, `<s>`, SmolLM2's `<issue_start>` ...; a space after `<` and before `>` breaks it
_MARKUP_OPEN, _MARKUP_CLOSE = re.compile(r"<\|"), re.compile(r"\|>")
_MARKUP_TAG = re.compile(r"<(/?[A-Za-z_][\w.-]*)>")


def clean(text: object, max_chars: int = TITLE_MAX_CHARS) -> str:
    """One line of plain text: control/format characters and line breaks become spaces, chat/control-token markup
    (`<|...|>`, `<tag>`) is broken up by spaces so no tokenizer reads it as a special token, whitespace is
    collapsed, the result is cut to `max_chars` characters (an ellipsis marks the cut)."""
    s = "" if text is None else str(text)
    if s != s or s == "nan":  # NaN from pandas
        s = ""
    out = []
    for ch in s:
        cat = unicodedata.category(ch)
        if ch in "\n\r\t\v\f\u2028\u2029\x85" or cat in ("Zl", "Zp"):
            out.append(" ")
        elif cat in ("Cc", "Cf", "Cs", "Co", "Cn"):
            continue
        else:
            out.append(ch)
    s = _MARKUP_TAG.sub(r"< \1 >", _MARKUP_CLOSE.sub("| >", _MARKUP_OPEN.sub("< |", "".join(out))))
    s = _WS.sub(" ", s).strip()
    if max_chars and len(s) > max_chars:
        s = s[: max(1, max_chars - 1)].rstrip() + "…"
    return s


def quote(text: object, max_chars: int = TITLE_MAX_CHARS) -> str:
    """`clean` + backslash-escaped double quotes, wrapped in double quotes: `"Say \\"hi\\""`."""
    s = clean(text, max_chars).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def plural(noun: str) -> str:
    """English plural of a domain noun (`movie` -> `movies`, `gift card` -> `gift cards`, `story` -> `stories`)."""
    n = noun.strip()
    if not n:
        return "items"
    low = n.lower()
    if low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        return n[:-1] + "ies"
    if low.endswith(("s", "x", "z", "ch", "sh")):
        return n + "es"
    return n + "s"


def ago(seconds: float) -> str:
    """A coarse human duration: `just now`, `5 minutes ago`, `3 days ago`, `2 years ago`."""
    s = max(0.0, float(seconds))
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):
        if s >= size:
            n = int(s // size)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now"
