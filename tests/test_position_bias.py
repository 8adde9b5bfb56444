"""eval/position_bias.py: the order statistics, hand-computed."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def pb(load_script):
    return load_script("eval/position_bias.py")


def test_order_stats_hand_computed(pb):
    # user 1: listed a, b, c (= retrieval order); the LLM prefers the first listed: a > b > c; target b (rank 2)
    # user 2: listed z, y, x, retrieval order x, y, z; the LLM picks the listed-first z, then x, then y; target q
    #         was not retrieved (counts 0)
    ranked = [[("a", 3.0), ("b", 2.0), ("c", 1.0)], [("z", 0.0), ("x", -1.0), ("y", -2.0)]]
    listed = [["a", "b", "c"], ["z", "y", "x"]]
    retrieved = [["a", "b", "c"], ["x", "y", "z"]]
    st = pb.order_stats(ranked, listed, retrieved, ["b", "q"])
    assert st["users"] == 2
    assert st["ndcg@10"] == pytest.approx((1 / np.log2(3) + 0.0) / 2)
    assert st["hr@10"] == 0.5
    assert st["top1_listed_first"] == 1.0
    assert st["top1_retrieval_rank"] == pytest.approx((1 + 3) / 2)
    # rho against listed position: user 1 scores fall with position (1.0); user 2: listed z, y, x scored 0, -2, -1
    # -> ranks of (-position) 3, 2, 1 vs scores' ranks 3, 1, 2: rho = 1 - 6 * (0 + 1 + 1) / (3 * 8) = 0.5
    assert st["rho_listed"] == pytest.approx((1.0 + 0.5) / 2)
    # against retrieval order x, y, z scored -1, -2, 0: ranks 3, 2, 1 vs 2, 1, 3: rho = 1 - 6 * (1 + 1 + 4) / 24 = -0.5
    assert st["rho_retrieval"] == pytest.approx((1.0 - 0.5) / 2)


def test_calibrate_subtracts_the_prior_of_the_listed_position(pb):
    # letter scores a=-1 (listed 1st), b=-2, c=-3; prior -0.5, -3, -3.5 -> a -0.5, b 1.0, c 0.5
    got = pb.calibrate([("a", -1.0), ("b", -2.0), ("c", -3.0)], ["a", "b", "c"], np.array([-0.5, -3.0, -3.5]))
    assert got == [("b", 1.0), ("c", 0.5), ("a", -0.5)]
    # ties keep the listed order
    assert [i for i, _ in pb.calibrate([("a", 0.0), ("b", 0.0)], ["b", "a"], np.zeros(2))] == ["b", "a"]
