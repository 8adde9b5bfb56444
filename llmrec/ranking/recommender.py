"""The `Recommender`: history -> candidates -> prompt -> LLM scores -> top-K -> explanation.

One object serves the CLI, the HTTP service and the evaluation runners, so that what is measured is what is served.

Scoring modes
- `verbalizer` (default): one forward pass over the `rank` prompt; each candidate is labelled with a single-token
  letter and scored by the log-probability of its letter as the next token (LlamaRec style). With `listings` k > 1
  the candidates are listed k times in cyclically shifted orders and each one's log-probs are averaged (k passes).
- `likelihood`: one `next_title` prompt per user (the history, no candidate list); each candidate is scored by its
  title's mean log-probability per token as the answer (`Backend.score_continuations`: the prompt's tokens computed
  once, the titles in one batched pass over its cache). No letters, so no label binding and no listing position; an
  adapter tuned on the `next_title` task (finetune/recipes/next_title_smollm2_qlora.yaml) fits it.
- `generate`: the model writes titles (the `next_title` prompt), one per line. By default (`generate_constrained`)
  decoding is constrained to the candidates' own title tokens (`Backend.generate_from`: a token trie; vLLM:
  `allowed_token_ids` where titles part), so it writes up to `generate_titles` distinct candidates in its own order
  and every line maps. Unconstrained
  (`generate_constrained: false`): free text, each line mapped back to the catalogue by exact title match, else by
  embedding similarity among the candidates (threshold `min_title_similarity`); unmapped lines are dropped and
  counted. Candidates the model did not name keep their retrieval order after the named ones.
Yes/No: `score_yesno` gives P(Yes) = softmax over the " Yes"/" No" first-token logits of the `yesno` prompt.
Explanations: `explain` template (v3 names the top recommendation and, with its `lead_quote`, makes the text open by
citing a liked title); with `explain_quoted_titles` a quoted title can only be one the user liked among the history
items the prompt lists (`Backend.generate_quoted`); greedy with `explain_frequency_penalty`; then the post-check, else
a template fallback.

Full ranking (evaluation): `score_matrix` puts the LLM-ordered candidates above every other item; the rest keep their
retrieval score, so metrics stay full-ranking over the whole catalogue. `recommend` with k above the candidates
continues likewise: the next unseen items in retrieval order, scored below every candidate.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from llmrec.data.prepare import PreparedDataset, title_twins, with_title_twins
from llmrec.llm.base import BackendError
from llmrec.prompts import liked_shown, quotable_titles, quote
from llmrec.ranking.explain import (
    TitleMatcher,
    answer_lead,
    check_explanation,
    drop_empty_tail,
    reads_as_space_lists,
    split_list,
    split_values,
    template_explanation,
    tidy_explanation,
)

log = logging.getLogger(__name__)

ATTRIBUTE_FIELDS = ("genres", "categories", "brand")
_DETAILS = re.compile(r'\s*\([a-z_ ]+:[^)]*\)\s*$', re.I)  # a rendered '(genres: "..")' after a title
_LIST_MARKER = re.compile(r"^(?:[-*•]+\s*|\(?\d{1,3}[.)]\s+)")  # a list marker before a generated title


@dataclass
class RankingConfig:
    """How the Recommender ranks. Every key has a default."""

    mode: Literal["verbalizer", "likelihood", "generate"] = "verbalizer"
    n_candidates: int = 20  # retrieved candidates placed in the prompt (letters A..T)
    # verbalizer / likelihood: score = LLM score + retrieval_weight * log(1 / retrieval rank). 0 = the LLM's order
    # alone; large = the retriever's order. `llmrec bench` chooses it on the validation split (fusion_grid).
    retrieval_weight: float = 0.0
    # verbalizer: list the candidates this many times, each listing a cyclic shift of the retrieval order by
    # n_candidates / listings places; a candidate's LLM score is its mean letter log-prob over the listings, so a
    # model's preference for a letter or a listed position cancels out (listings = n_candidates: every candidate at
    # every position once). Costs `listings` forward passes per user. 1 = one listing, in retrieval order.
    listings: int = 1
    history_len: int = 10  # most recent events in the prompt (as in the finetune recipes; the budget may drop more)
    max_prompt_tokens: int = 1024  # token budget per prompt: oldest history dropped first (next_title with 20
    # candidates and no history is ~530 tokens on ml-100k; 10 history events add ~200)
    chat: bool = False  # render with the tokenizer's chat template
    batch_size: int = 8  # prompts per backend call
    explain_max_new_tokens: int = 80
    # OpenAI / vLLM frequency_penalty on the explanation's own tokens (the prompt's are not counted): each repeat of
    # a token costs this much logit, so greedy decoding stops chaining 'and liked "..." and liked "..."' (0 = off)
    explain_frequency_penalty: float = 1.0
    # explanations: a double-quoted title can only be one the user liked in the prompt's history, each at most once
    # (constrained decoding; invented, repeated or recommended-as-liked quoted titles cannot be written)
    explain_quoted_titles: bool = True
    # ... and only liked items sharing an attribute (genre, tag, ...) with the top recommended item when the answer
    # prefix names it (explain v3), else / when none does with one of the top 3, when there is one (what the
    # explanation can cite is then evidence for the recommendation, not any liked title)
    explain_relevant_titles: bool = True
    # (with explain_relevant_titles and a template whose answer prefix names {first_recommended}: the text is about
    # the best-ranked of the top 3 that shares an attribute with a liked item the prompt lists, listed first there)
    # explanations: when the history_len most recent events hold fewer likes than this, the prompt also lists the
    # most recent earlier liked items (oldest first still), so a harsh rater's explanation has something to cite
    explain_min_liked: int = 3
    # likelihood: a candidate's score is its title's log-prob as the answer to the `next_title` prompt (no candidate
    # list in it), "mean" per token (long titles not penalised; ML-100K validation, tuned adapter: NDCG@10 0.071 alone,
    # 0.089 fused, vs "sum" 0.060 / 0.080) or "sum" (the sequence's log-prob)
    likelihood_norm: Literal["mean", "sum"] = "mean"
    # likelihood: score = the title's log-prob after the user's prompt - likelihood_prior_weight * its log-prob after
    # the same prompt with no history ("(none)"), both normalised as likelihood_norm says: what the history adds to a
    # title rather than how likely the model finds it anyway (domain-conditional PMI, Holtzman et al. 2021). Each
    # title's prior is computed once per Recommender. 0 = the plain likelihood.
    likelihood_prior_weight: float = 0.0
    generate_constrained: bool = True  # generate: decode only along candidate titles (every line maps)
    # generate: list the candidates in the next_title prompt. false renders it without them, as the next_title
    # recipe trains it (constrained decoding still writes only candidates); a next_title adapter's run sets false
    generate_list_candidates: bool = True
    generate_titles: int = 10  # generate, constrained: titles written per user (the ranked head; NDCG@10 needs 10)
    generate_max_new_tokens: int = 64  # generate, unconstrained: titles, one per line (stops at a blank line)
    min_title_similarity: float = 0.75  # generate mode: embedding match threshold for an inexact title
    # rating events given as histories (event store, API): liked = value > like_threshold; None = the dataset's own
    # rule (its manifest's like_threshold, as its prepared labels and so the adapters' training prompts), else 3
    like_threshold: float | None = None
    # candidates skip items listed under the title of an item the user has seen (catalogue duplicates: ML-100K has 18
    # films under two ids). Evaluation (`score_matrix`) keeps the leave-one-out protocol of every baseline: by id only
    exclude_seen_titles: bool = True
    # prompt template per task when it is not the task's own name, e.g. {"yesno": "yesno_stats"} for an adapter
    # tuned on it (llmrec.ranking.factory.adapter_templates reads what an adapter was trained with)
    templates: dict[str, str] = field(default_factory=dict)
    # item columns an explanation may cite as shared attributes (evidence, fallback text, citable titles); None =
    # genres / categories / brand when present, then other short categorical text columns (a CSV's `author`)
    attribute_fields: list[str] | None = None


def attribute_fields(items: Any) -> list[str]:
    """Item columns whose values are attributes two items can share: the known ones (genres, categories, brand) when
    present, then every other text column of short values that repeat across items (a CSV's `author`, `artist`);
    never the id, the title, a numeric column (year, price) or long free text (description)."""
    out = [f for f in ATTRIBUTE_FIELDS if f in items.columns]
    for f in items.columns:
        if f in out or f in ("item_id", "title") or items[f].dtype.kind in "biuf":
            continue
        vals = items[f].dropna().astype(str).str.strip()
        vals = vals[vals != ""]
        if vals.empty or vals.str.fullmatch(r"[-+]?\d+(?:\.\d+)?").mean() >= 0.95:  # numeric, a few dirty values
            continue
        if vals.str.len().mean() <= 40 and vals.nunique() < 0.8 * len(vals):
            out.append(f)
    return out


@dataclass
class RecItem:
    item_id: str
    title: str
    score: float
    rank: int


@dataclass
class Recommendation:
    user_id: str
    items: list[RecItem]
    explanation: str | None = None
    explanation_fallback: bool = False
    hallucinated: list[str] = field(default_factory=list)
    model: str = ""
    adapter: str | None = None
    backend: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    # the history items the explanation cites, each with the attribute values (genre, tag, ...) it shares with the
    # recommended items the text names: {"item_id", "title", "shared": [...]}, in the order the text cites them
    evidence: list[dict[str, Any]] = field(default_factory=list)
    # whether the *generated* text (before any fallback) named a history item or a liked attribute it could support
    # (`ExplanationCheck.grounded`); None without a generated text
    explanation_grounded: bool | None = None
    # why the generated text failed the post-check when the template fallback is shown (`ExplanationCheck.reasons`)
    explanation_fallback_reasons: list[str] = field(default_factory=list)


class Explanation(NamedTuple):
    """One user's explanation: the text shown, whether it is the template fallback, the hallucinated titles of the
    generated text that failed the check, whether that generated text was grounded (None: nothing generated) and,
    for a fallback, why the generated text failed (`ExplanationCheck.reasons`)."""

    text: str | None
    fallback: bool
    hallucinated: list[str]
    grounded: bool | None = None
    fallback_reasons: tuple[str, ...] | list[str] = ()


@dataclass
class HistEvent:
    """A history event in the form the Recommender reads (dataset rows and store events both map to it)."""

    item_id: str
    liked: bool | None
    rating: float | None = None
    timestamp: int | None = None


def like_threshold_of(ds: Any, value: float | None = None) -> float:
    """`value`, or the rating above which `ds`'s prepared labels are likes (its manifest's like_threshold, recorded for
    the rating_threshold rule), or 3.0: what a new rating event must exceed to read as the training data read it."""
    if value is not None:
        return float(value)
    got = (getattr(ds, "manifest", None) or {}).get("like_threshold")
    return 3.0 if got is None else float(got)


def to_hist_events(history: Iterable[Any], like_threshold: float = 3.0) -> list[HistEvent]:
    """Accept store `Event`s, `HistEvent`s or dicts; derive `liked` from a rating when it is not given."""
    out = []
    for n, e in enumerate(history):
        get = e.get if isinstance(e, dict) else (lambda k, d=None, _e=e: getattr(_e, k, d))
        liked = get("liked")
        value = get("rating", None)
        if value is None and get("type", None) == "rating":
            value = get("value", None)
        if liked is None and value is not None and value == value:
            liked = bool(value > like_threshold)
        ts = get("timestamp", None)
        if ts is not None:
            try:
                ts = int(ts)  # int(nan) / int("noon"): a bare ValueError that named neither the event nor the field
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"history event {n} (item {get('item_id')!r}): timestamp {ts!r} is not an integer "
                                 "(seconds since the epoch)") from None
        out.append(HistEvent(str(get("item_id")), liked, value, ts))
    return out


def latest_per_item(history: Iterable[HistEvent]) -> list[HistEvent]:
    """One event per item, where its most recent event is (oldest first still): an event stream lists an item again
    for every view, click, purchase or new rating of it. Its reaction and rating are those of its most recent event
    that has one (a later view keeps an earlier like; a new rating replaces the old one), its timestamp the latest."""
    last: dict[str, HistEvent] = {}
    for e in history:
        prev = last.pop(e.item_id, None)
        if prev is not None:
            e = HistEvent(e.item_id, prev.liked if e.liked is None else e.liked,
                          prev.rating if e.rating is None else e.rating,
                          prev.timestamp if e.timestamp is None else e.timestamp)
        last[e.item_id] = e  # re-inserted: the item now sits at its latest event
    return list(last.values())


def _unwrap(s: str) -> str:
    """`s` without one pair of enclosing double quotes (the prompts' quoting; the escapes inside are kept, as the
    title matcher reads them): `"Say \\"Hi\\""` -> `Say \\"Hi\\"`. A closing quote escaped by a backslash is a
    title's own."""
    if len(s) >= 2 and s[0] in '"\u201c' and s[-1] in '"\u201d':
        body = s[:-1]
        if (len(body) - len(body.rstrip("\\"))) % 2 == 0:
            return s[1:-1].strip()
    return s


