"""eval/zeroshot.py: paired AUC ratios of the tuned LLM rows against the in-domain references."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def zs(load_script):
    return load_script("eval/zeroshot.py")


def test_paired_auc_rows_compare_tuned_rows_with_each_reference_present(zs):
    labels = [1, 0, 1, 0]
    rows = {"d": [{"user_id": str(i), "item_id": "x", "label": y} for i, y in enumerate(labels)]}
    table = [
        {"domain": "d", "method": "retrieval alone", "ndcg@10": 0.1},  # no P(Yes): not a Yes/No row
        {"domain": "d", "method": "LLM base (zero-shot)", "p_yes": [0.1, 0.9, 0.2, 0.8]},  # not tuned: skipped
        {"domain": "d", "method": "LLM + A adapter (in-domain)", "p_yes": [0.9, 0.1, 0.8, 0.2]},  # AUC 1
        {"domain": "d", "method": "MF (in-domain)", "p_yes": [0.9, 0.2, 0.1, 0.8]},  # pairs (1>0): 2 of 4 -> AUC 0.5
        {"domain": "e", "method": "BERT+LSTM (in-domain)", "p_yes": [0.5]},  # another domain: never a reference
    ]
    out = zs.paired_auc_rows(table, rows, seed=0)
    assert [(r["method"], r["vs"]) for r in out] == [("LLM + A adapter (in-domain)", "MF (in-domain)")]
    assert out[0]["auc_ratio"] == pytest.approx(2.0)
    assert out[0]["n"] == 4
    assert out[0]["p_ge_1"] == 1.0  # a perfect ranking is at least as good in every resample
