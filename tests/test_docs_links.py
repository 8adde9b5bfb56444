"""The project's markdown files link to files that exist and to headings that exist (GitHub's anchor rule)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "eval/FINDINGS.md", "llmrec/README.md", "finetune/README.md", "serve/README.md",
        "prompts/README.md"]
LINK = re.compile(r"\]\(([^)\s]*)\)")


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    heads = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_anchor_rule():
    assert anchors("## What the figures mean\n### Benchmark: ml-100k\n") == {"what-the-figures-mean",
                                                                             "benchmark-ml-100k"}


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    text = (ROOT / doc).read_text()
    broken = []
    for target in LINK.findall(text):
        if not target or target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / doc).parent / path if path else ROOT / doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(target)
    assert broken == [], f"{doc}: links to missing files or headings"
