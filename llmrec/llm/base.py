"""The backend interface every LLM engine implements (transformers in-process, vLLM offline or over HTTP).

`score_choices(prompts, choices)` returns, per prompt, the log-softmax over the logits of each choice's FIRST token at
the next position (so `exp()` of a row sums to 1); `choices` is either one list shared by all prompts or one list per
prompt (same length for all). `generate` decodes greedily when `temperature == 0`.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np


class BackendError(RuntimeError):
    """A model or adapter cannot be loaded or used; the message says which path / setting is wrong."""


class Backend(abc.ABC):
    """Base class of the LLM backends. Subclasses set `name` and provide `tokenizer` (a Hugging Face tokenizer)."""

    name: str = "backend"

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer of the model (used for prompt token budgets)."""

    @abc.abstractmethod
    def score_choices(self, prompts: list[str], choices: list[list[str]] | list[str]) -> np.ndarray:
        """[n_prompts, n_choices] log-softmax over the first-token logits of the choices at the next position."""

    @abc.abstractmethod
    def generate(
        self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, stop: list[str] | None = None
    ) -> list[str]:
        """Continuations of `prompts` (greedy at temperature 0), cut at the first `stop` string if given."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources (servers, threads); a no-op by default."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def normalize_choices(prompts: list[str], choices: list[list[str]] | list[str]) -> list[list[str]]:
    """One choice list per prompt (a shared flat list is repeated); all lists must have the same length."""
    if not prompts:
        return []
    if not choices:
        raise ValueError("choices: empty")
    per = [list(choices)] * len(prompts) if isinstance(choices[0], str) else [list(c) for c in choices]
    if len(per) != len(prompts):
        raise ValueError(f"choices: {len(per)} lists for {len(prompts)} prompts")
    n = len(per[0])
    if n == 0 or any(len(c) != n for c in per):
        raise ValueError("choices: every prompt needs the same (non-zero) number of choices")
    return per


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    if not stop:
        return text
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]
