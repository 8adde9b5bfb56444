"""Leak-free item feedback for the `yesno_stats` prompt: hand-computed counts, the cut-off rule, no test leakage."""

import json

import numpy as np
import pandas as pd
import pytest

from llmrec.data.stats import ItemFeedback, ItemFeedbackStats, feature_time, yesno_row_feedback


def small_interactions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ["a", "a", "a", "b", "a", "b"],
            "timestamp": [30, 10, 20, 15, 20, 40],
            "label": [1, 1, 0, 0, 1, 1],
        }
    )


def test_counts_strictly_before_hand_computed():
    s = ItemFeedbackStats(small_interactions())
    # item a, time-sorted: 10 (1), 20 (0), 20 (1), 30 (1)
    assert s.at("a", 10) == ItemFeedback(0, 0)
    assert s.at("a", 11) == ItemFeedback(1, 1)
    assert s.at("a", 20) == ItemFeedback(1, 1)  # both events at t=20 are not *before* 20
    assert s.at("a", 21) == ItemFeedback(3, 2)
    assert s.at("a", None) == ItemFeedback(4, 3) and s.at("a").rate == 0.75
    assert s.at("b", 40) == ItemFeedback(1, 0)
    assert s.at("zzz", 100) == ItemFeedback(0, 0) and ItemFeedback(0, 0).rate is None


def test_missing_column_is_named():
    with pytest.raises(ValueError, match=r"\['label'\]"):
        ItemFeedbackStats(small_interactions().drop(columns="label"))


def test_feature_time_rule():
    cut = {"t_valid": 100, "t_test": 200}
    assert feature_time(50, "train", cut) == 50
    assert feature_time(150, "valid", cut) == 100
    assert feature_time(250, "test", cut) == 200
    assert feature_time(250, "test", None) == 250
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        feature_time(1, "dev", cut)


def test_yesno_rows_see_nothing_from_their_split_period(tiny_dataset):
    ds = tiny_dataset
    ys = ds.yesno
    cut = ds.manifest["yesno_cutoffs"]
    inter = ds.interactions
    got = yesno_row_feedback(ds, ys)
    for row, fb in zip(ys.itertuples(), got):
        limit = {"train": row.timestamp, "valid": cut["t_valid"], "test": cut["t_test"]}[row.split]
        seen = inter[(inter["item_id"] == row.item_id) & (inter["timestamp"] < limit)]
        assert fb == ItemFeedback(len(seen), int(seen["label"].sum())), row
    # leakage: no valid/test row's feature counts an interaction at or after its split's cut-off, so adding any
    # number of such events changes nothing
    test_rows = ys[ys["split"] != "train"]
    extra = inter.copy()
    extra["timestamp"] = np.maximum(extra["timestamp"], cut["t_test"]) + 1

    class Shadow:
        manifest = ds.manifest
        interactions = pd.concat([inter, extra], ignore_index=True)

    assert yesno_row_feedback(Shadow(), test_rows) == yesno_row_feedback(ds, test_rows)
    assert any(f.n > 0 for f in got), "the tiny dataset should give some non-empty feedback"
    # rows without their split were read as train rows: a test row then counted the test period's events
    with pytest.raises(ValueError, match="without a 'split' column"):
        yesno_row_feedback(ds, test_rows.drop(columns=["split"]))


