"""LLM evaluations: Yes/No on a prepared split or a TALLRec JSON file, full-ranking rerank, explanation quality,
and the contamination probe. Runners in `eval/` and the `llmrec eval` CLI call these."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.data.loaders import DataError
from llmrec.evaluation import evaluate_ranking, evaluate_yesno, yesno_subset
from llmrec.metrics import classification_metrics
from llmrec.prompts import quote

log = logging.getLogger(__name__)


class TallrecFormatError(DataError):
    """A malformed TALLRec file (a `DataError`, so the CLI reports it as `llmrec: error: ...`)."""


def load_tallrec(path: str | Path) -> list[dict[str, str]]:
    """A TALLRec JSON file: a list of {instruction, input, output: "Yes."|"No."}. Errors name the entry and field
    (the line and column for invalid JSON). `output` is Yes or No, any case, with or without the final period."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise TallrecFormatError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise TallrecFormatError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise TallrecFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TallrecFormatError(f"{path}: line {line}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        if not e.doc.strip():
            raise TallrecFormatError(f"{path}: file is empty") from None
        raise TallrecFormatError(f"{path}: line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list) or not data:
        raise TallrecFormatError(f"{path}: expected a non-empty JSON list of examples, got "
                                 f"{'an empty list' if isinstance(data, list) else type(data).__name__}")
    for n, ex in enumerate(data):
        if not isinstance(ex, dict):
            raise TallrecFormatError(f"{path}: entry {n}: expected an object with instruction, input and output, got "
                                     f"{type(ex).__name__}")
        for k in ("instruction", "input", "output"):
            if not isinstance(ex.get(k), str):
                raise TallrecFormatError(f"{path}: entry {n}: field {k!r} missing or not a string")
        if not re.fullmatch(r"\s*(yes|no)\.?\s*", ex["output"], re.I):  # "Yes, but no." is no label
            raise TallrecFormatError(
                f"{path}: entry {n}: field 'output' must be 'Yes.' or 'No.', got {ex['output']!r}"
            )
    n_yes = sum(ex["output"].strip().lower().startswith("yes") for ex in data)
    if n_yes in (0, len(data)):
        log.warning("%s: every one of the %d examples is %r: AUC is undefined (NaN) on one class", path, len(data),
                    "Yes." if n_yes else "No.")
    return data


def tallrec_prompt(ex: dict[str, str]) -> str:
    return f"{ex['instruction'].strip()}\n\n{ex['input'].strip()}\nAnswer:"


def eval_yesno_tallrec(backend: Any, path: str | Path, batch_size: int = 8,
                       data: list[dict[str, str]] | None = None) -> dict:
    """AUC/accuracy/F1 of P(Yes) on a TALLRec JSON file (`data`: the file already read by `load_tallrec`)."""
    data = load_tallrec(path) if data is None else data
    labels = np.array([1 if ex["output"].strip().lower().startswith("yes") else 0 for ex in data])
    probs = np.zeros(len(data))
    t0 = time.perf_counter()
    for b in range(0, len(data), batch_size):
        lp = backend.score_choices([tallrec_prompt(ex) for ex in data[b : b + batch_size]], [" Yes", " No"])
        probs[b : b + len(lp)] = np.exp(lp[:, 0])
    out = classification_metrics(labels, probs)
    out.update({"source": str(path), "seconds": time.perf_counter() - t0})
    out["_probs"] = probs.tolist()
    return out


def export_tallrec(ds: Any, split: str, path: str | Path, max_examples: int | None = None, seed: int = 0) -> Path:
    """Write a prepared dataset's Yes/No split in TALLRec's JSON format (for other tools, or to test that path)."""
    ex = yesno_subset(ds, split, max_examples, seed)
    noun = ds.domain
    rows = []
    for r in ex.itertuples():
        liked = [f'"{ds.titles[ds.item_index[i]]}"' for i, lab in zip(r.hist_items, r.hist_labels) if lab]
        disliked = [f'"{ds.titles[ds.item_index[i]]}"' for i, lab in zip(r.hist_items, r.hist_labels) if not lab]
        rows.append(
            {
                "instruction": "Given the user's preference and unpreference, identify whether the user will like "
                f'the target {noun} by answering "Yes." or "No.".',
                "input": f"User Preference: {', '.join(liked)}\nUser Unpreference: {', '.join(disliked)}\n"
                f'Whether the user will like the target {noun} "{ds.titles[ds.item_index[r.item_id]]}"?',
                "output": "Yes." if r.label else "No.",
            }
        )
    path = Path(path)
    path.write_text(json.dumps(rows, indent=1))
    return path


def eval_yesno_dataset(rec: Any, ds: Any, split: str = "test", max_examples: int | None = 500, seed: int = 0,
                       valid_examples: int = 0) -> dict:
    """AUC / accuracy / precision / recall / F1 of P(Yes) on a fixed seeded subset of the `split` rows (threshold
    0.5). `valid_examples` > 0 (with split="test") also scores that many seeded validation rows, picks the threshold
    of best accuracy there and adds `threshold_valid`, `accuracy@t_valid`, `f1@t_valid`, `precision@t_valid`,
    `recall@t_valid` on the test rows: a tuned LLM's P(Yes) is not calibrated, so at 0.5 it may say No to every row
    (F1 0) while ranking the rows well (AUC). `seconds` is the time of the `split` rows only."""
    from llmrec.metrics import metrics_at_valid_threshold

    ex = yesno_subset(ds, split, max_examples, seed)
    t0 = time.perf_counter()
    probs = rec.yesno_examples_probs(ex)
    seconds = time.perf_counter() - t0
    out = evaluate_yesno(probs, ex)
    out.update(
        {
            "split": split,
            "subset_seed": seed,
            "seconds": seconds,
            "positive_rate": float(ex["label"].mean()),
        }
    )
    if valid_examples and split == "test":
        ex_v = yesno_subset(ds, "valid", valid_examples, seed)
        t = metrics_at_valid_threshold(ex_v["label"].to_numpy(), rec.yesno_examples_probs(ex_v),
                                       ex["label"].to_numpy(), probs)
        out["threshold_valid"] = t.pop("threshold")
        out["valid_n"] = len(ex_v)
        out.update({f"{k}@t_valid": v for k, v in t.items()})
    out["_probs"] = probs.tolist()
    out["_labels"] = ex["label"].tolist()
    return out


def eval_rank(
    rec: Any,
    ds: Any,
    max_users: int | None = 200,
    seed: int = 0,
    mode: str | None = None,
    retrieval_only: bool = False,
    split: str = "test",
    return_ranks: bool = False,
) -> dict:
    """Full-ranking metrics of retrieve + LLM rerank (or the retriever alone) on the leave-one-out `split` (test;
    valid for choosing settings: histories then stop before the validation target); `return_ranks` as in
    llmrec.evaluation.evaluate_ranking."""
    t0 = time.perf_counter()
    if retrieval_only:
        fn = lambda users: rec.retriever.score_items(list(users), split)  # noqa: E731
    else:
        fn = lambda users: rec.score_matrix(users, split, mode)  # noqa: E731
    out = evaluate_ranking(
        ds,
        fn,
        split,
        ks=(10, 20),
        max_users=max_users,
        seed=seed,
        batch_users=16,
        desc="retrieval" if retrieval_only else f"rerank:{mode or rec.cfg.mode}",
        return_ranks=return_ranks,
    )
    n = out.get("user_subset", {}).get("n", out["n_users"])
    out["seconds_per_user"] = (time.perf_counter() - t0) / max(1, n)
    return out


def select_retrieval_weight(rec: Any, ds: Any, grid: Sequence[float], max_users: int | None = 200, seed: int = 0,
                            metric: str = "ndcg@10", mode: str = "verbalizer") -> dict:
    """Choose `rec.cfg.retrieval_weight` (LLM + retrieval rank fusion; `mode`: verbalizer or likelihood) on the
    *validation* split:
    each prompt is scored once (`rec.llm_cache`), then every weight in `grid` re-orders the same scores. Leaves
    the best weight in `rec.cfg` (ties: the smaller weight) and the cache in place, so a test evaluation at several
    weights also scores each prompt once. Returns {"selected": w, "valid": {w: metrics}, "metric": metric}."""
    if not grid:
        raise ValueError("select_retrieval_weight: empty grid")
    if rec.llm_cache is None:
        rec.llm_cache = {}
    valid: dict[float, dict] = {}
    for w in grid:
        rec.cfg.retrieval_weight = float(w)
        r = eval_rank(rec, ds, max_users, seed, mode=mode, split="valid")
        valid[float(w)] = {k: r[k] for k in ("ndcg@10", "recall@10", "mrr@10", "n_users")}
        log.info("retrieval_weight %s on valid: %s", w, valid[float(w)])
    best = max(valid, key=lambda w: (valid[w][metric], -w))
    rec.cfg.retrieval_weight = best
    return {"selected": best, "valid": valid, "metric": metric}


def fallback_reason_counts(recs: list[Any]) -> dict[str, int]:
    """How many fallbacks broke each post-check rule: {rule: users}, the rule being a reason's phrase before its
    list of titles (`ExplanationCheck.reasons`; a text can break several, so the counts can sum to more than the
    fallbacks), most frequent first."""
    from collections import Counter

    counts = Counter(why.split(":", 1)[0] for r in recs if r.explanation_fallback
                     for why in dict.fromkeys(getattr(r, "explanation_fallback_reasons", None) or []))
    return dict(sorted(counts.items(), key=lambda x: (-x[1], x[0])))


def explanation_metrics(recs: list[Any], histories: dict[str, set[str]] | None = None) -> dict:
    """Over the users' explanations (n = users):

    - grounding_rate: the share whose *generated* text (before any fallback) names >= 1 history item or an attribute
      of the user's liked items it does not contradict (`Recommendation.explanation_grounded`; a template fallback,
      grounded by construction, does not count as grounded generation);
    - hallucination_rate: the share whose generated text named >= 1 invented title (the check then fell back);
    - fallback_rate: the share whose generated text failed the check (`check_explanation`: ungrounded, an invented
      or repeated title, a recommended item claimed as already liked, a disliked one claimed as liked, an attribute
      claim no item it is about supports), so the template explanation was shown; 1 - fallback_rate = the pass
      rate (which rules: `fallback_reason_counts`);
    - mean_words (of the texts shown), distinct_2 (distinct word bigrams / all bigrams across users);
    - names_recommended: of the generated texts shown (not template fallbacks, which always list them), the share
      that names one of the top-3 recommended items by its title quoted as prompts quote it
      (`llmrec.prompts.quote`: inner quotes escaped, long titles capped); an explanation that talks only about the
      history does not say why *these* items."""
    texts = [r.explanation or "" for r in recs]
    n = max(1, len(recs))
    gen = [r for r in recs if not r.explanation_fallback and r.explanation]
    names = [any(quote(i.title) in r.explanation for i in r.items[:3]) for r in gen]  # as prompts quote titles
    bigrams = [tuple(t.lower().split()[i : i + 2]) for t in texts for i in range(max(0, len(t.split()) - 1))]
    return {
        "n": len(recs),
        "grounding_rate": sum(bool(getattr(r, "explanation_grounded", None)) for r in recs) / n,
        "hallucination_rate": sum(bool(r.hallucinated) for r in recs) / n,
        "fallback_rate": sum(r.explanation_fallback for r in recs) / n,
        # of the texts shown: a user with nothing left to recommend has no explanation, not one of 0 words
        "mean_words": float(np.mean([len(t.split()) for t in texts if t])) if any(texts) else 0.0,
        "distinct_2": len(set(bigrams)) / max(1, len(bigrams)),
        "names_recommended": sum(names) / len(names) if names else None,
    }


_ARTICLES = ("The", "A", "An", "La", "Le", "Les", "L'", "Il", "Lo", "Das", "Der", "Die", "El", "Los", "Las")
_INVERTED = re.compile(r"^(.+), (" + "|".join(re.escape(a) for a in _ARTICLES) + r")$")


def natural_title(title: str) -> str:
    """A catalogue title as it is written elsewhere: the year dropped, a trailing alternate title in parentheses
    dropped, and MovieLens' inverted article moved to the front ("Usual Suspects, The (1995)" -> "The Usual
    Suspects", "Appartement, L'" -> "L'Appartement"). A model has read the film's name, not the catalogue's form."""
    t = re.sub(r"\s*\(\d{4}\)\s*$", "", str(title)).strip()
    t = re.sub(r"\s+\([^()]*\)$", "", t) if not t.startswith("(") else t  # "X (Alternate Title, The)" -> "X"
    m = _INVERTED.match(t)
    if m:
        t = m.group(2) + ("" if m.group(2).endswith("'") else " ") + m.group(1)
    return t


def contamination_probe(backend: Any, ds: Any, n: int = 100, seed: int = 0, max_new_tokens: int = 12) -> dict:
    """Does the base LLM complete catalogue titles from their first half more often than shuffled controls?

    For n seeded items with >= 2-word titles (as `natural_title` writes them: year removed, "Usual Suspects, The"
    read as "The Usual Suspects", which is how a model has seen it): prompt
    `The {domain} titled "<first half of the words>` and greedy-generate; a hit is a continuation that starts with
    the true second half. Control: the same items with their title words shuffled (fixed seed), so the completion
    cannot come from memory of the real title. Also the year, where the dataset has one:
    `The {domain} "<title>" was released in the year` -> the first 4-digit number equals the true year, against the
    rate of always answering the most common year; scored over the picked items whose year is a 4-digit number
    (`year_n` of them), so an item without a year cannot count as answered right.
    """
    rng = np.random.default_rng(seed)
    base_titles = [natural_title(t) for t in ds.titles]
    pool = [j for j, t in enumerate(base_titles) if len(t.split()) >= 2]
    pick = rng.choice(pool, size=min(n, len(pool)), replace=False)

    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9 ]", "", s.lower()).split()

    def run(titles: list[str]) -> float:
        prompts, rests = [], []
        for t in titles:
            w = t.split()
            h = max(1, len(w) // 2)
            prompts.append(f'The {ds.domain} titled "{" ".join(w[:h])}')
            rests.append(norm(" ".join(w[h:])))
        outs = backend.generate(prompts, max_new_tokens=max_new_tokens)
        hits = [bool(r) and norm(o)[: len(r)] == r for o, r in zip(outs, rests)]
        return float(np.mean(hits))

    real = [base_titles[j] for j in pick]
    shuffled = []
    for t in real:
        w = t.split()
        for _ in range(10):
            p = list(rng.permutation(w))
            if p != w:
                break
        shuffled.append(" ".join(p))
    out: dict[str, Any] = {
        "n": len(real),
        "seed": seed,
        "title_completion_rate": run(real),
        "shuffled_control_rate": run(shuffled),
    }
    if "year" in ds.items.columns:
        # only the picked items with a 4-digit year: a missing year ("") would match an answer without a number
        dated = [(t, str(ds.items.iloc[j]["year"]).strip()) for t, j in zip(real, pick)]
        dated = [(t, y) for t, y in dated if re.fullmatch(r"\d{4}", y)]
        out["year_n"] = len(dated)
        if dated:
            years = [y for _, y in dated]
            prompts = [f'The {ds.domain} "{t}" was released in the year' for t, _ in dated]
            outs = backend.generate(prompts, max_new_tokens=6)
            got = [(re.findall(r"\d{4}", o) or [""])[0] for o in outs]
            out["year_accuracy"] = float(np.mean([g == y for g, y in zip(got, years)]))
            common = max(sorted(set(years)), key=years.count)
            out["year_majority_baseline"] = float(np.mean([y == common for y in years]))
    return out
