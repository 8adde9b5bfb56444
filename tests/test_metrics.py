"""Metrics against values computed by hand."""

import math

import numpy as np
import pytest

from llmrec import metrics as M


def test_auc_hand_computed():
    # positives 0.8, 0.4; negatives 0.5, 0.1 -> pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) = 3/4
    assert M.auc([1, 0, 1, 0], [0.8, 0.5, 0.4, 0.1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: pairs (0.9>0.5, 0.9>0.1, 0.5=0.5, 0.5>0.1) = 3.5/4
    assert M.auc([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.875)
    assert M.auc([1, 1, 0], [0.1, 0.2, 0.3]) == 0.0
    assert math.isnan(M.auc([1, 1], [0.1, 0.2]))


def test_auc_refuses_nan_scores():
    # a NaN would sort above every real score and count as a win for a positive
    with pytest.raises(ValueError, match="1 of 3 scores are NaN"):
        M.auc([1, 0, 0], [float("nan"), 0.5, 0.1])


def test_auc_matches_pairwise_definition_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 10, 200) / 10  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert M.auc(y, s) == pytest.approx(pairwise)


def test_classification_counts():
    y = [1, 1, 1, 0, 0]
    p = [1, 0, 1, 1, 0]  # TP=2 FN=1 FP=1 TN=1
    assert M.confusion(y, p) == (2, 1, 1, 1)
    assert M.accuracy(y, p) == pytest.approx(3 / 5)
    assert M.precision(y, p) == pytest.approx(2 / 3)
    assert M.recall(y, p) == pytest.approx(2 / 3)
    assert M.f1(y, p) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert M.f1([1, 0], [0, 0]) == 0.0
    out = M.classification_metrics(y, [0.9, 0.2, 0.7, 0.6, 0.1])
    assert out["accuracy"] == pytest.approx(3 / 5) and out["n"] == 5
    # a probability equal to the threshold is a Yes (p >= t): TP 1, TN 1 -> every metric 1
    at = M.classification_metrics([1, 0], [0.5, 0.49])
    assert (at["accuracy"], at["precision"], at["recall"], at["f1"]) == (1.0, 1.0, 1.0, 1.0)


def test_ranks_pessimistic_ties_and_exclusion():
    scores = np.array([[0.1, 0.9, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    # user 0: target item 2 (0.5) ties with item 3 -> pessimistic rank 1 (item 1) + 1 (tie) + 1 = 3
    # excluding item 1 (history) -> rank 2
    assert M.ranks_from_scores(scores, np.array([2, 0])).tolist() == [3, 4]
    assert M.ranks_from_scores(scores, np.array([2, 0]), [np.array([1]), np.array([3])]).tolist() == [2, 3]
    with pytest.raises(ValueError, match="target"):
        M.ranks_from_scores(scores, np.array([1, 0]), [np.array([1]), np.array([])])


def test_ranking_metrics_hand_computed():
    ranks = np.array([1, 3, 12])
    assert M.hit_rate_at_k(ranks, 10) == pytest.approx(2 / 3)
    assert M.recall_at_k(ranks, 10) == pytest.approx(2 / 3)
    assert M.ndcg_at_k(ranks, 10) == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 3)
    assert M.mrr_at_k(ranks, 10) == pytest.approx((1 + 1 / 3) / 3)
    assert M.ndcg_at_k(ranks, 20) == pytest.approx((1 + 0.5 + 1 / math.log2(13)) / 3)
    out = M.ranking_metrics(ranks, ks=(10,))
    assert set(out) == {"n_users", "hr@10", "recall@10", "ndcg@10", "mrr@10"}


def test_best_threshold_hand_computed():
    from llmrec.metrics import best_threshold

    # all P(Yes) < 0.5: at 0.5 accuracy is 2/5; between 0.2 and 0.3 every example is right
    assert best_threshold([0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.35, 0.4]) == pytest.approx(0.25)
    # no threshold separates equal scores: every candidate gives 1/2, the tie goes to 0.5
    assert best_threshold([1, 0], [0.6, 0.6]) == 0.5
    # inverted scores: best is to say Yes to everything (1 of 3 wrong) or No to everything (2 of 3 wrong) -> all Yes
    t = best_threshold([1, 1, 0], [0.1, 0.2, 0.9])
    assert t <= 0.1 and best_threshold([], []) == 0.5


def test_metrics_at_valid_threshold_hand_computed():
    from llmrec.metrics import metrics_at_valid_threshold

    # valid: every score < 0.5, the best threshold is 0.25 (between 0.2 and 0.3)
    valid_y, valid_p = [0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.35, 0.4]
    # test at 0.25: predictions 0, 1, 1, 0 against labels 0, 1, 0, 1 -> TP 1, FP 1, TN 1, FN 1
    test_y, test_p = [0, 1, 0, 1], [0.05, 0.3, 0.45, 0.2]
    out = metrics_at_valid_threshold(valid_y, valid_p, test_y, test_p)
    assert out["threshold"] == pytest.approx(0.25)
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(0.5)
    # at the fixed 0.5 the same test scores are all No: accuracy 2/4, F1 0
    at_half = metrics_at_valid_threshold([0, 1], [0.4, 0.6], test_y, test_p)
    assert at_half["threshold"] == pytest.approx(0.5) and at_half["f1"] == 0.0


def test_random_order_metrics_hand_computed():
    # 2 candidates: rank 1 or 2 with probability 1/2 each
    m = M.random_order_metrics(2)
    assert m["hr@10"] == 1.0 and m["mrr@10"] == pytest.approx(0.75)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1.0 / math.log2(3)) / 2)
    m = M.random_order_metrics(20)  # half the ranks are in the top 10
    assert m["hr@10"] == 0.5 and m["ndcg@10"] == pytest.approx(0.2272, abs=1e-4)
    # (1 + 1/2 + ... + 1/10) / 20 = 2.928968 / 20
    assert m["mrr@10"] == pytest.approx(0.1464484, abs=1e-6)
    # the average over every rank of the exact per-rank metrics
    ranks = np.arange(1, 21)
    assert m["ndcg@10"] == pytest.approx(M.ndcg_at_k(ranks, 10))
    assert m["mrr@10"] == pytest.approx(M.mrr_at_k(ranks, 10))


def test_paired_bootstrap_ratio_hand_computed():
    # two rows, metric = mean: a resample is {0,0} (ratio 1/1), {1,1} (3/1) or mixed (2/1) with probability
    # 1/4, 1/4, 1/2, so the 95% interval is exactly [1, 3] and r* >= 1 always; the point ratio is 2
    out = M.paired_bootstrap_ratio(np.mean, np.array([1.0, 3.0]), np.array([1.0, 1.0]), n_boot=4000, seed=1)
    assert out["ratio"] == 2.0 and (out["lo"], out["hi"]) == (1.0, 3.0) and out["p_ge_1"] == 1.0
    # the pairing matters: the same rows are drawn for both methods, so identical methods give exactly 1
    r = np.array([1, 2, 30, 4, 5])
    same = M.paired_bootstrap_ratio(lambda x: M.ndcg_at_k(x, 10), r, r.copy(), n_boot=200)
    assert (same["lo"], same["hi"]) == (1.0, 1.0)
    # AUC: a and b stack labels with scores; b = a's scores reversed -> a's AUC 1, b's 0 -> every ratio inf, dropped
    y = np.array([0, 0, 1, 1])
    a = np.column_stack([y, [0.1, 0.2, 0.8, 0.9]])
    b = np.column_stack([y, [0.9, 0.8, 0.2, 0.1]])
    c = np.column_stack([y, [0.1, 0.8, 0.2, 0.9]])  # AUC 0.75
    out = M.paired_bootstrap_ratio(lambda m: M.auc(m[:, 0], m[:, 1]), a, c, n_boot=300)
    assert out["ratio"] == pytest.approx(1 / 0.75) and out["lo"] >= 1.0 and out["p_ge_1"] == 1.0
    assert M.paired_bootstrap_ratio(lambda m: M.auc(m[:, 0], m[:, 1]), a, b, n_boot=50)["n_boot"] == 0
    with pytest.raises(ValueError, match="same rows"):
        M.paired_bootstrap_ratio(np.mean, np.ones(3), np.ones(4))


def test_stratified_auc_hand_computed():
    # stratum a: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) = 3/4 over 4 pairs; stratum b: its one pair misordered
    # (0.1 < 0.9) = 0; stratum c holds only positives: no pair -> (4 * 0.75 + 1 * 0) / 5 = 0.6
    labels = [1, 0, 1, 0, 1, 0, 1, 1]
    scores = [0.8, 0.5, 0.4, 0.1, 0.1, 0.9, 0.3, 0.7]
    strata = ["a", "a", "a", "a", "b", "b", "c", "c"]
    assert M.stratified_auc(labels, scores, strata) == pytest.approx(0.6)
    # pooled, the cross-stratum pairs count too: not the same figure
    assert M.auc(labels, scores) != pytest.approx(0.6)
    # a score constant within each stratum tells nothing apart inside them: every pair a tie
    assert M.stratified_auc(labels, [1, 1, 1, 1, 2, 2, 3, 3], strata) == pytest.approx(0.5)
    assert math.isnan(M.stratified_auc([1, 0], [0.2, 0.1], ["a", "b"]))


def test_spearman_hand_computed():
    # ranks (1, 2, 3) vs (1, 3, 2), centred (-1, 0, 1) and (-1, 1, 0): dot 1 over sqrt(2 * 2) = 0.5
    assert M.spearman([0.1, 0.2, 0.3], [10, 30, 20]) == pytest.approx(0.5)
    # monotone, not linear: 1; reversed: -1
    assert M.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: (1, 2.5, 2.5, 4) vs (1, 2, 3, 4) -> 4.5 / sqrt(4.5 * 5) = 0.9487
    assert M.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))


