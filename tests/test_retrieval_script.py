"""eval/retrieval.py: the validation choice of a fusion weight (hybrid text weight, ensemble weight)."""

from __future__ import annotations


def test_select_weight_takes_best_recall20_then_recall50_and_records_each(load_script, monkeypatch):
    script = load_script("eval/retrieval.py")
    r20 = {0.1: 0.2, 0.25: 0.3, 0.5: 0.3, 1.0: 0.1}
    r50 = {0.1: 0.2, 0.25: 0.4, 0.5: 0.5, 1.0: 0.1}
    monkeypatch.setattr(script, "recalls", lambda ds, w, split, n: {"recall@20": r20[w], "recall@50": r50[w]})
    valid: dict = {}
    got = script.select_weight(None, "hybrid:sasrec(w_text={w})", script.GRID, lambda w: w, valid, None)
    assert got == 0.5  # 0.25 and 0.5 tie on Recall@20; Recall@50 decides
    assert sorted(valid) == [f"hybrid:sasrec(w_text={w})" for w in (0.1, 0.25, 0.5, 1.0)]  # the table's row names
    assert valid["hybrid:sasrec(w_text=0.25)"] == {"recall@20": 0.3, "recall@50": 0.4}
