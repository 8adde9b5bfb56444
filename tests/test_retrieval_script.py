"""eval/retrieval.py: the validation choice of a fusion weight (hybrid text weight, ensemble weight)."""

from __future__ import annotations

import numpy as np


def test_select_weight_takes_best_recall20_then_recall50_and_records_each(load_script, monkeypatch):
    script = load_script("eval/retrieval.py")
    r20 = {0.1: 0.2, 0.25: 0.3, 0.5: 0.3, 1.0: 0.1}
    r50 = {0.1: 0.2, 0.25: 0.4, 0.5: 0.5, 1.0: 0.1}
    monkeypatch.setattr(script, "recalls", lambda ds, w, split, n: {"recall@20": r20[w], "recall@50": r50[w]})
    valid: dict = {}
    got = script.select_weight(None, "hybrid:sasrec(w_text={w})", script.GRID, lambda w: w, valid, None)
    assert got == 0.5  # 0.25 and 0.5 tie on Recall@20; Recall@50 decides
    assert sorted(valid) == [f"hybrid:sasrec(w_text={w})" for w in (0.1, 0.25, 0.5, 1.0)]  # the table's row names
    assert valid["hybrid:sasrec(w_text=0.25)"] == {"recall@20": 0.3, "recall@50": 0.4}


class _Scores:
    """A stand-in retriever: fixed pseudo-random scores per (user, item), the same for every call."""

    def __init__(self, ds, seed: int):
        self.s = np.random.default_rng(seed).normal(size=(len(ds.user_ids), ds.n_items))
        self.row = {str(u): j for j, u in enumerate(ds.user_ids)}

    def score_items(self, users, split):
        return self.s[[self.row[str(u)] for u in users]]


def test_paired_sign_test_is_over_the_same_user_subset_as_the_recalls(load_script, tiny_dataset):
    """With --max-users the goal's Recall@20 figures come from a seeded user subset; the paired sign test under them
    must count those users (in the same order), not every test user."""
    from llmrec.evaluation import evaluate_ranking

    script = load_script("eval/retrieval.py")
    ds = tiny_dataset
    a, b = _Scores(ds, 1), _Scores(ds, 2)
    n = 10
    assert n < len(ds.targets("test"))
    ranks = script.user_ranks(ds, a, "test", max_users=n)
    want = evaluate_ranking(ds, lambda ub: a.score_items(list(ub), "test"), "test", max_users=n, return_ranks=True)
    assert ranks.tolist() == want["ranks"]
    p = script.paired(ds, a, b, "test", k=5, max_users=n)
    assert p["only_hybrid"] + p["only_single"] + p["both"] <= n
    ha = np.asarray(want["ranks"]) <= 5
    hb = np.asarray(evaluate_ranking(ds, lambda ub: b.score_items(list(ub), "test"), "test", max_users=n,
                                     return_ranks=True)["ranks"]) <= 5
    assert (p["only_hybrid"], p["only_single"], p["both"]) == (int((ha & ~hb).sum()), int((hb & ~ha).sum()),
                                                               int((ha & hb).sum()))