def _line_forms(line: str) -> list[str]:
    """The forms a generated line may name a title in, plainest last: as written (`*NSYNC`, `"Weird Al" Yankovic`
    are titles), without a list marker ("1. ", "2) ", "- ", "* "; not a title's digits), without rendered details
    (`"Title" (genres: ..)`), without the enclosing quotes, without any quote at its edges (an unbalanced one: a
    line cut short). Each step applies to the previous form."""
    forms = [line.strip()]
    for step in (lambda x: _LIST_MARKER.sub("", x).strip(), lambda x: _DETAILS.sub("", x).strip(), _unwrap,
                 lambda x: x.strip('"\u201c\u201d').strip()):
        forms.append(step(forms[-1]))
    return list(dict.fromkeys(f for f in forms if f))


def cyclic_shift(ids: Sequence[str], s: int, k: int) -> list[str]:
    """Listing `s` of `k` of the candidates `ids`: their order rotated left by round(s * len(ids) / k) places, so the
    k listings put each candidate at k positions spread evenly over the list (listing 0 = `ids` as given)."""
    n = len(ids)
    shift = round(s * n / k) % n if n else 0
    return list(ids[shift:]) + list(ids[:shift])


def mean_over_listings(ids: Sequence[str], listings: Sequence[tuple[Sequence[str], np.ndarray]]) -> np.ndarray:
    """Each of `ids`' mean LLM score over the `listings` ((listed ids, their log-probs in listed order)) that list
    it; -inf for an id none lists."""
    total = dict.fromkeys(ids, 0.0)
    count = dict.fromkeys(ids, 0)
    for listed, lp in listings:
        if len(listed) != len(lp):
            raise ValueError(f"{len(listed)} listed candidates but {len(lp)} LLM scores")
        for i, v in zip(listed, lp):
            if i in total:
                total[i] += float(v)
                count[i] += 1
    return np.array([total[i] / count[i] if count[i] else -np.inf for i in ids])