def test_finetune_examples_and_recommender_use_the_stats_template(tiny_dataset):
    """The yesno_stats prompt carries the feedback line in training examples and at scoring time (same renderer)."""
    from llmrec.finetune.config import DataSettings
    from llmrec.finetune.data import build_examples
    from llmrec.prompts import WhitespaceTokenizer

    cfg = DataSettings(n_train=8, n_valid=4, n_test=4, template="yesno_stats", max_len=400)
    ex = build_examples(tiny_dataset, "yesno", cfg, WhitespaceTokenizer())
    assert ex["train"] and ex["test"]
    assert all("Other users so far:" in e.prompt for e in ex["train"] + ex["valid"] + ex["test"])
    plain = build_examples(tiny_dataset, "yesno", DataSettings(n_train=8, n_valid=4, n_test=4, max_len=400),
                           WhitespaceTokenizer())
    assert not any("Other users so far" in e.prompt for e in plain["train"] + plain["test"])
    # scoring the same test rows with a yesno_stats Recommender shows each row the line its training-side prompt has
    from types import SimpleNamespace

    from llmrec.evaluation import yesno_subset
    from llmrec.ranking import RankingConfig, Recommender

    class Recording:
        name, tokenizer = "recording", None

        def __init__(self):
            self.prompts = []

        def score_choices(self, prompts, choices):
            self.prompts += prompts
            return np.log(np.full((len(prompts), len(choices)), 1.0 / len(choices)))

    be = Recording()
    rec = Recommender(tiny_dataset, be, SimpleNamespace(), RankingConfig(templates={"yesno": "yesno_stats"}))
    rec.yesno_examples_probs(yesno_subset(tiny_dataset, "test", cfg.n_test, cfg.seed))

    def line(text):
        return [ln for ln in text.splitlines() if ln.startswith("Other users so far:")]

    assert [line(p) for p in be.prompts] == [line(e.prompt) for e in ex["test"]]
    assert all(len(line(p)) == 1 for p in be.prompts)


def test_estimate_prompt_shows_the_counts_only_figure(tiny_dataset):
    """`yesno_estimate` examples print, for every row, the bench's counts-only P(Yes) of that same row (same cut-off
    rule, same history), so the "counts only" row of the report is exactly the figure the model was shown."""
    import re

    from llmrec.data.stats import counts_only_p_yes
    from llmrec.evaluation import yesno_subset
    from llmrec.finetune.config import DataSettings
    from llmrec.finetune.data import build_examples
    from llmrec.prompts import WhitespaceTokenizer

    cfg = DataSettings(n_train=8, n_valid=4, n_test=6, template="yesno_estimate", max_len=400)
    ex = build_examples(tiny_dataset, "yesno", cfg, WhitespaceTokenizer())
    for split, n in (("train", cfg.n_train), ("valid", cfg.n_valid), ("test", cfg.n_test)):
        rows = yesno_subset(tiny_dataset, split, n, cfg.seed)
        want = np.round(100 * counts_only_p_yes(tiny_dataset, rows)).astype(int)
        got = [int(re.search(r"Estimate from these two counts alone: (\d+)%", e.prompt).group(1)) for e in ex[split]]
        assert got == want.tolist() and len(got) > 0, split


def test_adapter_templates(tmp_path):
    from llmrec.ranking import RankingConfig
    from llmrec.ranking.factory import adapter_templates, with_adapter_templates

    assert adapter_templates(None) == {} and adapter_templates(tmp_path / "nothing") == {}
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("task: yesno\ndata:\n  template: yesno_stats\n")
    assert adapter_templates(run / "adapter") == {"yesno": "yesno_stats"}  # older runs: read from the recipe
    (run / "adapter" / "llmrec_prompt.json").write_text(json.dumps({"task": "rank", "template": "rank"}))
    assert adapter_templates(run / "adapter") == {"rank": "rank"}  # the adapter's own file wins
    cfg = with_adapter_templates(RankingConfig(templates={"rank": "custom"}), run / "adapter")
    assert cfg.templates == {"rank": "custom"}  # explicit config wins over the adapter's file


def test_counts_only_reference_hand_computed():
    from llmrec.data.stats import counts_only_p_yes

    class DS:
        manifest = {"yesno_cutoffs": {"t_valid": 100, "t_test": 200}}
        interactions = small_interactions()

    rows = pd.DataFrame({"item_id": ["a", "zzz"], "timestamp": [25, 250], "split": ["train", "test"],
                         "hist_labels": [[1, 1, 0], []]})
    p = counts_only_p_yes(DS(), rows)
    # row 0: item a before t=25 -> 3 ratings, 2 likes -> 3/5; user 2 of 3 -> 3/5; logit sum = 2 ln 1.5
    # row 1: unknown item (1/2) and no history (1/2) -> 0.5
    np.testing.assert_allclose(p, [1 / (1 + np.exp(-2 * np.log(1.5))), 0.5])
