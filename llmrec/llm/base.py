"""The backend interface every LLM engine implements (transformers in-process, vLLM offline or over HTTP).

`score_choices(prompts, choices)` returns, per prompt, the log-softmax over the logits of each choice's FIRST token at
the next position (so `exp()` of a row sums to 1); `choices` is either one list shared by all prompts or one list per
prompt (same length for all). `generate` decodes greedily when `temperature == 0`; `frequency_penalty` (OpenAI's and
vLLM's meaning) subtracts penalty x count from each token's logit, counting only tokens generated so far (never the
prompt's, so copying a title from the prompt costs nothing). `generate_from(prompts, options,
n)` is constrained greedy decoding: the model writes up to `n` of each prompt's options, one per line, token by token
but only along the options' tokens, never one twice (titles as a ranked list that always maps back to the catalogue).
`score_continuations(prompts, continuations)` sums the log-probs of each continuation's tokens after its prompt
(the `likelihood` ranking mode: a candidate's title scored as the answer, one shared prompt per user).
`generate_quoted(prompts, quotable)` generates freely except that a double-quoted span can only be one of the
prompt's `quotable` strings (explanations that cannot invent or repeat a quoted title).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np


class BackendError(RuntimeError):
    """A model or adapter cannot be loaded or used; the message says which path / setting is wrong."""


class Backend(abc.ABC):
    """Base class of the LLM backends. Subclasses set `name` (engine and model, e.g. `vllm:smollm2-135m-instruct`),
    `model_name` (the base model's folder name, what API answers call `model`) and provide `tokenizer`."""

    name: str = "backend"
    model_name: str = ""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer of the model (used for prompt token budgets)."""

    @abc.abstractmethod
    def score_choices(self, prompts: list[str], choices: list[list[str]] | list[str]) -> np.ndarray:
        """[n_prompts, n_choices] log-softmax over the first-token logits of the choices at the next position."""

    @abc.abstractmethod
    def generate(
        self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, stop: list[str] | None = None,
        frequency_penalty: float = 0.0,
    ) -> list[str]:
        """Continuations of `prompts` (greedy at temperature 0), cut at the first `stop` string if given;
        `frequency_penalty` as in the module docstring."""

    def score_continuations(self, prompts: list[str], continuations: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(log-probability sums, token counts), each [n_prompts, n_continuations]: the sum over each continuation's
        tokens of log P(token | prompt, the continuation's earlier tokens), prompt and continuation tokenized apart
        (as fine-tuning encodes prompt and answer). Every prompt needs the same number of continuations."""
        raise BackendError(f"{self.name}: continuation scoring (score_continuations) is not supported by this backend")

    def generate_from(self, prompts: list[str], options: list[list[str]], n: int, sep: str = "\n") -> list[list[int]]:
        """Constrained greedy generation: per prompt, the indices of up to `n` of its `options` in the order the model
        wrote them (each option followed by `sep`; no option twice)."""
        raise BackendError(f"{self.name}: constrained generation (generate_from) is not supported by this backend")

    def generate_quoted(self, prompts: list[str], quotable: list[list[str]], max_new_tokens: int = 64,
                        stop: list[str] | None = None, frequency_penalty: float = 0.0,
                        lead_quote: bool = False) -> list[str]:
        """Greedy generation in which every double-quoted span is one of the prompt's `quotable` strings, each at
        most once; outside quotes the model writes freely (no other quote characters). `lead_quote`: where a prompt
        has something to quote, the text starts with a quoted span (an optional space, then the opening quote: the
        model picks which string). Backends without constrained decoding generate freely (this default): callers
        must still check the text."""
        return self.generate(prompts, max_new_tokens=max_new_tokens, stop=stop, frequency_penalty=frequency_penalty)

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


def check_first_tokens(choices: list[list[str]], ids: list[list[int]]) -> None:
    """Raise `BackendError` when two choices of one prompt have the same first token id (`ids`, per prompt as
    `choices`): only first tokens are scored, so such choices would get equal scores whatever the model says."""
    for cs, row in {tuple(r): (c, r) for c, r in zip(choices, ids)}.values():
        first: dict[int, str] = {}
        for c, t in zip(cs, row):
            if t in first:
                raise BackendError(f"choices {first[t]!r} and {c!r} start with the same token (id {t}); only a "
                                   "choice's first token is scored, so they cannot be told apart: use choices whose "
                                   "first tokens differ")
            first[t] = c


def check_max_new_tokens(max_new_tokens: int) -> None:
    """`generate`'s budget must allow one token at least (every backend refuses 0 alike, before any request)."""
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


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


class OptionTrie:
    """The token sequences of a prompt's options (each option's text + separator, tokenized on its own), walked as
    the model writes them: which tokens may come next and which options are complete. Used as a
    `prefix_allowed_tokens_fn` by constrained generation: after `n` options (or when none is left) only `eos_id`
    may follow. An option whose tokens are a prefix of another's completes first (the longer one stays reachable).
    Options with identical tokens (two catalogue ids under one title) share an end node: the first written is the
    first of them, writing the same tokens again is the next one (each can be written once)."""

    def __init__(self, seqs: list[list[int]], n: int, eos_id: int):
        if not seqs or any(not s for s in seqs):
            raise ValueError("OptionTrie: every option needs at least one token")
        self.n = min(n, len(seqs))
        self.eos_id = int(eos_id)
        self.lengths = [len(s) for s in seqs]
        # a node's "end": the options whose tokens end there, in option order (several: identical token sequences)
        self.root: dict[str, Any] = {"next": {}, "end": [], "opts": set()}
        for i, seq in enumerate(seqs):
            node = self.root
            node["opts"].add(i)
            for t in seq:
                node = node["next"].setdefault(int(t), {"next": {}, "end": [], "opts": set()})
                node["opts"].add(i)
            node["end"].append(i)

    def max_new_tokens(self) -> int:
        """Enough tokens to write the `n` longest options and the end token."""
        return sum(sorted(self.lengths, reverse=True)[: self.n]) + 1

    def walk(self, generated: list[int]) -> tuple[list[int], list[int]]:
        """(options completed so far in order, token ids allowed next) after the model wrote `generated`."""
        chosen: list[int] = []
        node = self.root
        for t in generated:
            t = int(t)
            if len(chosen) >= self.n or t not in node["next"]:  # finished (end token, padding) or off the trie
                return chosen, [self.eos_id]
            node = node["next"][t]
            done = next((i for i in node["end"] if i not in chosen), None)
            if done is not None:
                chosen.append(done)
                node = self.root
        if len(chosen) >= self.n:
            return chosen, [self.eos_id]
        done = set(chosen)
        allowed = [t for t, ch in node["next"].items() if ch["opts"] - done]
        return chosen, allowed or [self.eos_id]


def constrained_greedy(
    tries: list[OptionTrie], step: Callable[[list[int], list[list[int]], list[list[int]]], list[int]]
) -> list[list[int]]:
    """Greedy decoding along each row's `OptionTrie`, one branching point at a time: a token that is the only one
    allowed is appended without asking the model; `step(rows, allowed, generated)` returns the model's greedy token
    among `allowed[k]` after `generated[rows[k]]` for every row still branching. Returns the options written per row.
    Same result as masking every position (`prefix_allowed_tokens_fn`), with model calls only where options part."""
    gen: list[list[int]] = [[] for _ in tries]
    while True:
        rows: list[int] = []
        allowed: list[list[int]] = []
        for i, t in enumerate(tries):
            while True:
                _, ok = t.walk(gen[i])
                if ok == [t.eos_id]:
                    break
                if len(ok) == 1:
                    gen[i].append(ok[0])
                    continue
                rows.append(i)
                allowed.append(ok)
                break
        if not rows:
            return [t.walk(g)[0] for t, g in zip(tries, gen)]
        for i, tok in zip(rows, step(rows, allowed, gen)):
            gen[i].append(int(tok))


QUOTE_CHARS = '"\u201c\u201d'


def quote_token_sets(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids of every token whose text contains a double quote character, ids of the tokens that are an opening quote
    alone: '"' or ' "'). Under `generate_quoted` only the second kind may start a quoted span."""
    vocab = tokenizer.get_vocab()
    quote_ids: list[int] = []
    open_ids: list[int] = []
    for i in sorted(set(vocab.values())):
        text = tokenizer.decode([i])
        if any(q in text for q in QUOTE_CHARS):
            quote_ids.append(i)
            if text in ('"', ' "'):
                open_ids.append(i)
    return quote_ids, open_ids


def quoted_state(trie: OptionTrie, generated: list[int], open_ids: set[int]) -> tuple[list[int] | None, set[int]]:
    """Where `generated` stands under the quoted-span constraint: (the tokens allowed inside an open quote, or None
    outside quotes; the options already written). Inside a quote the text must follow one option's tokens (option
    text + closing quote) not yet used; reaching its end closes the quote."""
    used: set[int] = set()
    node: dict[str, Any] | None = None
    for t in generated:
        t = int(t)
        if node is None:
            if t in open_ids:
                node = trie.root
            continue
        nxt = node["next"].get(t)
        if nxt is None:  # off the trie (cannot happen under the constraint): back to free text
            node = None
            continue
        node = nxt
        done = next((i for i in node["end"] if i not in used), None)
        if done is not None:
            used.add(done)
            node = None
    if node is None:
        return None, used
    return [t for t, ch in node["next"].items() if ch["opts"] - used], used
