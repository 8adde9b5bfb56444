"""Explanation post-check: which catalogue titles does a generated text name, is it grounded in the user's history,
and the template fallback built from shared attributes when the check fails."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from llmrec.prompts.text import TITLE_MAX_CHARS, quote

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_ARTICLE = re.compile(r"^(.*), (The|A|An|Les|La|Le|Il|Das|Der|Die)$")


def title_variants(title: str) -> set[str]:
    """Lower-case forms a text may use for a title: as is, without the year, with a trailing article moved to front
    ("Matrix, The (1999)" -> "the matrix")."""
    t = title.strip()
    out = {t.lower()}
    base = _YEAR.sub("", t)
    out.add(base.lower())
    m = _ARTICLE.match(base)
    if m:
        out.add(f"{m.group(2)} {m.group(1)}".lower())
        out.add(m.group(1).lower())
    return {v for v in out if len(v) >= 4}


class TitleMatcher:
    """Finds catalogue titles named in a text (word-bounded, case-insensitive, longest match first). A title also
    reads in the form prompts quote it (`llmrec.prompts.quote` with `max_chars`: a long title capped with an
    ellipsis), the form the model copies from a prompt."""

    def __init__(self, item_ids: list[str], titles: list[str], max_chars: int = TITLE_MAX_CHARS):
        self.by_variant: dict[str, str] = {}
        self._lowercase_titles: set[str] = set()  # ids whose catalogue title has no capital letter ("e.e.")
        for iid, t in zip(item_ids, titles):
            if str(t) == str(t).lower():
                self._lowercase_titles.add(iid)
            for v in title_variants(str(t)) | {quote(t, max_chars)[1:-1].lower()}:
                if len(v) >= 4:
                    self.by_variant.setdefault(v, iid)
                    if '"' in v:  # `"Weird Al" Yankovic`: also read with single quotes (see `unquote_titles`)
                        self.by_variant.setdefault(_single_quoted(v), iid)
        # titles under 4 characters (Last.fm: "U2", "Sia", "Air", "HIM"): no variant above, as such a form reads as a
        # word in free text; a whole quoted span written as one is the title (`find`, `exact`)
        self._short: dict[str, str] = {}
        for iid, t in zip(item_ids, titles):
            if 0 < len(str(t).strip()) < 4:
                self._short.setdefault(str(t).strip().lower(), iid)
        # the ids a year-less / article-moved form stands for ("Sabrina": the 1954 film and the 1995 remake), per id
        ids_of: dict[str, set[str]] = {}
        for iid, t in zip(item_ids, titles):
            for v in title_variants(str(t)):
                ids_of.setdefault(v, set()).add(iid)
        self._alternatives: dict[str, set[str]] = {}
        for ids in ids_of.values():
            if len(ids) > 1:
                for iid in ids:
                    self._alternatives.setdefault(iid, set()).update(ids)
        self._dated = {_YEAR.sub("", v).strip() for v in self.by_variant if _YEAR.search(v)}  # forms with a year
        variants = sorted(self.by_variant, key=len, reverse=True)
        self._re = (
            re.compile(r"(?<!\w)(" + "|".join(re.escape(v) for v in variants) + r")(?!\w)") if variants else None
        )
        quoting = [v for v in variants if '"' in v]
        self._quoting_re = (
            re.compile(r"(?<!\w)(" + "|".join(re.escape(v) for v in quoting) + r")(?!\w)", re.IGNORECASE)
            if quoting else None
        )

    def unquote_titles(self, text: str) -> str:
        """`text` with the double quotes inside catalogue titles (`"Weird Al" Yankovic`, as written or as prompts
        quote it, `\\"Weird Al\\" Yankovic`) turned to single quotes, so that a title's own quotes do not read as
        the edges of a quoted span."""
        return self._quoting_re.sub(lambda m: _single_quoted(m.group(1)), text) if self._quoting_re else text

    def find(self, text: str, strict: bool = False) -> list[str]:
        """Item ids named in `text`, in order of first mention, without repeats. `strict` (reading free text such
        as an explanation, not a line meant to be a title): a match written all in lower case and without a digit
        ("a boy and his mother", "the game") is a word, not a title, unless the catalogue title itself has no
        capital letter; "Mother", "Heat (1995)", "heat (1995)" are titles. Many titles are common words (ML-100K:
        Mother, Heat, Kids, Women, Game, Trust, Fresh, Safe, ...). A title under 4 characters ("U2") is read only
        as a whole quoted span ('"U2"')."""
        hits = self.short_quoted(text)  # (position in `text`, id)
        if not self._re:
            return list(dict.fromkeys(i for _, i in sorted(hits, key=lambda h: h[0])))
        low = text.lower()
        back: list[int] | None = None  # position in `text` of each character of `low`, where they differ
        if len(low) != len(text):  # a letter lower-cases to several ("İ" -> "i̇"): lower-case letter by letter
            low = "".join(c.lower() for c in text)
            back = [i for i, c in enumerate(text) for _ in c.lower()]
        for m in self._re.finditer(low):
            iid = self.by_variant[m.group(1)]
            a, b = m.span(1)
            if strict and iid not in self._lowercase_titles:
                written = text[a:b] if back is None else text[back[a]:back[b - 1] + 1]
                if written == written.lower() and not any(c.isdigit() for c in written):
                    continue
            hits.append((a if back is None else back[a], iid))
        return list(dict.fromkeys(i for _, i in sorted(hits, key=lambda h: h[0])))

    def short_quoted(self, text: str) -> list[tuple[int, str]]:
        """(position, id) of each quoted span of `text` that is a whole title under 4 characters ('"U2"'), repeats
        included."""
        if not self._short:
            return []
        out = []
        for m in _SPANS.finditer(text):
            q = m.group(1).strip().lower()
            if len(q) < 4 and (iid := self._short.get(q)):
                out.append((m.start(), iid))
        return out

    def blank_short_titles(self, text: str) -> str:
        """`text` with each quoted title under 4 characters ('"U2"') blanked out (same length), so that the text
        between two of them ('" and "') does not read as a quoted span."""
        if not self._short:
            return text
        return _SPANS.sub(lambda m: " " * len(m.group(0)) if len(m.group(1).strip()) < 4
                          and m.group(1).strip().lower() in self._short else m.group(0), text)

    def exact(self, text: str) -> str | None:
        """The item whose title variant equals `text` (stripped, case-insensitive, quotes removed, then a sentence's
        final punctuation too), if any. A year is part of the title: "Toy Story (2010)" is no catalogue title when
        the catalogue has "Toy Story (1995)" only (a year-less text matches the year-less form)."""
        plain = text.strip().strip("\"'“”").strip().lower()
        for key in (text.strip().lower(), plain, plain.rstrip(".,;:!?").strip()):
            if found := self.by_variant.get(key) or self._short.get(key):
                return found
            if _YEAR.search(key) is None:
                continue
            # a year the catalogue form lacks (an artist written "Foo (2010)"): the year-less form, when that is a
            # title no catalogue item writes with a year
            base = _YEAR.sub("", key).strip()
            if (found := self.by_variant.get(base)) and base not in self._dated:
                return found
        return None

    def alternatives(self, item_id: str) -> set[str]:
        """The ids whose titles share a year-less form with `item_id`'s ("Sabrina (1954)", "Sabrina (1995)"): a text
        naming "Sabrina" may mean any of them."""
        return {item_id} | self._alternatives.get(item_id, set())


def _single_quoted(s: str) -> str:
    return s.replace('\\"', "'").replace('"', "'")


# a claim about the user's past: the verb, then what it governs up to the next claim, a sentence end or a clause
# that turns to the recommendation ("..., so", "..., they will", " because ", " but ")
_PAST = r"\b(?:liked|enjoyed|loved|watched|rated|listened to|bought|purchased|played)\b"
_CLAIM = re.compile(
    _PAST + r"(.*?)(?=" + _PAST + r"|[.;!?](?:\s|$)|"
    r",\s*(?:so|they|you|which|this|these|it|we|he|she|then|try|consider)\b|\s(?:so|because|but|therefore)\s|$)",
    re.IGNORECASE,
)
# a quote mark that opens or closes a quoted span: prompts write a title's own quotes escaped (`"Royce da 5'9\\""`)
_QUOTE = re.compile(r'(?<!\\)"')
_QUOTED_SPAN = re.compile(r'(?<!\\)"((?:[^"\\]|\\.)+)"')
_DANGLING = re.compile(r'(?<!\\)"\s*(?:,|;|and\b)[^"]*$')  # an unfinished clause after the last quoted title
_QUOTED = re.compile(r'["“]([^"”]{4,120})["”]')
# quoted spans, paired from the left (a title's own quotes escaped, as prompts write them)
_SPANS = re.compile(r'(?<!\\)["“]((?:[^"“”\\]|\\.)+)["”]')
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“])")
# words that end with a full stop without ending a sentence ("Mrs. Doubtfire", "Dr. Strangelove", "St. Elmo's Fire")
_ABBREVIATION = re.compile(r"(?:^|\s|\")(?:Mr|Mrs|Ms|Dr|St|Mt|Jr|Sr|Prof|Gen|Lt|Col|Sgt|Capt|Rev|vs|No|Vol|Pt|Ft)\.$")


def split_sentences(text: str) -> list[str]:
    """`text` cut into sentences at a '.', '!' or '?' followed by a space and a capital or a quote, except inside a
    quoted span (a title such as "L.A. Confidential" or "Mrs. Doubtfire") and after a common abbreviation."""
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        head = text[start : m.start()]
        if len(_QUOTE.findall(text[: m.start()])) % 2 or _ABBREVIATION.search(head):
            continue
        out.append(head)
        start = m.end()
    out.append(text[start:])
    return out


def _cut_at_repeated_quote(text: str) -> str:
    """A quoted span written a second time (a small model looping; vLLM's regex constraint cannot forbid it, the
    transformers trie does) ends the text: cut at the last clause break (" and ", ",", ";") between the previous
    quote and the repeat, and end the sentence there."""
    seen: set[str] = set()
    prev_end = 0
    for m in _QUOTED_SPAN.finditer(text):
        q = m.group(1).strip().lower()
        if q in seen:
            head = text[: m.start()]
            cut = max(head.rfind(" and ", prev_end), head.rfind(",", prev_end), head.rfind(";", prev_end))
            head = head[: cut if cut >= prev_end else prev_end].rstrip(" ,;:-")
            return head if head.endswith((".", "!", "?")) else head + "."
        seen.add(q)
        prev_end = m.end()
    return text


def _cut_at_loop(text: str, max_n: int = 8, repeats: int = 3) -> str:
    """A word sequence of 1-`max_n` words repeated (>= `repeats` times in a row) up to the end of the text ("... liked
    the genre of the genre of the genre of the": a small model looping until the token limit, typically when the quote
    constraint leaves it nothing to quote) ends the text after its first occurrence; the caller then trims the clause
    left dangling. A repetition the text recovers from ("very very very good") is left alone."""
    words = list(re.finditer(r"\S+", text))
    low = [w.group().lower() for w in words]
    for i in range(len(low)):
        for n in range(1, max_n + 1):
            if i + repeats * n > len(low):
                break
            unit = low[i : i + n]
            if any(low[i + r * n : i + (r + 1) * n] != unit for r in range(1, repeats)):
                continue
            j = i + repeats * n
            while low[j : j + n] == unit:
                j += n
            if low[j:] == unit[: len(low) - j]:  # only a partial repeat follows: the loop ran to the end
                return text[: words[i + n - 1].end()].rstrip(" ,;:-")
    return text


def _last_quote(text: str) -> int:
    return max((m.start() for m in _QUOTE.finditer(text)), default=-1)


_LABEL = re.compile(r"\s*[A-Za-z][A-Za-z ]{0,39}:(?:\s+|$)")


def answer_lead(prefix: str) -> str:
    """The part of an explain template's answer prefix the model continues, without the prefix's label: "Explanation:
    "Heat (1995)" suits this user because they liked" -> ""Heat (1995)" suits this user because they liked". A prefix
    with no label ("Because the user liked") is the lead itself; a title's own colon ("Star Wars: Episode IV") is no
    label (the lead used to be cut there, or dropped whole when the prefix had no colon)."""
    m = _LABEL.match(prefix)
    return (prefix[m.end():] if m else prefix).strip()


def tidy_explanation(lead: str, text: str, max_sentences: int = 2, max_words: int = 60) -> str:
    """The generated continuation as shown to a user: `lead` (the part of the answer prefix the model continues,
    e.g. "Because the user liked") + the text up to the first line break, at most `max_sentences` sentences and
    `max_words` words (an unfinished last sentence is cut off when a finished one exists; so is a quote left open, by
    the token limit or by the word cap, the text from a quoted title written a second time, and a phrase repeated in a
    loop)."""
    body = text.split("\n", 1)[0].strip() if text.strip() else ""
    if len(_QUOTE.findall(body)) % 2:  # a quoted title cut off by the token limit: drop the unfinished quote
        body = body[: _last_quote(body)].rstrip(" ,;:-")
    if not body:
        return ""
    full = _cut_at_repeated_quote(_cut_at_loop(f"{lead} {body}".strip()))
    sentences = split_sentences(full)
    out = " ".join(sentences[:max_sentences])
    words = out.split()
    if len(words) > max_words:
        out = " ".join(words[:max_words])
        if len(_QUOTE.findall(out)) % 2:  # the cut fell inside a quoted title: drop the part of it left
            out = out[: _last_quote(out)].rstrip(" ,;:-")
        out += " ..."
    elif len(sentences) > 1 and out[-1] not in ".!?" and len(sentences[0]) >= 20:
        out = sentences[0]
    elif out[-1] not in '.!?"' and _DANGLING.search(out):  # cut off mid-list: '... "Heat (1995)" and liked the'
        out = out[: _last_quote(out) + 1] + "."
    if _last_quote(out) == len(out) - 1 and len(_QUOTE.findall(out)) % 2 == 0:  # stopped right after a title
        out += "."
    return out


_REACTION_MARK = re.compile(r'"\s*\((?:liked|disliked|loved|hated)\)', re.IGNORECASE)


def drop_empty_tail(text: str, matcher: TitleMatcher, attributes: set[str]) -> str:
    """Cut what follows the last quoted title when it names no catalogue title and no attribute value (genre, tag):
    the 135M model often closes with filler ('... and liked "Apollo 13 (1995)" and liked the movie title.', '...
    because they liked both movies.'), which says nothing about the user and nothing a check can verify. The sentence
    then ends at the title. Only applies after a second quoted span (the first is the recommended title the answer
    prefix opens with), and a reaction mark copied from the prompt's history lines after a title (`"Heat (1995)"
    (disliked)`, false for the titles the quote constraint allows) is removed first."""
    text = _REACTION_MARK.sub('"', text)
    # the quote marks that open or close a span: not a title's own quotes, escaped as prompts write them ("Royce da
    # 5'9\\"": one span, two marks; counting its inner quote made the count odd and kept the filler)
    quotes = [m.start() for m in _QUOTE.finditer(text)]
    if len(quotes) < 4 or len(quotes) % 2:
        return text
    end = quotes[-1] + 1
    tail = text[end:]
    if not tail.strip(" .,;:!?") or matcher.find(tail):
        return text
    if mentions_attribute(tail, attributes):
        return text
    return text[:end] + "."


def _attribute_re(value: str) -> re.Pattern[str] | None:
    """A whole-word, case-insensitive pattern for an attribute value, singular or plural ("drama" / "dramas",
    "comedy" / "comedies"); None below 3 characters."""
    a = value.lower()
    if len(a) < 3:
        return None
    stem = re.escape(a[:-1]) + r"(?:y|ies)" if a.endswith("y") else re.escape(a) + r"(?:s|es)?"
    return re.compile(r"(?<!\w)" + stem + r"(?!\w)")


def mentions_attribute(text: str, attributes: set[str]) -> bool:
    """Whether `text` names one of the attribute values (3+ characters, whole words, case-insensitive), singular or
    plural ("drama" / "dramas", "comedy" / "comedies")."""
    low = text.lower()
    return any(r.search(low) for a in attributes if (r := _attribute_re(a)))


def attribute_mentions(text: str, values: Iterable[str]) -> list[tuple[str, int]]:
    """(value lower-cased, position) for each mention in `text` of one of `values` (as `mentions_attribute` reads
    them), in text order."""
    low = text.lower()
    out = [(a.lower(), m.start()) for a in set(values) if (r := _attribute_re(a)) for m in r.finditer(low)]
    return sorted(out, key=lambda x: x[1])


def mask_titles(text: str, matcher: TitleMatcher) -> str:
    """`text` lower-cased with its quoted spans and the catalogue titles it names blanked out (same length): an
    attribute word inside a title ("Star Wars", "Action Jackson") is part of the title, not a claim."""
    out = _QUOTED.sub(lambda m: " " * len(m.group(0)), text).lower()
    if matcher._re is not None and len(out) == len(text):
        out = matcher._re.sub(lambda m: " " * len(m.group(0)), out)
    return out


@dataclass
class ExplanationCheck:
    named: list[str] = field(default_factory=list)  # item ids named in the text
    hallucinated: list[str] = field(default_factory=list)  # named ids neither in the history nor recommended, and
    # quoted strings that are no catalogue title at all (invented titles)
    grounded: bool = False  # names >= 1 history item or a shared attribute value
    repetitive: bool = False  # the same title named more than once (a degenerate generation)
    ok: bool = False
    misattributed: list[str] = field(default_factory=list)  # recommended, not history items the text says the user
    # already liked / watched / bought (a false claim about the user's past)
    # attribute values of the closed vocabulary (genres) the text names that belong to no item it is about: not to
    # the recommended items it explains, not to the history items it names, and (for a claim about the user's past,
    # "they liked comedies") not to what the user liked ("Kolya is an action comedy": Kolya is a comedy only)
    unsupported_attributes: list[str] = field(default_factory=list)
    # history items the user did not like (with `disliked_ids`) that the text says they liked / enjoyed / loved
    contradicted: list[str] = field(default_factory=list)
    empty: bool = False  # no text at all

    def reasons(self, title: Callable[[str], str | None] = str) -> list[str]:
        """Why the check failed, one short phrase per rule broken, each reading after "the generated text ..." (empty
        when `ok`); `title(item_id)` names an item (a hallucinated entry that is no catalogue id, an invented title, is
        quoted as written)."""
        if self.ok:
            return []
        if self.empty:
            return ["was empty"]
        out = []
        quote = ", ".join

        def name(i: str) -> str:
            return title(i) or i

        if self.hallucinated:
            out.append("names a title outside the history and the recommendations, or an invented one: "
                       + quote(f'"{name(i)}"' for i in self.hallucinated))
        if self.repetitive:
            out.append("names a title twice")
        if self.misattributed:
            out.append("says the user already liked a recommended item: "
                       + quote(f'"{name(i)}"' for i in self.misattributed))
        if self.contradicted:
            out.append("says the user liked an item they rated low: "
                       + quote(f'"{name(i)}"' for i in self.contradicted))
        if self.unsupported_attributes:
            out.append("claims an attribute no item it is about has: " + quote(self.unsupported_attributes))
        if not self.grounded:
            out.append("cites no history item and no liked attribute")
        return out


# the claims that say the user liked something (not "watched" or "rated": those hold for a dislike too), and a
# negation just before the verb ("did not enjoy", "never liked", "wasn't loved")
_POSITIVE_VERB = re.compile(r"(?:liked|enjoyed|loved)$", re.IGNORECASE)
_NEGATED = re.compile(r"(?:\b(?:not|never|hardly)|n't)\s+(?:\w+\s+)?$", re.IGNORECASE)


def _title_like(quoted: str) -> bool:
    """A quoted span that reads as a title: it has a capital letter or a digit ("The Midnight Llama", "Heat (1996)").
    A quoted lower-case phrase ("fun", "feel-good") is a word in quotes, not a title claim (a catalogue title quoted
    in lower case is still read as that title: `TitleMatcher.exact`)."""
    return any(c.isupper() or c.isdigit() for c in quoted)


def check_explanation(
    text: str,
    matcher: TitleMatcher,
    history_ids: set[str],
    recommended_ids: set[str],
    attributes: set[str],
    vocabulary: set[str] | frozenset[str] = frozenset(),
    item_attributes: Callable[[str], Iterable[str]] | None = None,
    explained_ids: Iterable[str] | None = None,
    disliked_ids: set[str] | frozenset[str] = frozenset(),
) -> ExplanationCheck:
    """ok = non-empty, grounded (names a history item or an attribute of the user's liked items), no hallucinated
    title (a catalogue title outside history + recommended, or a quoted string with a capital letter or a digit that
    is no catalogue title: `_title_like`),
    not repetitive, no recommended item presented as one the user already liked / watched / bought, and no
    unsupported attribute claim.

    Titles are read with `TitleMatcher.find(strict=True)` (a title that is a common word counts when written as a
    title, not as the lower-case word); a quoted span must be a whole catalogue title (`TitleMatcher.exact`): one
    that only contains a title ("Toy Story 3" around "Toy Story") is invented. A year-less title shared by several
    items ("Sabrina") is a history item when the user has any of them.

    Attribute claims (with `vocabulary`, the closed set of attribute values checked, e.g. the genres, and
    `item_attributes(item_id)`): each vocabulary value the text names outside titles must be an attribute of an item
    the text is about, one of `explained_ids` (default: `recommended_ids`) or a history item it names; one named
    inside a claim about the user's past ("they liked comedies") may also be one of `attributes` (the user's liked
    items'). Attribute values outside the vocabulary (open tag sets: "love", "seen live") only ground the text.

    With `disliked_ids` (the history items the user did not like, e.g. rated below the like threshold), a history item
    the text says the user liked, enjoyed or loved ("Because they liked Heat") is `contradicted` when every history
    item its title names is a dislike; "they watched Heat" and "they did not enjoy Heat" are no such claim."""
    text = matcher.unquote_titles(text)
    named = matcher.find(text, strict=True)

    def history_of(i: str) -> set[str]:  # the history items a title names (a shared year-less title: any of them)
        return matcher.alternatives(i) & history_ids

    halluc = [i for i in named if not history_of(i) and i not in recommended_ids]
    attr_low = {a.lower() for a in attributes}
    vocab_low = {a.lower() for a in vocabulary}
    bare = matcher.blank_short_titles(text)  # "U2" and "Sia": named above; " and " is no quoted span
    quoted = [q.strip() for q in _QUOTED.findall(bare)]
    mentions = [matcher.exact(q) for q in quoted]
    for q, i in zip(quoted, mentions):
        if (i is None and q.lower() not in attr_low and q.lower() not in vocab_low and q not in halluc
                and _title_like(q)):
            halluc.append(q)
        elif i is not None and i not in named:  # quoted in lower case: still a title
            named.append(i)
            if not history_of(i) and i not in recommended_ids:
                halluc.append(i)
    ids = [m for m in mentions if m] + [i for _, i in matcher.short_quoted(text)]
    repetitive = len(ids) != len(set(ids))
    masked = mask_titles(bare, matcher)
    unsupported: list[str] = []
    if vocab_low and item_attributes is not None:
        about = set(recommended_ids if explained_ids is None else explained_ids)
        about |= {h for i in named for h in history_of(i)}
        support = {a.lower() for i in about for a in item_attributes(i)}
        past = [m.span(1) for m in _CLAIM.finditer(masked)]
        found = attribute_mentions(masked, vocab_low)
        found += [(q.lower(), -1) for q, i in zip(quoted, mentions) if i is None and q.lower() in vocab_low]
        for a, pos in found:
            claimed_past = pos >= 0 and any(s <= pos < e for s, e in past)
            if a not in support and not (claimed_past and a in attr_low) and a not in unsupported:
                unsupported.append(a)
    grounded = any(history_of(i) for i in named) or any(
        a not in unsupported for a, _ in attribute_mentions(masked, attr_low))
    misattributed: list[str] = []
    contradicted: list[str] = []
    for m in _CLAIM.finditer(text):
        positive = (_POSITIVE_VERB.search(text, m.start(), m.start(1)) is not None
                    and _NEGATED.search(text[max(0, m.start() - 24):m.start()]) is None)
        for i in matcher.find(m.group(1), strict=True):
            seen = history_of(i)
            if not seen and i in recommended_ids and i not in misattributed:
                misattributed.append(i)
            elif positive and seen and seen <= disliked_ids and i not in contradicted:
                contradicted.append(i)
    ok = (bool(text.strip()) and grounded and not halluc and not repetitive and not misattributed
          and not unsupported and not contradicted)
    return ExplanationCheck(named, halluc, grounded, repetitive, ok, misattributed, unsupported, contradicted,
                            empty=not text.strip())


def split_list(v: str) -> list[str]:
    """Attribute values of a field that is not genre-like: split at , | ; only ("Frank Herbert" stays whole)."""
    return [x.strip() for x in re.split(r"[,|;]", "" if v is None else str(v)) if x.strip()]


def split_values(v: str) -> list[str]:
    """Attribute values of one field: split at , | ; and before each capitalised word of a space-separated list
    ("Action Adventure Sci-Fi" -> Action, Adventure, Sci-Fi); lower-case multi-word values stay whole."""
    return [x.strip() for x in re.split(r"[,|;]| (?=[A-Z][A-Za-z'-]*(?:[ ,|;]|$))", str(v)) if x.strip()]


def reads_as_space_lists(values: Iterable[Any]) -> bool:
    """Whether a genre-like column with no , | ; anywhere lists several values per item at spaces, MovieLens-style
    ("Action Adventure Sci-Fi"), rather than one multi-word value per item ("Science Fiction"): at least half of the
    parts `split_values` would cut its multi-word values into are some other item's whole value."""
    vals = {str(v).strip() for v in values if isinstance(v, str) and str(v).strip()}
    if any(re.search(r"[,|;]", v) for v in vals):
        return False
    parts = {p for v in vals if len(split_values(v)) > 1 for p in split_values(v)}
    return bool(parts) and 2 * len(parts & vals) >= len(parts)


def template_explanation(
    domain: str,
    rec_titles: list[str],
    rec_attrs: list[list[str]],
    liked_titles: list[str],
    liked_attrs: list[list[str]],
    n_liked: int = 3,
) -> str:
    """Deterministic fallback: the attributes the recommended items share with the items the user liked, citing
    the liked items (oldest first in the inputs) that share the most of the recommended items' attributes (each
    attribute counted once per recommended item having it; ties: the more recent), else the most recent ones."""
    liked_counter = Counter(a for attrs in liked_attrs for a in attrs)
    # each attribute once per recommended item, in the order they list them: ties rank the same in every process
    shared = Counter(a for attrs in rec_attrs for a in dict.fromkeys(attrs) if a in liked_counter)
    top = [a for a, _ in (shared + liked_counter).most_common() if a in shared][:3]
    recs = ", ".join(f'"{t}"' for t in rec_titles[:3])
    overlap = [sum(shared[a] for a in set(attrs)) for attrs in liked_attrs]
    order = sorted(range(len(liked_titles)), key=lambda j: (-overlap[j], -j))
    cite = sorted(j for j in order[:n_liked] if overlap[j] > 0) or list(range(len(liked_titles)))[-n_liked:]
    likes = ", ".join(f'"{liked_titles[j]}"' for j in cite)
    if top and likes:
        return (
            f"Recommended {recs} because you liked {likes}, and these {domain}s share what you tend to enjoy: "
            f"{', '.join(top)}."
        )
    if likes:
        return f"Recommended {recs} as {domain}s similar to ones you liked recently: {likes}."
    return f"Recommended {recs} from what is popular with users like you."


def evidence_note(evidence: list[dict] | None) -> str:
    """An explanation's evidence for a report line: ` [cites "Title": Comedy, Drama]` per cited history item."""
    return "".join(f" [cites \"{v['title']}\": {', '.join(v.get('shared') or []) or 'no shared attribute'}]"
                   for v in evidence or [])