def fuse_with_retrieval(ids: Sequence[str], llm_logprobs: np.ndarray, weight: float) -> list[tuple[str, float]]:
    """Candidates `ids` (in retrieval order, best first) re-ordered by
    s_j = llm_logprobs[j] + weight * log(1 / (j + 1)). Returns (item_id, s_j) best first; ties keep retrieval order."""
    lp = np.asarray(llm_logprobs, dtype=np.float64)
    if len(lp) != len(ids):
        raise ValueError(f"{len(ids)} candidates but {len(lp)} LLM scores")
    s = lp - weight * np.log(np.arange(1, len(lp) + 1, dtype=np.float64)) if weight else lp
    order = np.argsort(-s, kind="stable")
    return [(ids[o], float(s[o])) for o in order]


class Recommender:
    """history -> retrieval -> prompt -> LLM -> top-K -> explanation, batched across users."""

    def __init__(
        self,
        ds: PreparedDataset,
        backend: Any,
        retriever: Any,
        cfg: RankingConfig | None = None,
        adapter: str | None = None,
    ):
        self.ds = ds
        self.backend = backend
        self.retriever = retriever
        self.cfg = cfg or RankingConfig()
        if self.cfg.like_threshold is None:
            self.cfg = replace(self.cfg, like_threshold=like_threshold_of(ds))
        self.adapter = adapter
        self.title_twins = title_twins(list(ds.item_ids), list(ds.titles))  # id -> ids listed under the same title
        if self.cfg.attribute_fields is not None:
            missing = [f for f in self.cfg.attribute_fields if f not in ds.items.columns]
            if missing:
                raise ValueError(f"RankingConfig.attribute_fields: {missing} not among {ds.name}'s item columns "
                                 f"{list(ds.items.columns)}")
            self._attr_fields = list(self.cfg.attribute_fields)
        else:
            self._attr_fields = attribute_fields(ds.items)
        self._space_lists = {f for f in self._attr_fields
                             if f in ATTRIBUTE_FIELDS and reads_as_space_lists(ds.items[f])}
        self._vocab: dict[int, set[str]] = {}  # attribute_vocabulary's answer per max_values, built on first use
        from llmrec.prompts import load_template
        from llmrec.prompts.templates import TASKS

        unknown = set(self.cfg.templates) - set(TASKS)
        if unknown:
            raise ValueError(f"RankingConfig.templates: unknown task(s) {sorted(unknown)}")
        self.templates = {n: load_template(self.cfg.templates.get(n, n)) for n in TASKS}
        for task, t in self.templates.items():
            if t.task != task:
                raise ValueError(f"RankingConfig.templates[{task!r}]: template {t.name!r} is a {t.task!r} template")
        if self.cfg.mode == "verbalizer":  # a warning only: pointwise / likelihood runs keep the default mode
            try:
                self.check_labels("verbalizer")
            except ValueError as e:
                log.warning("%s (ranking in verbalizer mode will fail)", e)
        # titles as the explain prompt quotes them (capped) read as the items too
        self.matcher = TitleMatcher(list(ds.item_ids), [str(t) for t in ds.titles],
                                    self.templates["explain"].options.title_max_chars)
        # prompt text -> letter log-probs (verbalizer), ("likelihood", prompt, title) -> (log-prob sum, tokens); set to
        # a dict to score each prompt once across several retrieval_weight values (select_retrieval_weight)
        self.llm_cache: dict[Any, Any] | None = None
        self._prior_cache: dict[Any, Any] = {}  # title_priors when llm_cache is off: a title's prior never changes
        # generate mode, summed over calls (an evaluation ranks users in several calls): users, lines, mapped, unmapped
        self.generate_totals: Counter[str] = Counter()
        self.last_generate_stats: dict[str, int] = {"lines": 0, "mapped": 0, "unmapped": 0}

    # ----------------------------------------------------------------------------------------------- helpers
    def check_labels(self, mode: str) -> None:
        """verbalizer: every candidate needs a letter of the `rank` template (checked before any retrieval or LLM
        work, with the setting named)."""
        if mode != "verbalizer":
            return
        t = self.templates["rank"]
        labels = t.verbalizer.labels if t.verbalizer and t.verbalizer.labels else ""
        if self.cfg.n_candidates > len(labels):
            raise ValueError(f"RankingConfig.n_candidates={self.cfg.n_candidates} exceeds the {len(labels)} labels "
                             f"({labels!r}) of the rank template {t.name!r}: the verbalizer mode gives each candidate "
                             f"a letter; use at most {len(labels)} candidates, or the likelihood / generate mode")

    @property
    def model_name(self) -> str:
        return str(getattr(self.backend, "model_name", "") or getattr(self.backend, "name", ""))

    def dataset_history(self, user_id: str, split: str = "all") -> list[HistEvent]:
        h = self.ds.history(user_id, before=split)  # type: ignore[arg-type]
        return [
            HistEvent(i, bool(lab), None if r != r else float(r), int(t))
            for i, lab, r, t in zip(h["item_id"], h["label"], h["rating"], h["timestamp"])
        ]

    def _explain_events(self, history: list[HistEvent]) -> list[HistEvent]:
        """The events an explanation prompt lists: the `history_len` most recent, preceded (still oldest first) by the
        most recent earlier liked ones when those hold fewer than `explain_min_liked` likes. A harsh rater's last ten
        can all be dislikes, and the text may only cite liked titles the prompt lists."""
        n = self.cfg.history_len
        known = self._known(history)  # an item outside the catalogue has no text to show
        window = known[max(0, len(known) - n):]  # [-0:] would be the whole history
        need = self.cfg.explain_min_liked - sum(e.liked is True for e in window)
        if need <= 0:
            return window
        earlier = [e for e in known[: max(0, len(known) - n)] if e.liked is True]
        return earlier[-need:] + window

    def _known(self, history: list[HistEvent]) -> list[HistEvent]:
        return [e for e in history if e.item_id in self.ds.item_index]

    def _prompt_history(self, history: list[HistEvent], events: list[HistEvent] | None = None):
        """The prompt's history items: `events`, by default the `history_len` most recent catalogue items of `history`
        (an event-store item outside the catalogue has no text: it would take a place and be skipped)."""
        from llmrec.prompts import history_from_dataset

        if events is None:
            known = self._known(history)
            h = known[max(0, len(known) - self.cfg.history_len):]  # [-0:] would be the whole history
        else:
            h = events
        return history_from_dataset(
            self.ds,
            [e.item_id for e in h],
            [None if e.liked is None else int(e.liked) for e in h],
            [e.rating for e in h],
            [e.timestamp for e in h],
        )

    def _render(self, name: str, history: list[HistEvent], prompt_history: list | None = None, **kw):
        from llmrec.prompts import render

        return render(
            self.templates[name],
            history=self._prompt_history(history) if prompt_history is None else prompt_history,
            domain=self.ds.domain,
            tokenizer=getattr(self.backend, "tokenizer", None),
            max_tokens=self.cfg.max_prompt_tokens,
            chat=self.cfg.chat,
            **kw,
        )

    def _items(self, ids: Sequence[str]):
        from llmrec.prompts import items_from_dataset

        return items_from_dataset(self.ds, list(ids))

    def candidates(self, history: list[HistEvent], k: int | None = None,
                   exclude_seen_titles: bool | None = None) -> list[tuple[str, float]]:
        """Top-k unseen items from the retriever, built from `history` only. Unseen: not a history item, nor (when
        `exclude_seen_titles`, default `cfg.exclude_seen_titles`) listed under a history item's title."""
        k = k or self.cfg.n_candidates
        seen = {e.item_id for e in history}
        if self.cfg.exclude_seen_titles if exclude_seen_titles is None else exclude_seen_titles:
            seen = self._with_twins(seen)
        hist = [(e.item_id, e.liked is not False, e.timestamp) for e in self._known(history)]
        out: list[tuple[str, float]] = []
        taken = set(seen)
        for i, s in self.retriever.query(hist, k=k, exclude=seen):  # a retriever's own slip: no seen item, no repeat
            if i not in taken:
                taken.add(i)
                out.append((i, s))
        return out[:k]

    def _with_twins(self, ids: Iterable[str]) -> set[str]:
        return with_title_twins(ids, self.title_twins)

    def _attrs(self, item_id: str) -> list[str]:
        row = self.ds.items.iloc[self.ds.item_index[item_id]]
        # values are split at , | ; ("Science Fiction, Classics"; "Frank Herbert" stays whole), a genre-like column
        # with no such separator at spaces before capitalised words when it reads as lists (`reads_as_space_lists`;
        # ML-100K: "Action Adventure Sci-Fi")
        vals = [(f, row[f]) for f in self._attr_fields if isinstance(row[f], str)]  # a missing value is no attribute
        return [a for f, v in vals for a in (split_values(v) if f in self._space_lists else split_list(v))]

    def sharing_attributes(self, item_ids: Iterable[str], rec_ids: Sequence[str]) -> set[str]:
        """The ids among `item_ids` (catalogue items) that share an attribute value with one of `rec_ids`."""
        rec_attrs = {a for i in rec_ids for a in self._attrs(i)}
        return {i for i in item_ids if i in self.ds.item_index and rec_attrs & set(self._attrs(i))}

    def explanation_evidence(self, history: list[HistEvent], text: str | None, rec_ids: Sequence[str]
                             ) -> list[dict[str, Any]]:
        """The history items `text` cites (in order; a title listed under two ids resolves to the one the user has),
        each with the attribute values it shares with the recommended items the text names (with the top item when it
        names none): structured evidence a client can show next to the explanation."""
        if not text:
            return []
        hist = {e.item_id for e in history}
        named = self.matcher.find(text, strict=True)  # as the post-check reads it: "his mother" cites no film
        recs = self._with_twins(rec_ids)
        about = [i for i in named if i in recs and i not in hist] or list(rec_ids[:1])
        about_attrs = {a for i in about if i in self.ds.item_index for a in self._attrs(i)}
        out: list[dict[str, Any]] = []
        for i in named:
            own = next((t for t in sorted(self._with_twins([i])) if t in hist), None)
            if own is None or own not in self.ds.item_index or any(e["item_id"] == own for e in out):
                continue
            shared = [a for a in dict.fromkeys(self._attrs(own)) if a in about_attrs]
            out.append({"item_id": own, "title": str(self.ds.titles[self.ds.item_index[own]]), "shared": shared})
        return out

    def _explain_focus(self, hist: list, rendered: Any, recs: Sequence[str],
                       first: bool) -> tuple[int, set[str] | None]:
        """What an explanation is about and may cite: (index among the top 3 of the item the text explains, the liked
        history items the prompt lists that share an attribute value with it). `first` (the answer prefix names the
        item): the best-ranked of the top 3 some listed liked item shares an attribute with, so "X suits this user
        because they liked Y" has a reason behind it; else those sharing one with any of the top 3. (0, None) when
        none does: the top item, and any liked title listed may be quoted."""
        liked = {x.item.item_id for x in liked_shown(hist, rendered)}
        for j, pool in (enumerate([[r] for r in recs[:3]]) if first else [(0, recs[:3])]):
            prefer = self.sharing_attributes(liked, pool)
            if prefer:
                return j, prefer
        return 0, None

    # ----------------------------------------------------------------------------------------------- ranking
    def rank_candidates(
        self, histories: list[list[HistEvent]], cands: list[list[tuple[str, float]]], mode: str | None = None
    ) -> list[list[tuple[str, float]]]:
        """Order each user's candidates with the LLM. Returns (item_id, score) best first. A non-finite score (NaN or
        inf: a backend fault such as an overflow) is a `BackendError`: NaN sorts anywhere, so the order would be
        arbitrary (retrieval order for all-NaN scores), for recommendations and evaluation (`score_matrix`) alike."""
        mode = mode or self.cfg.mode
        if mode == "verbalizer":
            ranked = self._rank_verbalizer(histories, cands)
        elif mode == "likelihood":
            ranked = self._rank_likelihood(histories, cands)
        elif mode == "generate":
            ranked = self._rank_generate(histories, cands)
        else:
            raise ValueError(f"unknown ranking mode {mode!r}: use 'verbalizer', 'likelihood' or 'generate'")
        bad = sum(not np.isfinite(sc) for r in ranked for _, sc in r)
        if bad:  # NaN sorts anywhere and is no JSON number: a backend fault (overflow), not a ranking
            raise BackendError(f"the LLM backend returned {bad} non-finite candidate scores (NaN/inf) for "
                               f"{len(histories)} user(s); no ranking can be read from them")
        return ranked

    def _rank_verbalizer(self, histories, cands):
        out: list[list[tuple[str, float]]] = [[] for _ in histories]
        k = self.cfg.listings
        if k < 1:
            raise ValueError(f"RankingConfig.listings must be >= 1, got {k}")
        self.check_labels("verbalizer")
        cache = self.llm_cache if self.llm_cache is not None else {}
        todo = [u for u, c in enumerate(cands) if c]
        for b in range(0, len(todo), self.cfg.batch_size):
            idx = todo[b : b + self.cfg.batch_size]
            ids = {u: [c for c, _ in cands[u]] for u in idx}
            rendered: dict[int, list[Any]] = {}
            for u in idx:
                m = min(k, len(ids[u]))  # listings of this user's candidates (k, or one per candidate)
                rendered[u] = [self._render("rank", histories[u], candidates=self._items(cyclic_shift(ids[u], s, m)))
                               for s in range(m)]
            groups: dict[int, list[Any]] = {}
            for r in (r for rs in rendered.values() for r in rs if r.text not in cache):
                groups.setdefault(len(r.choices), []).append(r)
            for rs in groups.values():  # backends need equal-length choice lists per call
                rs = list({r.text: r for r in rs}.values())
                lp = self.backend.score_choices([r.text for r in rs], [r.choices for r in rs])
                for row, r in zip(lp, rs):
                    cache[r.text] = np.asarray(row, dtype=np.float64)
            for u in idx:
                lp = mean_over_listings(ids[u], [(r.candidate_ids, cache[r.text]) for r in rendered[u]])
                out[u] = fuse_with_retrieval(ids[u], lp, self.cfg.retrieval_weight)
        return out

    def _rank_likelihood(self, histories, cands):
        if self.cfg.likelihood_norm not in ("mean", "sum"):
            raise ValueError(f"RankingConfig.likelihood_norm must be 'mean' or 'sum', "
                             f"got {self.cfg.likelihood_norm!r}")
        out: list[list[tuple[str, float]]] = [[] for _ in histories]
        cache = self.llm_cache if self.llm_cache is not None else {}
        todo = [u for u, c in enumerate(cands) if c]
        for b in range(0, len(todo), self.cfg.batch_size):
            idx = todo[b : b + self.cfg.batch_size]
            ids = {u: [c for c, _ in cands[u]] for u in idx}
            text = {u: self._render("next_title", histories[u]).text for u in idx}  # no candidate list
            opts = {u: self._answer_titles(ids[u]) for u in idx}
            groups: dict[int, list[int]] = {}
            for u in idx:
                if any(("likelihood", text[u], o) not in cache for o in opts[u]):
                    groups.setdefault(len(opts[u]), []).append(u)
            for us in groups.values():  # backends need equal-length continuation lists per call
                sums, counts = self.backend.score_continuations([text[u] for u in us], [opts[u] for u in us])
                for u, s_row, n_row in zip(us, sums, counts):
                    for o, s, n in zip(opts[u], s_row, n_row):
                        cache[("likelihood", text[u], o)] = (float(s), float(n))
            prior: dict[str, float] = {}
            if self.cfg.likelihood_prior_weight:  # the batch's titles in one pass over the history-free prompt
                union = list(dict.fromkeys(c for u in idx for c in ids[u]))
                prior = dict(zip(union, self.title_priors(union)))
            for u in idx:
                score = self._normalised([cache[("likelihood", text[u], o)] for o in opts[u]])
                if prior:
                    score = score - self.cfg.likelihood_prior_weight * np.array([prior[c] for c in ids[u]])
                out[u] = fuse_with_retrieval(ids[u], score, self.cfg.retrieval_weight)
        return out

    def _answer_titles(self, item_ids: Sequence[str]) -> list[str]:
        """The items' titles as answers to a `next_title` prompt: a space, then the title as prompts quote it."""
        cap = self.templates["next_title"].options.title_max_chars
        return [" " + quote(self.ds.titles[self.ds.item_index[i]], cap) for i in item_ids]

    def _normalised(self, sums_counts: list[tuple[float, float]]) -> np.ndarray:
        """Title log-probs from (sum, tokens) pairs: per token (`likelihood_norm` "mean") or the sum."""
        return np.array([s / n if self.cfg.likelihood_norm == "mean" else s for s, n in sums_counts])

    def title_priors(self, item_ids: Sequence[str], chunk: int = 32) -> np.ndarray:
        """Each item's title log-prob (normalised as `likelihood_norm` says) as the answer to the `next_title` prompt
        with no history: the model's prior for the title, which `likelihood_prior_weight` subtracts. Cached in
        `llm_cache` under the history-free prompt, so each title is scored once."""
        cache = self.llm_cache if self.llm_cache is not None else self._prior_cache
        text = self._render("next_title", [], prompt_history=[]).text
        opts = self._answer_titles(item_ids)
        todo = list(dict.fromkeys(o for o in opts if ("likelihood", text, o) not in cache))
        for b in range(0, len(todo), chunk):  # one prompt, its KV cache shared by `chunk` titles per call
            sums, counts = self.backend.score_continuations([text], [todo[b : b + chunk]])
            for o, s, n in zip(todo[b : b + chunk], sums[0], counts[0]):
                cache[("likelihood", text, o)] = (float(s), float(n))
        return self._normalised([cache[("likelihood", text, o)] for o in opts])

    def _rank_generate(self, histories, cands):
        out: list[list[tuple[str, float]]] = [[] for _ in histories]
        self.last_generate_stats = {"lines": 0, "mapped": 0, "unmapped": 0}  # this call; `generate_totals`: all calls
        todo = [u for u, c in enumerate(cands) if c]
        for b in range(0, len(todo), self.cfg.batch_size):
            idx = todo[b : b + self.cfg.batch_size]
            listed = self.cfg.generate_list_candidates or not self.cfg.generate_constrained  # free text needs the list
            rendered = [
                self._render("next_title", histories[u], **(
                    {"candidates": self._items([c for c, _ in cands[u]])} if listed else {}))
                for u in idx
            ]
            if self.cfg.generate_constrained:
                cand_ids = [[c for c, _ in cands[u]] for u in idx]
                options = [self._answer_titles(ids) for ids in cand_ids]  # titles exactly as the prompt quotes them
                picks = self.backend.generate_from([r.text for r in rendered], options, self.cfg.generate_titles)
                named_all = [[ids[j] for j in p] for ids, p in zip(cand_ids, picks)]
                n_named = sum(len(p) for p in picks)
                for key in ("lines", "mapped"):
                    self.last_generate_stats[key] += n_named
            else:
                texts = self.backend.generate(  # a title, or a list of titles one per line; a blank line ends it
                    [r.text for r in rendered], max_new_tokens=self.cfg.generate_max_new_tokens, stop=["\n\n"]
                )
                named_all = [self.map_titles(text, [c for c, _ in cands[u]]) for u, text in zip(idx, texts)]
            for u, named in zip(idx, named_all):
                cand_ids = [c for c, _ in cands[u]]
                self.generate_totals["users"] += 1
                rest = [c for c in cand_ids if c not in named]
                ranked = named + rest
                n = len(ranked)
                out[u] = [(c, float(n - r)) for r, c in enumerate(ranked)]
        for k, v in self.last_generate_stats.items():
            self.generate_totals[k] += v
        return out

    def map_titles(self, text: str, candidate_ids: list[str]) -> list[str]:
        """Generated lines -> candidate items: exact title match, else the most similar candidate title by
        embedding (>= min_title_similarity). Unmapped lines, and lines naming a catalogue item that is not a
        candidate (e.g. one from the user's history), are dropped and counted in `last_generate_stats`."""
        stats = getattr(self, "last_generate_stats", None)
        if stats is None:
            stats = self.last_generate_stats = {"lines": 0, "mapped": 0, "unmapped": 0}
        named: list[str] = []
        cand_titles = [str(self.ds.titles[self.ds.item_index[c]]) for c in candidate_ids]
        for raw in text.splitlines():
            forms = _line_forms(raw)
            if not forms:
                continue
            line = forms[-1]  # the plainest form, for the inexact matches
            stats["lines"] += 1
            iid = next((x for x in map(self.matcher.exact, forms) if x is not None), None)
            if iid is None:
                found = self.matcher.find(line)
                iid = found[0] if found else None
            if iid is not None and iid not in candidate_ids:  # the title may be a candidate's under another id
                iid = next((t for t in self.title_twins.get(iid, ()) if t in candidate_ids), iid)
            if iid is not None and iid not in candidate_ids:  # a catalogue title, but not one of the candidates
                stats["unmapped"] += 1
                continue
            if iid is None and hasattr(self.retriever, "similar_texts") and cand_titles:
                sims = self.retriever.similar_texts(line, cand_titles)
                j = int(np.argmax(sims))
                if sims[j] >= self.cfg.min_title_similarity:
                    iid = candidate_ids[j]
            if iid is None:
                stats["unmapped"] += 1
                continue
            stats["mapped"] += 1
            if iid not in named:
                named.append(iid)
        return named

    # ----------------------------------------------------------------------------------------------- explain
    def explain(self, histories: list[list[HistEvent]], recs: list[list[str]]) -> list[Explanation]:
        """Generated explanations with the post-check (`check_explanation`, attribute claims read against
        `attribute_vocabulary`); one `Explanation` per user (text None for a user with nothing recommended)."""
        todo = [u for u, r in enumerate(recs) if r]
        res: list[Explanation] = [Explanation(None, False, []) for _ in recs]  # nothing recommended: no text
        vocab = self.attribute_vocabulary()
        tmpl = self.templates["explain"]
        for b in range(0, len(todo), self.cfg.batch_size):
            idx = todo[b : b + self.cfg.batch_size]
            hist = [self._prompt_history(histories[u], self._explain_events(histories[u])) for u in idx]
            rendered = [self._render("explain", histories[u], recommended=self._items(recs[u][:3]), prompt_history=h)
                        for u, h in zip(idx, hist)]
            first = "{first_recommended}" in tmpl.answer_prefix  # the text explains the first recommended item itself
            prefer: list[set[str] | None] = [None] * len(idx)
            if self.cfg.explain_quoted_titles and self.cfg.explain_relevant_titles:
                for n, (u, h) in enumerate(zip(idx, hist)):
                    j, prefer[n] = self._explain_focus(h, rendered[n], recs[u], first)
                    if j:  # about another of the top 3: list it first, so that the answer prefix names it
                        order = [recs[u][j]] + [x for i, x in enumerate(recs[u][:3]) if i != j]
                        rendered[n] = self._render("explain", histories[u], recommended=self._items(order),
                                                   prompt_history=h)
            prompts = [r.text for r in rendered]
            if self.cfg.explain_quoted_titles:  # a quoted title can only be one the user liked, shown in the prompt
                quotable = [quotable_titles(self.templates["explain"], h, r, p)
                            for h, r, p in zip(hist, rendered, prefer)]
                texts = self.backend.generate_quoted(prompts, quotable, max_new_tokens=self.cfg.explain_max_new_tokens,
                                                     stop=["\n"], frequency_penalty=self.cfg.explain_frequency_penalty,
                                                     lead_quote=tmpl.options.lead_quote)
            else:
                texts = self.backend.generate(prompts, max_new_tokens=self.cfg.explain_max_new_tokens, stop=["\n"],
                                              frequency_penalty=self.cfg.explain_frequency_penalty)
            for u, r, text in zip(idx, rendered, texts):
                # the answer prefix after its label ("Explanation: ") is the start of the text the model continues
                text = tidy_explanation(answer_lead(r.answer_prefix), text)
                hist_ids = {e.item_id for e in histories[u]}
                liked = [e.item_id for e in histories[u] if e.liked and e.item_id in self.ds.item_index]
                attrs = {a for i in liked[-10:] for a in self._attrs(i)}
                text = drop_empty_tail(text, self.matcher, attrs | {a for i in recs[u][:3] for a in self._attrs(i)})
                # a title names every id listed under it (the matcher returns one of them)
                # a dislike: an item the user rated below the like threshold and never liked (nor its title twin)
                liked_any = self._with_twins({e.item_id for e in histories[u] if e.liked is True})
                disliked = self._with_twins({e.item_id for e in histories[u] if e.liked is False}) - liked_any
                chk = check_explanation(text, self.matcher, self._with_twins(hist_ids), self._with_twins(recs[u]),
                                        attrs, vocab, self._item_attrs, self._with_twins(recs[u][:3]),
                                        disliked_ids=disliked)
                if chk.ok:
                    res[u] = Explanation(text, False, [], chk.grounded)
                else:
                    rec3 = recs[u][:3]
                    fb = template_explanation(
                        self.ds.domain,
                        [str(self.ds.titles[self.ds.item_index[i]]) for i in rec3],
                        [self._attrs(i) for i in rec3],
                        [str(self.ds.titles[self.ds.item_index[i]]) for i in liked[-10:]],
                        [self._attrs(i) for i in liked[-10:]],
                    )
                    res[u] = Explanation(fb, True, chk.hallucinated, chk.grounded, chk.reasons(self._title_of))
        return res

    def _title_of(self, item_id: str) -> str | None:
        """The catalogue title of `item_id`; None for anything else (an invented title, which the check's reasons
        quote as written)."""
        j = self.ds.item_index.get(item_id)
        return None if j is None else str(self.ds.titles[j])

    def _item_attrs(self, item_id: str) -> list[str]:
        return self._attrs(item_id) if item_id in self.ds.item_index else []

    def attribute_vocabulary(self, max_values: int = 200) -> set[str]:
        """The attribute values an explanation's attribute claims are checked against: those of the attribute fields
        with a closed vocabulary (at most `max_values` distinct values, e.g. ML-100K's 19 genres); an open tag set
        (Last.fm's thousands of tags, "love", "seen live") is read as free words and left unchecked."""
        if max_values not in self._vocab:
            vocab: set[str] = set()
            for f in self._attr_fields:
                col = self.ds.items[f]
                vals = {a for v in col if isinstance(v, str)
                        for a in (split_values(v) if f in self._space_lists else split_list(v))}
                if len(vals) <= max_values:
                    vocab |= vals
            self._vocab[max_values] = vocab
        return self._vocab[max_values]

    # ----------------------------------------------------------------------------------------------- public
    def recommend_batch(
        self,
        user_ids: Sequence[str],
        histories: Sequence[Iterable[Any] | None] | None = None,
        k: int = 10,
        explain: bool = True,
        mode: str | None = None,
    ) -> list[Recommendation]:
        """Recommendations for several users in batched backend calls. `histories[i]` (store events, dicts or
        HistEvents) overrides the dataset history of user i; None reads the prepared dataset (all events)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if histories is not None and len(histories) != len(user_ids):
            raise ValueError(f"histories: {len(histories)} given for {len(user_ids)} users (one per user, None = the "
                             "dataset's)")
        t0 = time.perf_counter()
        hs: list[list[HistEvent]] = []
        for n, u in enumerate(user_ids):
            h = None if histories is None else histories[n]
            # an event history lists an item once per event; the prompts, the retriever and the explanation's
            # post-check read one event per item with the user's latest reaction to it
            hs.append(self.dataset_history(u) if h is None
                      else latest_per_item(to_hist_events(h, self.cfg.like_threshold)))
        cands = [self.candidates(h) for h in hs]
        ranked = [self._beyond_candidates(h, r, k) for h, r in zip(hs, self.rank_candidates(hs, cands, mode))]
        top = [[i for i, _ in r[:k]] for r in ranked]
        expl = self.explain(hs, top) if explain else [Explanation(None, False, []) for _ in top]
        dt = (time.perf_counter() - t0) / max(1, len(user_ids))
        out = []
        for u, h, r, t, (text, fb, hall, grounded, why) in zip(user_ids, hs, ranked, top, expl):
            items = [
                RecItem(i, str(self.ds.titles[self.ds.item_index[i]]), s, n + 1) for n, (i, s) in enumerate(r[:k])
            ]
            out.append(
                Recommendation(
                    str(u),
                    items,
                    text,
                    fb,
                    hall,
                    self.model_name,
                    self.adapter,
                    getattr(self.backend, "name", ""),
                    {"seconds_per_user": dt},
                    self.explanation_evidence(h, text, t) if explain else [],
                    grounded,
                    list(why),
                )
            )
        return out

    def _beyond_candidates(self, history: list[HistEvent], ranked: list[tuple[str, float]],
                           k: int) -> list[tuple[str, float]]:
        """`ranked` (the LLM-ordered candidates) continued up to `k` items by the retriever's order over the other
        unseen items (the full ranking `score_matrix` evaluates), each scored below every candidate (min candidate
        score - 1, - 2, ...: a retrieval score is not on the LLM's scale, and a client sorting by score keeps the
        order)."""
        if len(ranked) >= k:
            return ranked
        taken = {i for i, _ in ranked}
        more = [i for i, _ in self.candidates(history, k=k + len(taken)) if i not in taken][: k - len(ranked)]
        floor = min((s for _, s in ranked), default=0.0)
        return list(ranked) + [(i, floor - 1.0 - j) for j, i in enumerate(more)]

    def recommend(
        self,
        user_id: str,
        k: int = 10,
        explain: bool = True,
        history: Iterable[Any] | None = None,
        mode: str | None = None,
    ) -> Recommendation:
        return self.recommend_batch([user_id], None if history is None else [history], k, explain, mode)[0]

    @property
    def yesno_uses_stats(self) -> bool:
        return self.templates["yesno"].needs_feedback

    def yesno_probs(
        self,
        histories: list[list[HistEvent]],
        targets: list[str],
        desc: str = "yes/no",
        feedback: list[Any] | None = None,
    ) -> np.ndarray:
        """P(Yes) for each (history, target) pair, batched. `feedback`: the targets' `ItemFeedback` for a template
        with `{target_stats}` (default: every interaction in the dataset, i.e. as of now)."""
        if feedback is None and self.yesno_uses_stats:
            from llmrec.data.stats import ItemFeedbackStats

            stats = ItemFeedbackStats.from_dataset(self.ds)
            feedback = [stats.at(t) for t in targets]
        probs = np.zeros(len(targets))
        for b in tqdm(
            range(0, len(targets), self.cfg.batch_size),
            desc=desc,
            leave=False,
            disable=len(targets) <= self.cfg.batch_size,
        ):
            texts = [
                self._render("yesno", histories[j], target=self._items([targets[j]])[0],
                             target_stats=None if feedback is None else feedback[j]).text
                for j in range(b, min(b + self.cfg.batch_size, len(targets)))
            ]
            lp = self.backend.score_choices(texts, list(self.templates["yesno"].verbalizer.choices))
            probs[b : b + len(texts)] = np.exp(lp[:, 0])
        return probs

    def score_yesno(self, user_id: str, item_ids: Sequence[str], history: Iterable[Any] | None = None) -> list[float]:
        h = (self.dataset_history(user_id) if history is None
             else latest_per_item(to_hist_events(history, self.cfg.like_threshold)))
        unknown = [i for i in item_ids if i not in self.ds.item_index]
        if unknown:
            raise KeyError(f"unknown item id(s) {unknown[:5]}")
        return self.yesno_probs([h] * len(item_ids), list(item_ids)).tolist()

    def yesno_examples_probs(self, examples) -> np.ndarray:
        """P(Yes) for rows of `ds.yesno` (each row carries its own <=10-event history; with a `{target_stats}`
        template, the target's feedback as of the row's split cut-off, llmrec.data.stats.feature_time)."""
        hs = [
            [
                HistEvent(i, bool(lab), None if r != r else float(r), int(t))
                for i, lab, r, t in zip(row.hist_items, row.hist_labels, row.hist_ratings, row.hist_timestamps)
            ]
            for row in examples.itertuples()
        ]
        feedback = None
        if self.yesno_uses_stats:
            from llmrec.data.stats import yesno_row_feedback

            feedback = yesno_row_feedback(self.ds, examples)
        return self.yesno_probs(hs, examples["item_id"].tolist(), feedback=feedback)

    def score_matrix(self, user_ids: Sequence[str], split: str = "test", mode: str | None = None) -> np.ndarray:
        """Full-ranking scores for evaluation: LLM-ordered candidates on top, every other item by retrieval score.
        Only the history allowed for `split` is used (test: train+valid events). Candidates exclude seen items by id
        only, whatever `cfg.exclude_seen_titles` says: the protocol every baseline is scored by."""
        hs = [self.dataset_history(u, split) for u in user_ids]
        cands = [self.candidates(h, exclude_seen_titles=False) for h in hs]
        ranked = self.rank_candidates(hs, cands, mode)
        base = np.asarray(self.retriever.score_items(list(user_ids), split), dtype=np.float64)
        base = base - np.nanmax(base) - 1.0 if base.size else base  # every non-candidate below every candidate
        for u, r in enumerate(ranked):
            n = len(r)
            for pos, (iid, _) in enumerate(r):
                base[u, self.ds.item_index[iid]] = 1.0 + (n - pos)
        return base
