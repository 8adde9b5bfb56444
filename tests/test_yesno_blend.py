"""eval/yesno_blend.py: joining a run's per-row P(Yes) to the split's rows, and a blend fitted on valid rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

KEYS_LABEL = ["user_id", "item_id", "label"]


@pytest.fixture(scope="module")
def yb(load_script):
    return load_script("eval/yesno_blend.py")


def _rows() -> pd.DataFrame:
    return pd.DataFrame({"user_id": ["1", "1", "2"], "item_id": ["a", "b", "a"], "label": [1, 0, 1],
                         "counts": [0.5, -0.5, 1.0]})


def test_with_llm_joins_on_user_and_item_and_takes_the_logit(yb, tmp_path):
    f = tmp_path / "test_after.csv"
    scores = pd.DataFrame({"user_id": ["2", "1"], "item_id": ["a", "b"], "label": [1, 0], "p_yes": [0.5, 0.75]})
    scores.to_csv(f, index=False)
    j = yb.with_llm(_rows(), f).set_index(["user_id", "item_id"])
    assert len(j) == 2
    assert j.loc[("2", "a"), "llm"] == pytest.approx(0.0)
    assert j.loc[("1", "b"), "llm"] == pytest.approx(np.log(3.0))
    assert j.loc[("1", "b"), "counts"] == -0.5  # the signals travel with their row


@pytest.mark.parametrize("bad", [{"user_id": "3"}, {"label": 0}])
def test_with_llm_refuses_rows_that_are_not_the_splits(yb, tmp_path, bad):
    row = {"user_id": "2", "item_id": "a", "label": 1, "p_yes": 0.5, **bad}
    f = tmp_path / "test_after.csv"
    pd.DataFrame([row]).to_csv(f, index=False)
    with pytest.raises(ValueError, match="test_after.csv: its rows are not the split's"):
        yb.with_llm(_rows(), f)


def test_blend_weights_follow_the_informative_signal(yb):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    fit_rows = pd.DataFrame({"label": y, "good": 3.0 * (2 * y - 1) + rng.normal(0, 1, 400),
                             "noise": rng.normal(0, 1, 400)})
    m = yb.fit_blend(fit_rows, ["good", "noise"])
    assert m.coef_[0][0] > 1.0 > abs(m.coef_[0][1])


def test_a_missing_run_says_how_to_make_it(yb, tmp_path, monkeypatch):
    """The default --run (artifacts/finetune/bench_yesno_<dataset>) may not exist: the error names the command that
    makes the run (with its scores), not only the rescoring of an existing one."""
    import sys

    missing = tmp_path / "bench_yesno_ml-100k"
    monkeypatch.setattr(sys, "argv", ["yesno_blend.py", "--run", str(missing)])
    with pytest.raises(SystemExit, match=r"python finetune/bench.py run --task yesno"):
        yb.main()


@pytest.mark.parametrize("n_test, n_pos", [(6, 1), (40, 20)])
def test_the_note_gives_the_number_of_resamples_used(yb, tmp_path, monkeypatch, n_test, n_pos):
    """Resamples where an AUC is undefined (one class: likely with 1 positive in 6 rows) are dropped by
    paired_bootstrap_ratio; the note said "share of 2000 resamples" whatever the number kept."""
    import sys

    import llmrec.baselines

    rng = np.random.default_rng(1)

    def split_rows(n, pos):
        label = np.r_[np.ones(pos, int), np.zeros(n - pos, int)]
        return pd.DataFrame({"user_id": [f"u{i}" for i in range(n)], "item_id": "a", "label": label,
                             **{c: label + rng.normal(0, 1, n) for c in ("counts", "bert_lstm", "mf")}})

    splits = {"test": split_rows(n_test, n_pos), "valid": split_rows(30, 15)}
    run = tmp_path / "run"
    (run / "scores").mkdir(parents=True)
    for split, rows in splits.items():
        rows[KEYS_LABEL].assign(p_yes=rng.uniform(0.05, 0.95, len(rows))).to_csv(
            run / "scores" / f"{split}_after.csv", index=False)
    monkeypatch.setattr(yb, "load_prepared", lambda *a, **k: None)
    monkeypatch.setattr(llmrec.baselines, "load_or_fit", lambda name, ds: (None, "fake"))
    monkeypatch.setattr(yb, "yesno_subset", lambda ds, split, n, seed: split)
    monkeypatch.setattr(yb, "signals", lambda ds, split, models: splits[split])
    got = {}
    monkeypatch.setattr(yb, "write_result", lambda name, payload, md, command=None: got.update(md=md, p=payload))
    monkeypatch.setattr(sys, "argv", ["yesno_blend.py", "--run", str(run), "--valid-examples", "30"])
    yb.main()
    used = {r["n_boot"] for r in got["p"]["rows"] if r["signal"] != "BERT+LSTM"}
    assert len(used) == 1
    (n,) = used
    if n_pos == 1:
        assert n < 2000
        assert f"share of the {n} resamples used where the row is at least as good; of 2000 drawn, " in got["md"]
    else:
        assert n == 2000
        assert "share of the 2000 resamples used where the row is at least as good). Blends" in got["md"]
    assert "share of 2000 resamples" not in got["md"]