def test_logit_is_clipped_and_inverts_the_sigmoid():
    from llmrec.metrics import logit

    p = np.array([0.2, 0.5, 0.9])
    np.testing.assert_allclose(1 / (1 + np.exp(-logit(p))), p)
    np.testing.assert_allclose(logit([0.5, 0.75]), [0.0, np.log(3.0)])
    assert np.all(np.isfinite(logit([0.0, 1.0])))


def test_paired_auc_ratio_is_the_paired_bootstrap_of_auc():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    a, b = y + rng.normal(0, 0.5, 60), y + rng.normal(0, 1.5, 60)
    got = M.paired_auc_ratio(y, a, b, n_boot=200, seed=3)
    want = M.paired_bootstrap_ratio(lambda m: M.auc(m[:, 0], m[:, 1]), np.column_stack([y, a]),
                                    np.column_stack([y, b]), n_boot=200, seed=3)
    assert got == want
    assert got["ratio"] == pytest.approx(M.auc(y, a) / M.auc(y, b)) and got["ratio"] > 1


def test_ranks_from_scores_counts_nan_as_minus_infinity():
    """A NaN score (a model that failed on an item) ranks below every real score, pessimistic ties included: by
    hand, row 0's target scores 0.5 with one item above it (0.9) and one NaN -> rank 2; row 1's target is NaN, so
    every other item (two real, one NaN tie) ranks at or above it -> rank 4."""
    scores = np.array([[0.9, np.nan, 0.5, 0.1], [0.3, np.nan, 0.2, np.nan]])
    assert M.ranks_from_scores(scores, np.array([2, 1])).tolist() == [2, 4]
    assert np.isnan(scores[0, 1])  # the caller's array is left as it was


