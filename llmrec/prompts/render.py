"""Rendering a template for one user: quoted item text, optional time context, a token budget that drops the
oldest history first (never the candidates, the target or the question), plain-completion and chat forms."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from llmrec.prompts.templates import PromptTemplate, load_template
from llmrec.prompts.text import ago, clean, plural, quote
from llmrec.prompts.tokens import count_tokens

log = logging.getLogger(__name__)


class PromptBudgetError(ValueError):
    """The prompt does not fit the token budget even with no history at all."""


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HistoryItem:
    item: Item
    liked: bool | None
    rating: float | None = None
    timestamp: int | None = None


@dataclass
class RenderedPrompt:
    text: str
    n_tokens: int | None  # with the tokenizer given (None without one)
    choices: list[str]  # verbalizer strings whose FIRST token is scored
    n_history: int  # history items kept after the budget
    candidate_ids: list[str]  # in label order (rank), or the candidates as given
    n_dropped: int = 0  # oldest history items left out: by `options.max_history`, then to fit the budget
    template: str = ""
    version: int = 0
    answer_prefix: str = ""  # the template's answer prefix as filled (the text ends with it)


# ------------------------------------------------------------------------------------------------ dataset helpers
def _item_row(ds: Any, item_id: str) -> Item:
    j = ds.item_index.get(str(item_id))
    if j is None:
        raise KeyError(f"item {item_id!r} is not in dataset {getattr(ds, 'name', '?')}")
    row = ds.items.iloc[j]
    fields = {f: ("" if row.get(f) is None else str(row.get(f))) for f in getattr(ds, "text_fields", [])}
    return Item(str(item_id), str(row["title"]), fields)


def items_from_dataset(ds: Any, item_ids: list[str]) -> list[Item]:
    """`Item`s (title + the dataset's text fields) for catalogue ids; an unknown id raises KeyError naming it."""
    return [_item_row(ds, i) for i in item_ids]


def history_from_dataset(
    ds: Any,
    item_ids: list[str],
    labels: list[int | bool | None] | None = None,
    ratings: list[float | None] | None = None,
    timestamps: list[int | None] | None = None,
) -> list[HistoryItem]:
    """`HistoryItem`s, oldest first. `labels` 1/0/None (like/dislike/unknown); NaN ratings become None. Items that
    are not in the catalogue (e.g. new items from an event store) are skipped: they have no text to show."""
    n = len(item_ids)
    for name, seq in (("labels", labels), ("ratings", ratings), ("timestamps", timestamps)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"history_from_dataset: {name} has {len(seq)} entries for {n} items")
    out, skipped = [], 0
    for k, iid in enumerate(item_ids):
        if str(iid) not in ds.item_index:
            skipped += 1
            continue
        lab = None if labels is None else labels[k]
        liked = None if lab is None or (isinstance(lab, float) and lab != lab) else bool(lab)
        r = None if ratings is None else ratings[k]
        r = None if r is None or (isinstance(r, float) and r != r) else float(r)
        ts = None if timestamps is None or timestamps[k] is None else int(timestamps[k])
        out.append(HistoryItem(_item_row(ds, str(iid)), liked, r, ts))
    if skipped:
        log.debug("history_from_dataset: skipped %d items not in the catalogue", skipped)
    return out


# ------------------------------------------------------------------------------------------------ rendering
def item_text(item: Item, t: PromptTemplate, candidate: bool = False) -> str:
    """`"Title" (genres: "Action Comedy")`: every piece quoted and capped; fields already in the title are left out.
    `candidate=True` uses the template's `candidate_fields` (when set) instead of `item_fields`."""
    o = t.options
    title = clean(item.title, o.title_max_chars)
    chosen = o.candidate_fields if candidate and o.candidate_fields is not None else o.item_fields
    names = list(item.fields) if chosen is None else list(chosen)
    parts = []
    for f in names:
        v = clean(item.fields.get(f, ""), o.field_max_chars)
        if v and v.lower() not in title.lower():
            parts.append(f"{clean(f, 30)}: {quote(v, o.field_max_chars)}")
    q = quote(title, o.title_max_chars)
    return f"{q} ({'; '.join(parts)})" if parts else q


def _details(h: HistoryItem, t: PromptTemplate, now: int | None) -> str:
    o = t.options
    parts = []
    if o.mark_likes and h.liked is not None:
        parts.append("liked" if h.liked else "disliked")
    if o.time_context:
        if h.rating is not None:
            r = f"{h.rating:g}"
            parts.append(f"rated {r}/{o.rating_scale:g}" if o.rating_scale else f"rated {r}")
        if now is not None and h.timestamp is not None:
            parts.append(ago(now - h.timestamp))
    return f" ({'; '.join(parts)})" if parts else ""


def _feedback_counts(feedback: Any) -> tuple[int, int]:
    """(n, liked) of an `ItemFeedback` or an (n, liked) pair."""
    return (feedback.n, feedback.liked) if hasattr(feedback, "n") else (int(feedback[0]), int(feedback[1]))


def target_stats_text(feedback: Any, domain: str) -> str:
    """`Other users so far: 61% of 148 ratings were likes (liked by most).` from an object with `n` and `liked`
    (llmrec.data.stats.ItemFeedback) or an (n, liked) pair; empty when there is none. The words after the figure
    (loved by most / liked by most / divisive / disliked by most) say the same thing without arithmetic."""
    if feedback is None:
        return ""
    n, liked = _feedback_counts(feedback)
    if n <= 0:
        return f"Other users so far: no ratings of this {domain} yet."
    rate = liked / n
    word = ("loved by most" if rate >= 0.75 else "liked by most" if rate >= 0.55
            else "divisive" if rate >= 0.35 else "disliked by most")
    return f"Other users so far: {round(100 * rate)}% of {n} ratings were likes ({word})."


def user_stats_text(hist: list[HistoryItem], domains: str) -> str:
    """`The user liked 7 of their last 10 rated movies (easy to please).` over every history item given (before the
    `max_history` cap and the token budget) with a known reaction; empty when there is none."""
    known = [h.liked for h in hist if h.liked is not None]
    if not known:
        return ""
    rate = sum(known) / len(known)
    word = "easy to please" if rate >= 0.7 else "selective" if rate >= 0.4 else "hard to please"
    return f"The user liked {sum(known)} of their last {len(known)} rated {domains} ({word})."


def estimate_text(feedback: Any, hist: list[HistoryItem]) -> str:
    """`Estimate from these two counts alone: 72% (likely).` - the no-fitting combination of the target's earlier
    like rate and the user's (llmrec.data.stats.counts_estimate, the bench's "counts only" row) as one figure, so a
    small model need not do the arithmetic; empty without the target's feedback."""
    if feedback is None:
        return ""
    from llmrec.data.stats import counts_estimate

    n, liked = _feedback_counts(feedback)
    known = [h.liked for h in hist if h.liked is not None]
    p = counts_estimate(n, liked, len(known), sum(known))
    word = ("very likely" if p >= 0.75 else "likely" if p >= 0.55 else "a toss-up" if p >= 0.45
            else "unlikely" if p >= 0.25 else "very unlikely")
    return f"Estimate from these two counts alone: {round(100 * p)}% ({word})."


def _labels(t: PromptTemplate, n: int) -> list[str]:
    labels = t.verbalizer.labels if t.verbalizer and t.verbalizer.labels else ""
    if n > len(labels):
        raise ValueError(f"template {t.name!r} has {len(labels)} labels ({labels!r}) but got {n} candidates")
    return list(labels[:n])


_BRACKETS = set("<>[]|｜{}")


def _markup_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's added tokens that look like markup (`[INST]`, `<｜User｜>`, `<think>`, ...), longest first. HF
    tokenizers match added tokens in plain text, so item text holding one would become that control token; `clean`
    breaks up the `<|...|>` and `<tag>` forms, not every model's (Mistral's `[INST]`, DeepSeek's full-width bars)."""
    if tokenizer is None:
        return []
    found = {str(x) for x in (getattr(tokenizer, "all_special_tokens", None) or [])}
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(added, dict):
        found |= {str(getattr(a, "content", a)) for a in added.values()}
    # bracketed tokens only: an added "..." or "--" is not markup, and a title's "..." must render as it always did
    marks = [m for m in found if len(m.strip()) >= 2 and any(c in _BRACKETS for c in m)]
    return sorted(marks, key=len, reverse=True)


def _break_markup(text: str, marks: list[str]) -> str:
    """`text` with every occurrence of `marks` broken by a space after its first character (`[ INST]`)."""
    for _ in range(4):  # a break is not expected to form another mark; bounded all the same
        hits = [m for m in marks if m in text]
        if not hits:
            break
        for m in hits:
            text = text.replace(m, m[0] + " " + m[1:])
    return text


def _chat(tokenizer: Any, t: PromptTemplate, body: str) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"template {t.name!r}: chat=True needs a tokenizer with a chat template")
    msgs = ([{"role": "system", "content": t.system}] if t.system else []) + [{"role": "user", "content": body}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def render(
    template: PromptTemplate | str,
    *,
    history: list[HistoryItem],
    domain: str,
    target: Item | None = None,
    candidates: list[Item] | None = None,
    recommended: list[Item] | None = None,
    tokenizer: Any = None,
    max_tokens: int | None = None,
    chat: bool = False,
    now: int | None = None,
    target_stats: Any = None,
) -> RenderedPrompt:
    """Fill `template` for one user. The prompt ends with the template's `answer_prefix` (plain form: its own last
    line; chat form: the start of the assistant turn), so the next token is the answer and `choices` can be scored.

    Budget: with `max_tokens`, the oldest history items are dropped until the whole prompt (chat markup included)
    fits; the target, candidates, recommended items and the question are never dropped - if they alone exceed the
    budget, `PromptBudgetError` is raised. Without a tokenizer the budget uses a conservative estimate of one token
    per 3 characters and `n_tokens` is None.

    `target_stats` (an `ItemFeedback` or an (n, liked) pair, computed by the caller from data before the target's
    time) fills `{target_stats}` and, with the user's reactions, `{estimate}`; `{user_stats}` counts the likes among
    all the history items given (the most recent `options.max_history` of them are listed). `now` (epoch seconds)
    is what `time_context` templates count "ago" from; by default the given history's most recent event."""
    t = load_template(template) if isinstance(template, str) else template
    o = t.options
    if t.task == "yesno" and target is None:
        raise ValueError(f"template {t.name!r} (yesno) needs a target item")
    if t.task == "rank" and not candidates:
        raise ValueError(f"template {t.name!r} (rank) needs candidates")
    if t.task == "explain" and not recommended:
        raise ValueError(f"template {t.name!r} (explain) needs recommended items")
    hist = list(history)
    if now is None and o.time_context:
        # "3 weeks ago" counts back from the user's most recent event: the same for fine-tuning examples and for the
        # Recommender (which knows no target time), and never from a time the prompt's history does not contain
        now = max((h.timestamp for h in hist if h.timestamp is not None), default=None)
    dom = clean(domain, 40) or "item"
    user_stats = user_stats_text(hist, plural(dom))  # over every given item, before the cap and the budget
    if o.max_history is not None and len(hist) > o.max_history:
        hist = hist[len(hist) - o.max_history :]
    cands = list(candidates or [])
    marks = _markup_tokens(tokenizer)

    def shown(item: Item, candidate: bool = False) -> str:  # item text, with the tokenizer's own markup broken up
        return _break_markup(item_text(item, t, candidate), marks)

    labels = _labels(t, len(cands)) if t.task == "rank" or (t.verbalizer and t.verbalizer.labels and cands) else []
    if labels:
        cand_lines = [o.candidate_line.format(label=lab, item=shown(c, True)) for lab, c in zip(labels, cands)]
        fmt = t.verbalizer.label_format if t.verbalizer else " {label}"
        choices = [fmt.format(label=lab) for lab in labels]
    else:
        cand_lines = [o.candidate_line.format(label=str(n + 1), item=shown(c, True)) for n, c in enumerate(cands)]
        choices = list(t.verbalizer.choices) if t.verbalizer and t.verbalizer.choices else []
    rec_lines = [o.recommended_line.format(item=shown(r, True)) for r in recommended or []]
    hist_lines = [o.history_line.format(item=shown(h.item), details=_details(h, t, now)) for h in hist]
    fixed = {
        "domain": dom, "domains": plural(dom), "Domain": dom[:1].upper() + dom[1:],
        "Domains": plural(dom)[:1].upper() + plural(dom)[1:],
        "target": shown(target) if target is not None else "",
        "candidates": "\n".join(cand_lines), "recommended": "\n".join(rec_lines),
        "n_candidates": str(len(cands)), "first_label": labels[0] if labels else "",
        "last_label": labels[-1] if labels else "",
        "target_stats": target_stats_text(target_stats, dom),
        "estimate": estimate_text(target_stats, list(history)),  # over every given item, as user_stats
        "first_recommended": _break_markup(quote(recommended[0].title, o.title_max_chars), marks) if recommended
        else "",
    }

    def values_for(n_keep: int) -> tuple[dict[str, str], list[str], list[str]]:
        keep = range(len(hist) - n_keep, len(hist))
        liked = [hist_lines[i] for i in keep if hist[i].liked is not False]  # unknown reaction counts as liked
        disliked = [hist_lines[i] for i in keep if hist[i].liked is False]
        values = dict(fixed, n_history=str(n_keep), history="\n".join(hist_lines[i] for i in keep) or o.empty,
                      liked="\n".join(liked) or o.empty, disliked="\n".join(disliked) or o.empty,
                      user_stats=user_stats)
        return values, liked, disliked

    def compose(n_keep: int) -> str:
        values, liked, disliked = values_for(n_keep)
        prefix = t.answer_prefix.format_map(values)  # may use any placeholder of the text (README)
        present = {"candidates": bool(cands), "target": target is not None, "recommended": bool(rec_lines),
                   "history": n_keep > 0, "liked": bool(liked), "disliked": bool(disliked),
                   "target_stats": bool(fixed["target_stats"]), "user_stats": bool(values["user_stats"]),
                   "estimate": bool(fixed["estimate"])}
        lines = []
        for line in t.text.splitlines():
            if line.startswith("{?"):
                end = line.index("}")
                if not present[line[2:end]]:
                    continue
                line = line[end + 1 :]
            lines.append(line.format_map(values))
        body = "\n".join(lines).strip("\n")
        if chat:
            return _chat(tokenizer, t, body) + prefix
        return body + ("\n" + prefix if prefix else "")

    def n_tok(text: str) -> int:
        return count_tokens(tokenizer, text) if tokenizer is not None else math.ceil(len(text) / 3)

    n_keep = len(hist)
    text = compose(n_keep)
    if max_tokens is not None and n_tok(text) > max_tokens:
        if n_tok(compose(0)) > max_tokens:
            raise PromptBudgetError(
                f"template {t.name!r}: {n_tok(compose(0))} tokens without any history exceed max_tokens={max_tokens}"
                f" (the target/candidates/question are never dropped; raise the budget or use fewer candidates)"
            )
        lo, hi = 0, n_keep  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if n_tok(compose(mid)) <= max_tokens:
                lo = mid
            else:
                hi = mid
        n_keep = lo
        text = compose(n_keep)
    prefix = t.answer_prefix.format_map(values_for(n_keep)[0])
    return RenderedPrompt(
        text=text,
        n_tokens=count_tokens(tokenizer, text) if tokenizer is not None else None,
        choices=choices,
        n_history=n_keep,
        candidate_ids=[c.item_id for c in cands],
        n_dropped=len(history) - n_keep,
        template=t.name,
        version=t.version,
        answer_prefix=prefix,
    )


def liked_shown(history: list[HistoryItem], rendered: RenderedPrompt) -> list[HistoryItem]:
    """The items the user liked (or gave no reaction to) among the history items `rendered` (a render of `history`)
    lists."""
    shown = history[-rendered.n_history:] if rendered.n_history else []
    return [h for h in shown if h.liked is not False]


def quotable_titles(t: PromptTemplate, history: list[HistoryItem], rendered: RenderedPrompt,
                    prefer: set[str] | None = None) -> list[str]:
    """The titles an explanation may quote: `liked_shown(history, rendered)` (`rendered` a render of `history` with
    `t`), each as quoted there (without the outer quotes). With `prefer` (item ids), only those of them, unless none
    of them is among the listed liked items."""
    liked = liked_shown(history, rendered)
    if prefer:
        liked = [h for h in liked if h.item.item_id in prefer] or liked
    cap = t.options.title_max_chars
    return list(dict.fromkeys(quote(h.item.title, cap)[1:-1] for h in liked))
