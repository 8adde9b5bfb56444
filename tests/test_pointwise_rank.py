"""eval/pointwise_rank.py: target ranks under score + retrieval-rank fusion, hand-computed."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def pr(load_script):
    return load_script("eval/pointwise_rank.py")


def test_target_ranks_hand_computed(pr):
    cands = [["a", "b", "c"], ["x", "y"]]
    targets = ["c", "q"]  # q was not retrieved
    scores = [np.array([0.0, 1.0, 2.0]), np.array([5.0, 0.0])]
    # w = 0: the scores alone -> c first; w = inf: the retrieval order -> c third
    assert pr.target_ranks(cands, targets, scores, 0.0, 99).tolist() == [1, 99]
    assert pr.target_ranks(cands, targets, scores, np.inf, 99).tolist() == [3, 99]
    # w = 2: a 0 - 2 log 1 = 0, b 1 - 2 log 2 = -0.386, c 2 - 2 log 3 = -0.197 -> a, c, b: c second
    assert pr.target_ranks(cands, targets, scores, 2.0, 99).tolist() == [2, 99]
    # w = 4: c 2 - 4 log 3 = -2.39 below b 1 - 4 log 2 = -1.77 -> a, b, c
    assert pr.target_ranks(cands, targets, scores, 4.0, 99).tolist() == [3, 99]

