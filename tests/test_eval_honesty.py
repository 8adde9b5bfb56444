"""Evaluation honesty: which history a split excludes, arguments that would silently change a metric, and the
contamination probe's year check."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from llmrec.evaluation import evaluate_ranking, history_indices
from llmrec.metrics import ranks_from_scores


def _items_of(ds, user, splits):
    df = ds.interactions
    return sorted(ds.item_index[i] for i in df[(df["user_id"] == user) & df["split"].isin(splits)]["item_id"])


def test_history_indices_all_is_every_event_and_unknown_split_is_refused(tiny_dataset):
    users = tiny_dataset.targets("test")["user_id"].tolist()[:5]
    for u, h in zip(users, history_indices(tiny_dataset, users, "valid")):
        assert sorted(h.tolist()) == _items_of(tiny_dataset, u, ("train",))
    for u, h in zip(users, history_indices(tiny_dataset, users, "test")):
        assert sorted(h.tolist()) == _items_of(tiny_dataset, u, ("train", "valid"))
    # "all" (serving: every event is history) must not fall back to the valid rule (train events only), which left
    # the user's valid and test items unmasked for the retrievers that mask with this helper (llmrec.retrieval.hybrid)
    for u, h in zip(users, history_indices(tiny_dataset, users, "all")):
        assert sorted(h.tolist()) == _items_of(tiny_dataset, u, ("train", "valid", "test"))
    with pytest.raises(ValueError, match="split"):
        history_indices(tiny_dataset, users, "Test")


def test_evaluate_ranking_refuses_an_unknown_mode(tiny_dataset):
    def zeros(users):
        return np.zeros((len(users), tiny_dataset.n_items))

    with pytest.raises(ValueError, match="mode"):
        evaluate_ranking(tiny_dataset, zeros, mode="Full")


def test_ranks_from_scores_refuses_exclusions_for_another_number_of_rows():
    scores = np.array([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1]])
    # one exclusion list for two rows: the second row's history would silently stay in the ranking
    with pytest.raises(ValueError, match="exclude"):
        ranks_from_scores(scores, np.array([1, 1]), [np.array([0])])
    ok = ranks_from_scores(scores, np.array([1, 1]), [np.array([0]), np.array([], dtype=np.int64)])
    assert ok.tolist() == [1, 2]


class _SilentBackend:
    """Generates nothing: every completion is empty (no title, no year)."""

    def generate(self, prompts, max_new_tokens=64, **_):
        return [""] * len(prompts)


def test_contamination_probe_does_not_count_missing_years_as_correct():
    from llmrec.ranking.evaluate import contamination_probe

    titles = [f"Some Film {j}" for j in range(10)]
    years = ["1995", "1996", "", "", "", "", "", "", "", ""]  # most items have no year in the metadata
    ds = SimpleNamespace(titles=np.array(titles), domain="movie", items=pd.DataFrame({"title": titles, "year": years}))
    out = contamination_probe(_SilentBackend(), ds, n=10, seed=0)
    assert out["title_completion_rate"] == 0.0
    # a model that names no year is right about no item: an empty answer must not match an empty year
    assert out["year_accuracy"] == 0.0
    assert out["year_n"] == 2
    assert out["year_majority_baseline"] == 0.5  # the two dated items, each year once


def test_bench_explanation_users_fit_the_users_with_a_target(tmp_path):
    from llmrec.bench import explanation_users
    from llmrec.data import PrepareConfig, load_prepared, prepare

    # 3 users with a leave-one-out target and 5 with only two events (kept by min_user_events=2, no target)
    rows = [(f"u{u}", f"i{j}", 1000 + 10 * u + j, 5) for u in range(3) for j in range(4)]
    rows += [(f"v{u}", f"i{j}", 2000 + 10 * u + j, 5) for u in range(5) for j in range(2)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(4)], "title": [f"Film {j}" for j in range(4)]})
    inter.to_csv(tmp_path / "x.csv", index=False)
    items.to_csv(tmp_path / "x_items.csv", index=False)
    prepare(str(tmp_path / "x.csv"), PrepareConfig(items_file=str(tmp_path / "x_items.csv"), name="x",
                                                   min_user_events=2, n_sampled_negatives=1), home=tmp_path)
    ds = load_prepared("x", home=tmp_path)
    assert len(ds.user_ids) == 8 and len(ds.targets("test")) == 3
    users = explanation_users(ds, 2, seed=0)  # asks for 2 * 4 = 8 users: only 3 have a target
    assert sorted(users) == ["u0", "u1", "u2"]
    assert explanation_users(ds, 2, seed=0) == users  # seeded
    assert len(explanation_users(ds, 0, seed=0)) == 0


def test_yesno_training_rows_can_leave_out_next_item_targets(tiny_dataset, tmp_path):
    """The Yes/No rows are split by time, so a user's leave-one-out next-item target can be a Yes/No *training* row.
    The manifest counts them; `exclude_eval_targets` drops exactly those and keeps every other sampled row."""
    from llmrec.finetune.config import DataSettings
    from llmrec.finetune.data import build_examples, manifest, yesno_training_pairs
    from llmrec.prompts import WhitespaceTokenizer

    t = tiny_dataset.interactions
    targets = set(zip(t.loc[t["split"].isin(["valid", "test"]), "user_id"].astype(str),
                      t.loc[t["split"].isin(["valid", "test"]), "item_id"].astype(str)))

    def build(exclude):
        cfg = DataSettings(n_train=None, n_valid=0, n_test=0, max_len=400, exclude_eval_targets=exclude)
        ex = build_examples(tiny_dataset, "yesno", cfg, WhitespaceTokenizer())
        return ex, manifest(tiny_dataset, "yesno", cfg, ex)

    kept, man = build(False)
    seen = [(e.user_id, e.item_id) for e in kept["train"]]
    n_held = sum(p in targets for p in seen)
    assert n_held > 0, "the tiny dataset's time split should put some next-item targets among the Yes/No train rows"
    assert man["train"]["loo_targets"] == n_held and man["exclude_eval_targets"] is False
    dropped, man2 = build(True)
    assert [(e.user_id, e.item_id) for e in dropped["train"]] == [p for p in seen if p not in targets]
    assert man2["train"]["loo_targets"] == 0 and man2["train"]["n"] == len(seen) - n_held
    # an evaluation that reuses the adapter for next-item ranking rebuilds those rows from the run's manifest
    (tmp_path / "adapter").mkdir()
    for m, ex in ((man, kept), (man2, dropped)):
        (tmp_path / "data_manifest.json").write_text(json.dumps(m))
        want = {(e.user_id, e.item_id) for e in ex["train"]}
        assert yesno_training_pairs(tiny_dataset, tmp_path / "adapter") == want
    (tmp_path / "data_manifest.json").write_text(json.dumps({**man2, "exclude_eval_targets": False}))
    with pytest.raises(ValueError, match="training rows recorded"):
        yesno_training_pairs(tiny_dataset, tmp_path / "adapter")
    (tmp_path / "data_manifest.json").unlink()
    assert yesno_training_pairs(tiny_dataset, tmp_path / "adapter") is None


def test_history_cut_to_fit_the_training_budget_is_counted_and_warned(tiny_dataset, caplog):
    """The rank recipe's data.max_len (448) left ~6 of 10 history items out of every ML-100K training prompt, while
    the Recommender scores and serves the same template with up to 1024 tokens and all 10: the adapter trained on
    shorter histories than it is used on, silently. Each example now records the items its budget cut, the manifest
    counts them, and the trainer warns."""
    import logging

    from llmrec.finetune.config import DataSettings
    from llmrec.finetune.data import build_examples, manifest, warn_history_cut
    from llmrec.prompts import WhitespaceTokenizer

    tok = WhitespaceTokenizer()
    roomy = DataSettings(n_train=12, n_valid=0, n_test=0, max_len=4000, history_max=10, n_candidates=5)
    full = build_examples(tiny_dataset, "rank", roomy, tok)
    assert all(e.history_cut == 0 for e in full["train"])
    assert "history_cut_to_fit" not in manifest(tiny_dataset, "rank", roomy, full)["train"]
    # a budget a few tokens short of the longest prompt: that prompt (at least) loses its oldest items
    need = max(len(tok(e.prompt)["input_ids"]) for e in full["train"]) + 4
    tight = DataSettings(n_train=12, n_valid=0, n_test=0, max_len=need - 6, history_max=10, n_candidates=5)
    cut = build_examples(tiny_dataset, "rank", tight, tok)
    n_cut = [e.history_cut for e in cut["train"]]
    assert any(n_cut) and all(c >= 0 for c in n_cut)
    for e_full, e_cut in zip(full["train"], cut["train"]):  # what was cut is the oldest history, nothing else
        assert e_cut.prompt.count("\n") == e_full.prompt.count("\n") - e_cut.history_cut
    man = manifest(tiny_dataset, "rank", tight, cut)["train"]["history_cut_to_fit"]
    assert man["examples"] == sum(c > 0 for c in n_cut)
    with caplog.at_level(logging.WARNING, logger="llmrec.finetune.data"):
        warn_history_cut(cut, tight)
    assert "dropped history to fit data.max_len" in caplog.text


def test_yesno_auc_of_one_class_is_nan_and_says_so(tiny_dataset, caplog):
    """A subset whose rows share one label has no AUC: NaN, with a warning naming why (it was silent)."""
    import logging
    import math

    from llmrec.evaluation import evaluate_yesno, yesno_subset

    ex = yesno_subset(tiny_dataset, "test")
    pos = ex[ex["label"] == 1].head(5)
    with caplog.at_level(logging.WARNING, logger="llmrec.evaluation"):
        out = evaluate_yesno([0.9, 0.8, 0.7, 0.6, 0.4], pos)
    assert math.isnan(out["auc"]) and out["accuracy"] == pytest.approx(4 / 5)
    assert "the 5 examples all have label 1; AUC is undefined" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmrec.evaluation"):
        both = evaluate_yesno([0.9, 0.1], ex.drop_duplicates("label").sort_values("label", ascending=False))
    assert both["auc"] == 1.0 and "undefined" not in caplog.text
