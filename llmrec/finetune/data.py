"""Training / validation / test examples for fine-tuning, built from the prepared splits and the prompt templates.

Tasks
- yesno: the time-split Yes/No rows of the dataset (`ds.yesno`): history of <= 10 earlier events with like/dislike,
  a target item, answer " Yes" / " No" (the template's verbalizer).
  With the `yesno_stats` template the prompt also shows how other users rated the target before the row's split
  cut-off (llmrec.data.stats.feature_time: a train row sees up to its own time, valid/test rows up to t_valid/t_test).
- rank: leave-one-out next item; the target is shuffled among `n_candidates - 1` other items (popularity-sampled,
  uniform, or retrieved), the answer is the target's letter (" A", " B", ...).
- next_title: the answer is the next item's title, double-quoted as prompts quote titles (what the Recommender's
  `generate` mode writes and its title-likelihood scoring reads). With `negatives: K` a training example also
  carries K other titles from the retriever's list (`choices`, the true one first): `encode_group` makes one row per
  title and `listwise_title_loss` adds a softmax cross-entropy over their mean log-probs to the LM loss.

Only the answer tokens (plus EOS when `append_eos`) count in the loss: prompt positions get label -100.
Few-shot: `n_train` examples are drawn with a fixed seed (as TALLRec does); the same seed gives the same rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from llmrec.data.prepare import title_twins, with_title_twins
from llmrec.finetune.config import DataSettings

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ANSWER_RESERVE = {"yesno": 4, "rank": 4, "next_title": 40}
# The version of the code that builds each task's examples, recorded in a run's data_manifest.json: bump a task's
# number when `build_examples` may build other examples from the same recipe and data, so that `llmrec bench --train`
# and the demo train again instead of reusing an adapter trained on what the code no longer builds (they compare
# the examples themselves when the numbers differ). 2: training candidates leave out the history's and the
# target's title twins (rank; next_title with negatives), next_title's answer room fits its longest title.
EXAMPLES_VERSION = {"yesno": 1, "rank": 2, "next_title": 2}


@dataclass
class Example:
    prompt: str
    answer: str  # the text the model must produce (loss on these tokens only)
    choices: list[str] = field(default_factory=list)  # verbalizer strings whose first token is scored
    label: int = 0  # yesno: 1 = Yes; rank: index of the target among the choices; next_title: 0
    user_id: str = ""
    item_id: str = ""
    candidate_ids: list[str] = field(default_factory=list)
    # history items the token budget (data.max_len) left out, beyond the template's own max_history: the Recommender
    # renders the same template with RankingConfig.max_prompt_tokens (1024), so a cut here trains on shorter
    # histories than are served
    history_cut: int = 0


def _budget_cut(template: Any, n_history: int, rp: Any) -> int:
    """History items `rp` dropped to fit its token budget (the template's max_history cap not counted)."""
    cap = template.options.max_history
    listed = n_history if cap is None else min(n_history, cap)
    return max(0, listed - rp.n_history)


# ------------------------------------------------------------------------------------------------ sampling
def sample_rows(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """A fixed seeded subset of `n` rows (all rows when n is None/0 or >= len), kept in the original order."""
    if not n or n >= len(df):
        return df
    return df.sample(n=int(n), random_state=seed).sort_index()


def _prompts_api() -> Any:
    try:
        import llmrec.prompts as prompts
    except ImportError as e:  # the prompts package is part of llmrec; a missing one is an install problem
        raise ImportError(f"llmrec.prompts is required to build fine-tuning examples: {e}") from e
    return prompts


def resolve_template(P: Any, name: str) -> Any:
    """A template by name (prompts/<name>.yaml) or by YAML path; a relative path is also tried from the repo root."""
    from pathlib import Path

    p = Path(name)
    if p.suffix in (".yaml", ".yml") and not p.is_file() and not p.is_absolute():
        root = Path(__file__).resolve().parent.parent.parent / p
        if root.is_file():
            return P.load_template(root)
    return P.load_template(name)


def _history(ds: Any, P: Any, items: list[str], labels: list[int], ratings: list[float], ts: list[int]) -> list:
    return P.history_from_dataset(ds, list(items), list(labels), list(ratings), list(ts))


def _yesno_examples(ds: Any, rows: pd.DataFrame, cfg: DataSettings, tokenizer: Any, template: Any, P: Any,
                    desc: str) -> list[Example]:
    out = []
    budget = cfg.max_len - ANSWER_RESERVE["yesno"]
    feedback: list[Any] = [None] * len(rows)
    if template.needs_feedback:  # other users' reactions as of the row's split cut-off
        from llmrec.data.stats import yesno_row_feedback

        feedback = yesno_row_feedback(ds, rows)
    for k, r in enumerate(tqdm(rows.itertuples(index=False), total=len(rows), desc=desc, leave=False,
                               disable=len(rows) < 500)):
        # the row's last history_max events; `[-0:]` would be all of them (history_max 0: no history, as rank's tail)
        s = max(0, len(r.hist_items) - cfg.history_max)
        hist = _history(ds, P, r.hist_items[s:], r.hist_labels[s:], r.hist_ratings[s:], r.hist_timestamps[s:])
        target = P.items_from_dataset(ds, [r.item_id])[0]
        rp = P.render(template, history=hist, domain=ds.domain, target=target, tokenizer=tokenizer,
                      max_tokens=budget, chat=cfg.chat, target_stats=feedback[k])
        if len(rp.choices) != 2:
            raise ValueError(f"template {template.name!r}: a yes/no template needs 2 choices, got {rp.choices}")
        lab = int(r.label)
        out.append(Example(rp.text, rp.choices[0] if lab else rp.choices[1], list(rp.choices), lab,
                           str(r.user_id), str(r.item_id), history_cut=_budget_cut(template, len(hist), rp)))
    return out


class _CandidateSampler:
    """Other items for a rank example. `popular` / `random`: sampled by training-split popularity / uniformly.
    `retrieval`: the top of `retriever`'s list for the user's events before the target (valid/test: the leave-one-out
    rule of the split; train: the events before the training position), so training sees the hard negatives the
    Recommender will show; topped up by popularity when the list is short. The target is then shuffled in.
    Training candidates also leave out items listed under the title of a history item (catalogue duplicates,
    `title_twins`), as the Recommender's candidates do, and those listed under the target's title (a negative
    indistinguishable from the answer); valid/test ones leave out the history by id only, the protocol evaluation
    scores by (`Recommender.score_matrix`)."""

    def __init__(self, ds: Any, mode: str, n: int, retriever: Any = None, retriever_kind: str = "hybrid"):
        self.ds, self.mode, self.n = ds, mode, n
        train = ds.interactions[ds.interactions["split"] == "train"]
        counts = train["item_id"].value_counts()
        pop = np.array([counts.get(i, 0) for i in ds.item_ids], dtype=np.float64) + 1.0
        self.p = pop / pop.sum()
        if ds.n_items < n:
            raise ValueError(f"data.n_candidates={n} but the dataset has only {ds.n_items} items")
        self.retriever = retriever
        titles = getattr(ds, "titles", None)
        self.twins = title_twins(list(ds.item_ids), list(titles)) if titles is not None else {}
        self.later_counts = [0, 0]  # later items among the retrieved top n - 1, retrieved items looked at
        if mode == "retrieval" and retriever is None:
            from llmrec.ranking.factory import build_retriever

            self.retriever = build_retriever(ds, retriever_kind)

    def __call__(self, rng: np.random.Generator, target: str, seen: set[str], user_id: str, split: str,
                 pos: int | None = None, later: frozenset[str] = frozenset()) -> list[str]:
        """`seen`: the history (never a candidate); `later`: other items to keep out too (the user's later training
        items: true next items of later positions, not negatives), replaced by the retriever's next ones."""
        ds = self.ds
        # training: nor the history's title twins (as served); valid/test: the history's ids (as evaluated)
        twins = with_title_twins(seen, self.twins) - seen if split == "train" else set()
        history = seen | twins
        # nor, in training, an item listed under the target's own title: a wrong answer that reads as the right one
        same = set(self.twins.get(target, ())) if split == "train" else set()
        seen = history | later | same
        others: list[str] = []
        if self.mode == "retrieval":
            from llmrec.retrieval import candidates_for

            at = pos if split == "train" else None  # valid/test: exactly the split's history, as at evaluation
            got = [str(i) for i, _ in candidates_for(ds, user_id, split, self.n + len(later) + len(twins) + len(same),
                                                     self.retriever, pos=at)]
            if later:  # how many of the top n - 1 were later items (logged by build_examples)
                top = [i for i in got if i != target and i not in history and i not in same][: self.n - 1]
                self.later_counts[0] += sum(i in later for i in top)
                self.later_counts[1] += len(top)
            others = [i for i in got if i != target and i not in seen][: self.n - 1]
        if len(others) < self.n - 1:
            mask = np.ones(ds.n_items, dtype=bool)
            for i in list(seen) + [target] + others:
                j = ds.item_index.get(i)
                if j is not None:
                    mask[j] = False
            idx = np.flatnonzero(mask)
            p = self.p[idx] if self.mode != "random" else None
            p = p / p.sum() if p is not None else None
            take = rng.choice(idx, size=self.n - 1 - len(others), replace=False, p=p)
            others += [str(ds.item_ids[j]) for j in take]
        cands = others + [target]
        rng.shuffle(cands)
        return cands


def _user_events(ds: Any) -> dict[str, pd.DataFrame]:
    return {u: g for u, g in ds.interactions.groupby("user_id", sort=False)}


def _seq_examples(ds: Any, task: str, targets: pd.DataFrame, cfg: DataSettings, tokenizer: Any, template: Any,
                  P: Any, split: str, seed: int, desc: str, sampler: _CandidateSampler | None = None) -> list[Example]:
    """rank / next_title examples for (user_id, pos) targets: history = the user's events before `pos`."""
    events = _user_events(ds)
    rng = np.random.default_rng(seed)
    budget = cfg.max_len - ANSWER_RESERVE[task]
    eos = int(cfg.append_eos and getattr(tokenizer, "eos_token_id", None) is not None)

    def answer(item: str) -> str:  # next_title: quoted as prompts quote titles and the `generate` mode writes them
        title = ds.titles[ds.item_index[item]] if hasattr(ds, "titles") else item
        return " " + P.quote(title, template.options.title_max_chars)

    out = []
    for r in tqdm(targets.itertuples(index=False), total=len(targets), desc=desc, leave=False,
                  disable=len(targets) < 500):
        ev = events[r.user_id]
        before = ev[ev["pos"] < r.pos]
        h = before.tail(cfg.history_max)
        hist = _history(ds, P, h["item_id"].tolist(), h["label"].tolist(), h["rating"].tolist(),
                        h["timestamp"].tolist())
        target = str(r.item_id)
        # the user's later training items (train split only: valid/test candidates are exactly what is evaluated)
        later = frozenset()
        if split == "train" and cfg.exclude_later and sampler is not None:
            later = frozenset(ev.loc[(ev["split"] == "train") & (ev["pos"] > r.pos), "item_id"].astype(str)) - {target}
        if task == "rank":
            cands = sampler(rng, target, set(before["item_id"].astype(str)), str(r.user_id), split, int(r.pos),
                            later)
            rp = P.render(template, history=hist, domain=ds.domain, candidates=P.items_from_dataset(ds, cands),
                          tokenizer=tokenizer, max_tokens=budget, chat=cfg.chat)
            ids = [str(c) for c in (rp.candidate_ids or cands)]
            if len(rp.choices) != len(ids):
                raise ValueError(f"template {template.name!r}: {len(rp.choices)} choices for {len(ids)} candidates")
            k = ids.index(target)
            out.append(Example(rp.text, rp.choices[k], list(rp.choices), k, str(r.user_id), target, ids,
                               history_cut=_budget_cut(template, len(hist), rp)))
        else:
            ids = [target]
            if sampler is not None and cfg.negatives:  # the true title first, then the negatives (label 0)
                # none of the user's later training items (`exclude_later`): at a training position 38.6% of
                # BERT+LSTM's top 19 on ML-100K are items the user rates later, true items ranked down otherwise
                listed = sampler(rng, target, set(before["item_id"].astype(str)), str(r.user_id), split, int(r.pos),
                                 later)
                others = [str(c) for c in listed if str(c) != target]
                ids += [str(c) for c in rng.choice(others, size=min(cfg.negatives, len(others)), replace=False)]
            # a title longer than the reserve (+ EOS) gets the room it takes: history is dropped to fit, rather than
            # the prompt's start (the instruction) cut away by encode_example
            need = max(P.count_tokens(tokenizer, answer(i)) for i in ids) + eos if tokenizer is not None else 0
            fit = cfg.max_len - max(ANSWER_RESERVE[task], need)
            try:
                rp = P.render(template, history=hist, domain=ds.domain, tokenizer=tokenizer, max_tokens=fit,
                              chat=cfg.chat)
            except P.PromptBudgetError:
                if fit == budget:
                    raise
                # no room for the prompt beside this title: cut from the left when encoded (counted and warned)
                rp = P.render(template, history=hist, domain=ds.domain, tokenizer=tokenizer, max_tokens=budget,
                              chat=cfg.chat)
            choices = [answer(i) for i in ids] if len(ids) > 1 else []
            out.append(Example(rp.text, answer(target), choices, 0, str(r.user_id), target,
                               ids if len(ids) > 1 else [], history_cut=_budget_cut(template, len(hist), rp)))
    return out


def warn_history_cut(examples: dict[str, list[Example]], cfg: DataSettings) -> None:
    """A warning per split whose prompts lost history items to data.max_len: the Recommender serves the same
    template with up to RankingConfig.max_prompt_tokens (1024) tokens, so such a run trains on shorter histories
    than it is scored and served on."""
    for split, exs in examples.items():
        cut = [e.history_cut for e in exs if e.history_cut]
        if cut:
            log.warning("%d of %d %s prompts dropped history to fit data.max_len=%d (%.1f of up to %d items on "
                        "average): the Recommender serves this template with up to 1024 tokens and the full "
                        "history; raise data.max_len to train on the prompts it serves", len(cut), len(exs), split,
                        cfg.max_len, float(np.mean(cut)), cfg.history_max)


def build_examples(ds: Any, task: str, cfg: DataSettings, tokenizer: Any,
                   retriever: Any = None) -> dict[str, list[Example]]:
    """{"train", "valid", "test"} example lists for `task` (train: n_train sampled with cfg.seed; valid/test: fixed
    subsets of n_valid / n_test drawn with cfg.eval_seed, the same rows as `llmrec.evaluation.yesno_subset` for
    yesno). `retriever`:
    for rank with `candidates: retrieval`, a built retriever instead of building `cfg.retriever`."""
    from llmrec.evaluation import yesno_subset

    P = _prompts_api()
    template = resolve_template(P, cfg.template or task)
    if task == "yesno":
        ys = ds.yesno

        def sub(split: str, n: int | None) -> pd.DataFrame:
            return ys.iloc[:0] if n == 0 else yesno_subset(ds, split, n, cfg.eval_seed)

        train = yesno_subset(ds, "train", cfg.n_train or None, cfg.seed)  # the rows baselines' few-shot caps draw
        if cfg.exclude_eval_targets:
            held = _loo_target_mask(ds, train)
            log.info("exclude_eval_targets: %d of %d training rows are next-item valid/test targets (dropped)",
                     int(held.sum()), len(train))
            train = train[~held]
        return {
            "train": _yesno_examples(ds, train, cfg, tokenizer, template, P, "train examples"),
            "valid": _yesno_examples(ds, sub("valid", cfg.n_valid), cfg, tokenizer,
                                     template, P, "valid examples"),
            "test": _yesno_examples(ds, sub("test", cfg.n_test), cfg, tokenizer,
                                    template, P, "test examples"),
        }
    if task not in ("rank", "next_title"):
        raise ValueError(f"unknown task {task!r}")
    inter = ds.interactions
    pool = inter[(inter["split"] == "train") & (inter["pos"] >= 1)]
    train = sample_rows(pool, cfg.n_train, cfg.seed)
    valid = _subset(ds.targets("valid"), cfg.n_valid, cfg.eval_seed)
    test = _subset(ds.targets("test"), cfg.n_test, cfg.eval_seed)
    listwise = task == "next_title" and cfg.negatives > 0
    sampler = _CandidateSampler(ds, cfg.candidates, cfg.n_candidates, retriever, cfg.retriever) if (
        task == "rank" or listwise) else None
    held = sampler if task == "rank" else None  # next_title: negatives for training only (evaluation: exact titles)
    train_ex = _seq_examples(ds, task, train, cfg, tokenizer, template, P, "train", cfg.seed, "train examples",
                             sampler)
    if sampler is not None and sampler.later_counts[1]:
        log.info("candidates: %.1f%% of the retriever's top %d at the training positions were items the user rates "
                 "later in the training split (kept out, replaced by the next ones)",
                 100 * sampler.later_counts[0] / sampler.later_counts[1], cfg.n_candidates - 1)
    return {
        "train": train_ex,
        "valid": _seq_examples(ds, task, _with_pos(ds, valid), cfg, tokenizer, template, P, "valid", cfg.eval_seed + 1,
                               "valid examples", held),
        "test": _seq_examples(ds, task, _with_pos(ds, test), cfg, tokenizer, template, P, "test", cfg.eval_seed + 2,
                              "test examples", held),
    }


def _subset(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    return df.iloc[:0] if n == 0 else sample_rows(df, n, seed)


def _with_pos(ds: Any, targets: pd.DataFrame) -> pd.DataFrame:
    if "pos" in targets.columns and "timestamp" in targets.columns:
        return targets
    key = ds.interactions.set_index(["user_id", "item_id"])[["pos", "timestamp"]]
    return targets.join(key, on=["user_id", "item_id"])


# ------------------------------------------------------------------------------------------------ tokenization
def encode_example(ex: Example, tokenizer: Any, max_len: int, append_eos: bool = True) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels with labels = -100 on every prompt token. The prompt and the answer are
    tokenized separately, so the first answer token is exactly the token the scorer reads; an over-long prompt is cut
    from the left (the answer is always kept; one that leaves no room for a prompt token is refused)."""
    p_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
    if append_eos and tokenizer.eos_token_id is not None:
        a_ids = a_ids + [tokenizer.eos_token_id]
    if not a_ids:
        raise ValueError(f"answer {ex.answer!r} encodes to no tokens")
    if len(a_ids) >= max_len:  # cut, it would lose its end (EOS) and teach a truncated answer
        raise ValueError(f"answer of user {ex.user_id} ({ex.answer[:60]!r}...) is {len(a_ids)} tokens with EOS, not "
                         f"below max_len={max_len}: raise data.max_len")
    keep = max_len - len(a_ids)
    if len(p_ids) > keep:
        p_ids = p_ids[len(p_ids) - keep :]
    ids = p_ids + a_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(p_ids) + a_ids}


def encode_all(examples: list[Example], tokenizer: Any, max_len: int, append_eos: bool = True, group: bool = False,
               split: str = "train") -> list[dict]:
    """`encode_example` (or `encode_group`) over a split; prompts cut from the left to fit `max_len` lose their
    instruction, so they are counted and named in a warning."""
    enc = encode_group if group else encode_example
    eos = int(append_eos and tokenizer.eos_token_id is not None)
    feats, cut = [], 0
    for ex in examples:
        feats.append(enc(ex, tokenizer, max_len, append_eos))
        n_prompt = len(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
        answers = ex.choices if group else [ex.answer]
        n_answer = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + eos
        cut += n_prompt + n_answer > max_len
    if cut:
        log.warning("%d of %d %s examples had their prompt cut from the left to fit data.max_len=%d (the start of "
                    "the prompt, the instruction, is lost): raise data.max_len or lower data.history_max", cut,
                    len(examples), split, max_len)
    return feats


def encode_group(ex: Example, tokenizer: Any, max_len: int, append_eos: bool = True) -> dict[str, list[dict]]:
    """A listwise next_title example: one row per title in `ex.choices` (the true one first), each the prompt + that
    title (+ EOS), as `encode_example` makes it. `labels`: the true row's, -100 on the other rows (the LM loss reads
    the true title only); `score_labels`: every row's title tokens, EOS excluded (what the likelihood mode scores)."""
    if len(ex.choices) < 2:
        raise ValueError(f"encode_group: example of user {ex.user_id} has {len(ex.choices)} titles; needs the true "
                         "one and at least one negative")
    rows = []
    for j, answer in enumerate(ex.choices):
        f = encode_example(replace(ex, answer=answer), tokenizer, max_len, append_eos)
        score = list(f["labels"])
        if append_eos and score and score[-1] == tokenizer.eos_token_id:
            score[-1] = IGNORE_INDEX
        f["score_labels"] = score
        if j:
            f["labels"] = [IGNORE_INDEX] * len(score)
        rows.append(f)
    return {"group": rows}


class AnswerOnlyCollator:
    """Pads input_ids (pad id), attention_mask (0) and labels (-100) to the longest example of the batch. Left
    padding (default) right-aligns the answers, so the loss needs the logits of the last few positions only;
    `position_ids` count real tokens only, as at inference."""

    def __init__(self, pad_token_id: int, padding_side: str = "left", pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad = int(pad_token_id)
        self.side = padding_side
        self.mult = pad_to_multiple_of

    def __call__(self, feats: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        group = 0
        if feats and "group" in feats[0]:  # listwise examples (`encode_group`): their rows, one group after another
            sizes = {len(f["group"]) for f in feats}
            if len(sizes) != 1:
                raise ValueError(f"listwise examples of one batch have different numbers of titles: {sorted(sizes)}")
            group = sizes.pop()
            feats = [row for f in feats for row in f["group"]]
        n = max(len(f["input_ids"]) for f in feats)
        if self.mult:
            n = -(-n // self.mult) * self.mult

        def pad(key: str, val: int) -> Any:
            rows = []
            for f in feats:
                fill = [val] * (n - len(f[key]))
                rows.append(fill + f[key] if self.side == "left" else f[key] + fill)
            return torch.tensor(rows, dtype=torch.long)

        mask = pad("attention_mask", 0)
        out = {"input_ids": pad("input_ids", self.pad), "attention_mask": mask,
               "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "labels": pad("labels", IGNORE_INDEX)}
        if group:
            out.update(score_labels=pad("score_labels", IGNORE_INDEX), group_size=torch.tensor(group))
        return out


def _window_logits(model: Any, inputs: dict[str, Any], answers: Any, positions_as: str) -> tuple[Any, int]:
    """(logits of the positions from one before the batch's earliest answer token to the end, the column of the
    first token they predict). `answers`: [B, seq] bool, True on answer tokens."""
    import torch

    if not bool(answers.any()):
        raise ValueError("a batch without answer tokens (every label is -100)")
    seq = answers.shape[1]
    # no position predicts column 0: an answer token there (a prompt cut away entirely) is left out of the loss, as
    # transformers' shifted loss does; from column 1 on, the window never starts before the sequence
    first = max(1, int(torch.argmax(answers.int(), dim=1)[answers.any(dim=1)].min()))
    keep = seq - first + 1
    # the kept positions as an index tensor, not the int `keep`: transformers then gathers them into a contiguous
    # copy, where with an int it slices the hidden states, and on the CPU the LM head's matmul over that slice of a
    # training forward allocated ~0.2 GB inside the op (135M, batch 4; eval/results/memtrack_check.md); same logits
    if positions_as not in ("index", "int"):
        raise ValueError(f"positions_as must be 'index' or 'int', got {positions_as!r}")
    kept = torch.arange(seq - keep, seq, device=answers.device) if positions_as == "index" else keep
    fwd = {k: v for k, v in inputs.items() if k not in ("labels", "score_labels", "group_size")}
    return model(**fwd, logits_to_keep=kept).logits, seq - keep + 1


def answer_only_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None,
                     positions_as: str = "index") -> tuple[Any, Any]:
    """Causal-LM loss over the answer tokens only, computing logits just for the positions that predict them
    (`logits_to_keep`): the window starts one position before the earliest answer token of the batch. Returns
    (loss, logits of the kept window). With `num_items_in_batch` (gradient accumulation) the token sum is divided
    by it, as transformers' own loss does. `positions_as`: how the window reaches transformers, "index" (a tensor of
    positions) or "int" (its length; the same logits, slower on CPU: eval/loss_positions.py)."""
    import torch

    labels = inputs["labels"]
    valid = labels.ne(IGNORE_INDEX)
    logits, start = _window_logits(model, inputs, valid, positions_as)  # [B, keep, V]: positions start-1 .. seq-1
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, start:]
    loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else valid.sum()
    if torch.is_tensor(denom):
        denom = denom.to(loss.device)
    return loss / denom, logits


def listwise_title_loss(model: Any, inputs: dict[str, Any], temperature: float, lm_weight: float = 1.0,
                        num_items_in_batch: Any = None, positions_as: str = "index", lm_scale: float = 1.0,
                        list_scale: float = 1.0) -> tuple[Any, dict[str, float]]:
    """Loss of a batch of listwise next_title groups (`AnswerOnlyCollator` over `encode_group` features; each group
    the true title's row, then its negatives'):

        loss = lm_weight * lm_scale * NLL(true titles' answer tokens) / num_items_in_batch
               + list_scale * mean_g CE(softmax(s_g / temperature), 0)

    s_g = each title's mean log-prob per token after the prompt (the likelihood mode's score). `lm_scale` /
    `list_scale` let the Trainer undo its distributed averaging and spread the listwise term over gradient
    accumulation. Returns (loss, {"listwise_lm": ..., "listwise_loss": ..., "listwise_top1": share of groups whose
    true title scores highest}: the Trainer's log keys) from one forward pass over all rows."""
    import torch

    labels, score_labels = inputs["labels"], inputs["score_labels"]
    g = int(inputs["group_size"])
    if labels.shape[0] % g:
        raise ValueError(f"{labels.shape[0]} rows are not whole groups of {g}")
    logits, start = _window_logits(model, inputs, labels.ne(IGNORE_INDEX) | score_labels.ne(IGNORE_INDEX),
                                   positions_as)
    lg = logits[:, :-1, :].float()
    lse = torch.logsumexp(lg, dim=-1)

    def token_logprobs(target: Any) -> tuple[Any, Any]:
        t = target[:, start:]
        on = t.ne(IGNORE_INDEX)
        return (torch.gather(lg, 2, t.clamp(min=0)[..., None])[..., 0] - lse) * on, on

    lm_lp, lm_on = token_logprobs(labels)
    denom = num_items_in_batch if num_items_in_batch is not None else lm_on.sum()
    if torch.is_tensor(denom):
        denom = denom.to(lm_lp.device)
    lm = -lm_lp.sum() / denom
    sc_lp, sc_on = token_logprobs(score_labels)
    s = (sc_lp.sum(-1) / sc_on.sum(-1).clamp(min=1)).view(-1, g)
    target = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
    lw = torch.nn.functional.cross_entropy(s / temperature, target)
    parts = {"listwise_lm": float(lm.detach()), "listwise_loss": float(lw.detach()),
             "listwise_top1": float((s.argmax(-1) == 0).float().mean())}
    return lm_weight * lm_scale * lm + list_scale * lw, parts


def later_item_share(ds: Any, examples: list[Example]) -> dict[str, float]:
    """How many of the training examples' other candidates (`candidate_ids` minus the target) are items the user
    rates later in the training split: {"share": of all such candidates, "examples_with_any": share of examples with
    at least one, "candidates": their count}. Those are true next items of later positions, labelled wrong."""
    inter = ds.interactions
    train = inter[inter["split"] == "train"]
    pos = {(str(u), str(i)): int(p) for u, i, p in zip(train["user_id"], train["item_id"], train["pos"])}
    hits = total = with_any = 0
    for e in examples:
        at = pos.get((e.user_id, e.item_id))
        if at is None:
            raise ValueError(f"example of user {e.user_id}, item {e.item_id} is not a training interaction")
        n = sum(pos.get((e.user_id, c), -1) > at for c in e.candidate_ids if c != e.item_id)
        hits += n
        with_any += n > 0
        total += sum(c != e.item_id for c in e.candidate_ids)
    return {"share": hits / total if total else 0.0,
            "examples_with_any": with_any / len(examples) if examples else 0.0, "candidates": total}


def _loo_target_mask(ds: Any, rows: pd.DataFrame) -> np.ndarray:
    """Which `rows` (user_id, item_id) are a leave-one-out valid or test target of the next-item task."""
    t = ds.interactions
    t = t[t["split"].isin(["valid", "test"])]
    targets = set(zip(t["user_id"].astype(str), t["item_id"].astype(str), strict=True))
    return np.array([(str(u), str(i)) in targets for u, i in zip(rows["user_id"], rows["item_id"], strict=True)],
                    dtype=bool)


def yesno_training_pairs(ds: Any, adapter: str | Path) -> set[tuple[str, str]] | None:
    """The (user_id, item_id) of the Yes/No rows a finetune run trained `adapter` on, rebuilt from its run's
    `data_manifest.json` (next to the adapter folder or in it): the same seeded draw `build_examples` made. None when
    there is no manifest or it is not a yesno run of this dataset; ValueError when the draw does not give the
    manifest's row count (another dataset build)."""
    from llmrec.evaluation import yesno_subset

    adapter = Path(adapter)
    found = [d / "data_manifest.json" for d in (adapter, adapter.parent) if (d / "data_manifest.json").is_file()]
    if not found:
        return None
    man = json.loads(found[0].read_text())
    if man.get("task") != "yesno" or man.get("dataset") != getattr(ds, "name", None):
        return None
    rows = yesno_subset(ds, "train", man.get("n_train_requested") or None, man["seed"])
    if man.get("exclude_eval_targets"):
        rows = rows[~_loo_target_mask(ds, rows)]
    if len(rows) != man["train"]["n"]:
        raise ValueError(f"{found[0]}: {man['train']['n']} training rows recorded, the seeded draw on this dataset "
                         f"gives {len(rows)}")
    return set(zip(rows["user_id"].astype(str), rows["item_id"].astype(str), strict=True))


def manifest(ds: Any, task: str, cfg: DataSettings, examples: dict[str, list[Example]], template: Any = None) -> dict:
    """What the model was trained and evaluated on: sizes, seed, label balance, template, and a content hash."""
    listed = task == "rank" or (task == "next_title" and cfg.negatives > 0)
    out: dict[str, Any] = {"dataset": getattr(ds, "name", None), "task": task,
                           "examples_version": EXAMPLES_VERSION.get(task), "seed": cfg.seed,
                           "eval_seed": cfg.eval_seed,
                           "n_train_requested": cfg.n_train,
                           "candidates": cfg.candidates if listed else None,
                           "retriever": cfg.retriever if listed and cfg.candidates == "retrieval" else None,
                           "n_candidates": cfg.n_candidates if listed else None,
                           "negatives": cfg.negatives if task == "next_title" else None,
                           "max_len": cfg.max_len, "history_max": cfg.history_max,
                           "exclude_eval_targets": cfg.exclude_eval_targets if task == "yesno" else None}
    if template is not None:
        out["template"] = {"name": template.name, "version": getattr(template, "version", None),
                           "hash": getattr(template, "hash", None)}
    for split, exs in examples.items():
        h = hashlib.sha256()
        for e in exs:
            h.update(json.dumps([e.prompt, e.answer]).encode())
        info: dict[str, Any] = {"n": len(exs), "sha256": h.hexdigest()[:16], "users": len({e.user_id for e in exs})}
        if task == "yesno" and exs:
            info["positive_rate"] = float(np.mean([e.label for e in exs]))
            # rows that are a next-item valid/test target: what an adapter reused for next-item ranking has seen
            pairs = pd.DataFrame({"user_id": [e.user_id for e in exs], "item_id": [e.item_id for e in exs]})
            info["loo_targets"] = int(_loo_target_mask(ds, pairs).sum())
        if any(e.choices for e in exs) and task == "next_title":
            info["titles_per_example"] = int(np.mean([len(e.choices) for e in exs]))
        cut = [e.history_cut for e in exs if e.history_cut]
        if cut:  # prompts trained on a shorter history than the Recommender serves (see Example.history_cut)
            info["history_cut_to_fit"] = {"examples": len(cut), "mean_items": round(float(np.mean(cut)), 2)}
        if task == "rank" and exs:
            info["answer_position_histogram"] = np.bincount([e.label for e in exs],
                                                            minlength=cfg.n_candidates).tolist()
        out[split] = info
    return out
