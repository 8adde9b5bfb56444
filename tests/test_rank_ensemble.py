"""eval/rank_ensemble.py: ranks within the candidates (llmrec.retrieval.hybrid.row_ranks), the target's rank
under a weighted score, the weight choice."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def ens(load_script):
    return load_script("eval/rank_ensemble.py")


def test_row_ranks_descending_ties_keep_column_order():
    from llmrec.retrieval.hybrid import row_ranks

    assert row_ranks(np.array([[0.5, 2.0, 0.5], [1.0, 1.0, 3.0]])).tolist() == [[2, 1, 3], [2, 3, 1]]


def test_target_ranks_by_hand(ens):
    retr = -np.log([1.0, 2.0, 3.0])  # the retriever's order: log(1 / rank)
    feats = np.stack([np.stack([retr, [-3.0, -1.0, -2.0]], 1)] * 2)  # 2 users, 3 candidates, 2 features
    target = np.array([2, -1])  # user 1's target is not among the candidates
    assert ens.target_ranks(feats, np.array([1.0, 0.0]), target, 99).tolist() == [3, 99]
    assert ens.target_ranks(feats, np.array([0.0, 1.0]), target, 99).tolist() == [2, 99]  # -2 behind -1 only
    assert ens.target_ranks(feats, np.array([0.0, 0.0]), target, 99).tolist() == [3, 99]  # ties: earlier first


def test_choose_weights_takes_the_best_validation_ndcg_then_the_smaller_weight(ens):
    retr = -np.log([1.0, 2.0, 3.0])
    feats = np.stack([retr, [-3.0, -1.0, 0.0]], 1)[None]  # the LLM puts the target (column 2) first
    w, v = ens.choose_weights(feats, np.array([2]), free=[1], fixed={0: 1.0}, grid=[0.0, 1.0, 2.0], missing_rank=9)
    # w_llm 0: rank 3, NDCG 1/log2(4) = 0.5; w_llm 1: -1.099 > -1.693 > -3, rank 1, NDCG 1 (2 ties it: 1 is kept)
    assert w.tolist() == [1.0, 1.0] and v == pytest.approx(1.0)
    w, v = ens.choose_weights(feats, np.array([0]), free=[1], fixed={0: 1.0}, grid=[0.0, 1.0], missing_rank=9)
    assert w.tolist() == [1.0, 0.0] and v == pytest.approx(1.0)  # target first in retrieval order: w_llm 0 suffices


class _Loaded(Exception):
    pass


def _refuse_load(*_a, **_k):
    raise _Loaded


def test_an_unknown_baseline_is_a_usage_error_naming_it_and_the_choices(ens, monkeypatch, capsys):
    """Before: no check at parsing, so `--baselines sasrex` loaded the dataset and the retriever, then failed in
    `collaborative_model` with a KeyError traceback."""
    import sys

    from llmrec.baselines import MODELS

    monkeypatch.setattr(ens, "load_prepared", _refuse_load)
    monkeypatch.setattr(sys, "argv", ["eval/rank_ensemble.py", "--baselines", "sasrec", "sasrex"])
    with pytest.raises(SystemExit) as e:
        ens.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --baselines" in err and "'sasrex'" in err
    for name in ("itemcf", *MODELS):
        assert f"'{name}'" in err


def test_every_model_collaborative_model_builds_is_a_valid_baseline(ens, monkeypatch):
    import sys

    from llmrec.baselines import MODELS

    monkeypatch.setattr(ens, "load_prepared", _refuse_load)
    monkeypatch.setattr(sys, "argv", ["eval/rank_ensemble.py", "--baselines", "itemcf", *MODELS])
    with pytest.raises(_Loaded):
        ens.main()