def test_binary_metrics_refuse_labels_that_are_not_0_or_1_and_mismatched_lengths():
    """Cast to bool, a label 2, -1 or 0.5 counted as a positive: by hand, labels [2, 0, 1] with scores [0.1, 0.2,
    0.3] gave AUC 0.5 (as if [1, 0, 1]) instead of an error. Labels and scores of different lengths failed inside
    numpy's indexing; they now name the counts."""
    for bad in ([2, 0, 1], [-1, 0, 1], [0.5, 0, 1], ["yes", "no", "yes"], [float("nan"), 0, 1]):
        with pytest.raises(ValueError, match="labels must be 0 or 1; row 0"):
            M.auc(bad, [0.1, 0.2, 0.3])
        with pytest.raises(ValueError, match="labels must be 0 or 1; row 0"):
            M.confusion(bad, [1, 0, 1])
    with pytest.raises(ValueError, match="labels must be 0 or 1; row 0"):
        M.stratified_auc([2, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="auc: 3 labels for 2 scores"):
        M.auc([1, 0, 1], [0.5, 0.2])
    with pytest.raises(ValueError, match="confusion: 2 labels for 3 predictions"):
        M.confusion([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="3 strata for 4 scores"):
        M.stratified_auc([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], [0, 0, 0])
    # 0 / 1 as ints, floats, bools or numeric text all read the same
    for ok in ([1, 0, 1, 0], [1.0, 0.0, 1.0, 0.0], [True, False, True, False], np.array([1, 0, 1, 0], np.int8)):
        assert M.auc(ok, [0.8, 0.5, 0.4, 0.1]) == pytest.approx(0.75)


def test_ranks_from_scores_refuses_item_indices_outside_the_catalogue():
    """numpy wraps a negative index around: target -1 was ranked as the last item (rank 1 here, by hand: 0.9 is the
    highest score) and an excluded -1 removed the last item, both without a word."""
    scores = np.array([[0.1, 0.5, 0.9]])
    with pytest.raises(ValueError, match=r"row 0: target item index -1 is outside 0..2"):
        M.ranks_from_scores(scores, np.array([-1]))
    with pytest.raises(ValueError, match=r"row 0: target item index 3 is outside 0..2"):
        M.ranks_from_scores(scores, np.array([3]))
    with pytest.raises(ValueError, match=r"row 0: excluded item index -1 is outside 0..2"):
        M.ranks_from_scores(scores, np.array([0]), [np.array([-1])])
    with pytest.raises(ValueError, match=r"row 0: excluded item index 5 is outside 0..2"):
        M.ranks_from_scores(scores, np.array([0]), [np.array([1, 5])])
    with pytest.raises(ValueError, match=r"2 targets for scores of shape \(1, 3\)"):
        M.ranks_from_scores(scores, np.array([0, 1]))
    assert M.ranks_from_scores(scores, np.array([0]), [np.array([2])]).tolist() == [2]


def test_ranking_metrics_refuse_ranks_below_one_and_give_nan_for_no_users():
    """A 0-based rank made NDCG divide by log2(1) = 0 (inf, with a RuntimeWarning) and MRR by 0; no users gave NaN
    with numpy's 'mean of empty slice' warning. Now: a clear error naming the user, and a quiet, documented NaN."""
    import warnings

    for bad in ([1, 0, 3], [2, np.nan], [-1]):
        with pytest.raises(ValueError, match=r"ranks must be finite and >= 1 .* user \d+ of \d+"):
            M.ranking_metrics(np.array(bad, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = M.ranking_metrics(np.array([], dtype=np.int64), ks=(10,))
    assert out["n_users"] == 0 and all(np.isnan(out[m]) for m in ("hr@10", "recall@10", "ndcg@10", "mrr@10"))
    with pytest.raises(ValueError, match="n=0"):
        M.random_order_metrics(0)
