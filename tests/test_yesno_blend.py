"""eval/yesno_blend.py: joining a run's per-row P(Yes) to the split's rows, and a blend fitted on valid rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


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
