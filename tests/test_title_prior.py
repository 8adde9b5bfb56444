"""eval/title_prior.py: the (prior weight, fusion weight) choice on validation."""

from __future__ import annotations


def test_choose_takes_the_best_validation_ndcg_then_the_smaller_weights(load_script):
    choose = load_script("eval/title_prior.py").choose
    assert choose({(0.0, 0.5): 0.08, (0.25, 0.5): 0.09, (0.5, 1.0): 0.085}) == (0.25, 0.5)
    assert choose({(0.5, 0.0): 0.09, (0.25, 2.0): 0.09, (0.25, 1.0): 0.09}) == (0.25, 1.0)  # ties: smaller a, then w
