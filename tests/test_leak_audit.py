"""Evaluation-honesty audit: no later event shapes a training row, and a scorer that ties every item earns nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd

from llmrec.data.prepare import PrepareConfig, loo_split, yesno_examples
from llmrec.evaluation import evaluate_ranking, history_indices
from llmrec.metrics import ranks_from_scores
from llmrec.retrieval.hybrid import EnsembleRetriever, ModelRetriever, rrf_fuse


# ------------------------------------------------------------------------------ Yes/No negatives (implicit feedback)
def _implicit_events() -> pd.DataFrame:
    """u0 has A, B, C early and F1, F2 late (valid / test period); u1 has all five early. Every catalogue item is
    one u0 interacts with at some time, so only knowledge of u0's later events rules any item out as a negative."""
    rows = [("u0", "A", 1), ("u0", "B", 2), ("u0", "C", 3), ("u0", "F1", 100), ("u0", "F2", 101),
            ("u1", "A", 4), ("u1", "B", 5), ("u1", "C", 6), ("u1", "F1", 7), ("u1", "F2", 8)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    df = df.assign(rating=np.nan, label=np.int8(1), order=np.arange(len(df)))
    return loo_split(df.sort_values(["user_id", "timestamp", "order"], kind="stable").reset_index(drop=True))


def test_yesno_negatives_of_a_split_do_not_know_the_users_later_items():
    df = _implicit_events()
    cfg = PrepareConfig(neg_per_pos=1, min_history=1, seed=0)
    table, cut = yesno_examples(df, cfg, "implicit", np.array(["A", "B", "C", "F1", "F2"], dtype=object))
    y = table.to_pandas()
    assert cut["t_valid"] <= 100 and cut["t_test"] <= 101 and cut["t_valid"] > 8  # u0's F1 / F2 after t_valid
    neg = y[(y["label"] == 0) & (y["user_id"] == "u0")]
    train_neg = neg[neg["split"] == "train"]
    # u0's training rows (B, C, before t_valid) get negatives: items u0 had not met by the end of the training period
    # are unobserved as far as training can know. Before the fix the sampler excluded every item u0 ever met, F1 and
    # F2 included, so u0's training rows had no negative at all: the test period decided which items a training row
    # may call No.
    assert len(train_neg) == len(y[(y["user_id"] == "u0") & (y["split"] == "train") & (y["label"] == 1)])
    assert set(train_neg["item_id"]) <= {"F1", "F2"}
    # a negative is never an item the user had before its split's end (train: t_valid, valid: t_test, test: ever)
    bound = {"train": cut["t_valid"], "valid": cut["t_test"], "test": np.inf}
    for r in y[y["label"] == 0].itertuples():
        known = set(df[(df["user_id"] == r.user_id) & (df["timestamp"] < bound[r.split])]["item_id"])
        assert r.item_id not in known, r
    # u1 met every item before t_valid: no negative exists for it
    assert not len(y[(y["label"] == 0) & (y["user_id"] == "u1")])


# ------------------------------------------------------------------------------------------------------------ ties
def test_metrics_rank_a_constant_scorer_last(tiny_dataset):
    """The metric layer: ties count against the target (full ranking and the sampled protocol)."""
    def const(users):
        return np.zeros((len(users), tiny_dataset.n_items))

    full = evaluate_ranking(tiny_dataset, const, "test", ks=(10, 20), return_ranks=True)
    assert full["hr@20"] == 0.0 and full["ndcg@10"] == 0.0
    targets = tiny_dataset.targets("test")
    hist = history_indices(tiny_dataset, targets["user_id"].tolist(), "test")
    assert full["ranks"] == [tiny_dataset.n_items - len(h) for h in hist]  # last among the unseen items
    sampled = evaluate_ranking(tiny_dataset, const, "test", ks=(10,), mode="sampled", return_ranks=True)
    assert set(sampled["ranks"]) == {21} and sampled["hr@10"] == 0.0  # 20 fixed negatives: rank 21 of 21


def test_rrf_fusion_keeps_ties_so_a_constant_model_earns_nothing():
    """A model that scores every item alike must stay tied through reciprocal rank fusion. Before the fix the
    fused ranks broke its ties by catalogue order (row_ranks: ties keep column order), so the fused scores fell
    strictly with the item index and a target early in the catalogue ranked first."""
    f = rrf_fuse([np.zeros((1, 6))])
    assert np.unique(f).size == 1
    assert ranks_from_scores(f, np.array([0]))[0] == 6
    # ties inside one input only: the tied items share their place; the other input still orders them
    a = np.array([[3.0, 1.0, 1.0, 0.0]])
    b = np.array([[0.0, 1.0, 2.0, 3.0]])
    g = rrf_fuse([a, b], rrf_k=60)
    assert np.allclose(g[0], [1 / 61 + 1 / 64, 1 / 62.5 + 1 / 63, 1 / 62.5 + 1 / 62, 1 / 64 + 1 / 61])
    # NaN scores rank last, as the metrics read them (-inf); excluded items stay -inf
    h = rrf_fuse([np.array([[np.nan, 1.0, 0.5]])], exclude=[np.array([1])])
    assert h[0, 1] == -np.inf and h[0, 2] > h[0, 0]


class _Constant:
    """A 'model' that scores every item 0 (its users' histories -inf, as baselines mask them)."""

    def __init__(self, ds):
        self.ds = ds

    def score_items(self, user_ids, split="test"):
        out = np.zeros((len(user_ids), self.ds.n_items))
        for r, h in enumerate(history_indices(self.ds, list(user_ids), split)):
            out[r, h] = -np.inf
        return out

    def score_history(self, history):
        return np.zeros(self.ds.n_items)


def test_retrievers_built_on_a_constant_model_earn_nothing(tiny_dataset):
    ds = tiny_dataset
    for ret in (ModelRetriever(_Constant(ds)), EnsembleRetriever([_Constant(ds), _Constant(ds)], [1.0, 2.0])):
        m = evaluate_ranking(ds, lambda users, r=ret: r.score_items(list(users), "test"), "test", ks=(10, 20))
        assert m["hr@20"] == 0.0, type(ret).__name__


def test_weight_above_user_median_labels_ignore_later_weights(tmp_path):
    """`label_rule: weight_above_user_median` took each user's median over ALL their events, so a weight in the
    valid/test period decided whether a training-period event was a like. The median is now taken over the user's
    events before the Yes/No cut-off t_valid: changing later weights leaves every training-period label as it was."""
    from llmrec.data import PrepareConfig, load_prepared, prepare

    items = "item_id,title\n" + "".join(f"i{j},Item {j}\n" for j in range(12))
    rows = [(u, f"i{j}", 100 * j + k, 10 + j) for k, u in enumerate(("u1", "u2", "u3")) for j in range(12)]

    def labels(late_weight: float) -> pd.DataFrame:
        home = tmp_path / f"h{late_weight}"
        home.mkdir()
        ev = "user_id,item_id,timestamp,rating\n" + "".join(
            f"{u},{i},{t},{late_weight if t >= 1000 else w}\n" for u, i, t, w in rows)
        (home / "events.csv").write_text(ev)
        (home / "items.csv").write_text(items)
        cfg = PrepareConfig(items_file=str(home / "items.csv"), name="w", label_rule="weight_above_user_median",
                            min_history=1)
        prepare(str(home / "events.csv"), cfg, home=home)
        ds = load_prepared("w", home=home)
        t_valid = ds.manifest["yesno_cutoffs"]["t_valid"]
        df = ds.interactions
        return df[df["timestamp"] < t_valid].sort_values(["user_id", "timestamp"])[["user_id", "item_id", "label"]]

    low, high = labels(0.0), labels(1e6)
    assert len(low) and low["label"].nunique() == 2
    pd.testing.assert_frame_equal(low.reset_index(drop=True), high.reset_index(drop=True))
