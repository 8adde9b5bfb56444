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


def test_refresh_baselines_replaces_only_the_baseline_rows(zs, tmp_path, monkeypatch):
    import json
    import types

    import pandas as pd

    from llmrec import bench_utils

    monkeypatch.setattr(bench_utils, "RESULTS_DIR", tmp_path)
    yn_rows = [{"user_id": "1", "item_id": "x", "label": 1}, {"user_id": "2", "item_id": "y", "label": 0}]
    args = {"yesno_examples": 2, "rank_users": 5, "seed": 0, "retriever": "hybrid", "retrieval_weight": 4.0,
            "likelihood_weight": 1.0, "label": ""}
    llm = {"domain": "d", "method": "LLM + A adapter (in-domain)", "auc": 0.6, "p_yes": [0.9, 0.1], "ndcg@10": 0.2}
    old = {"dataset": "d, g", "commit": "abc", "machine": "old box", "created": "2026-01-02T03:04:05+00:00",
           "command": "zeroshot.py --ml-adapter A", "args": args, "yesno_rows": {"d": yn_rows},
           "contamination": {"rate": 0.0},
           "table": [{"domain": "d", "method": "retrieval alone (hybrid)", "ndcg@10": 0.1}, llm,
                     {"domain": "d", "method": "MF (in-domain)", "auc": 0.5, "p_yes": [0.2, 0.8], "ndcg@10": 0.9},
                     {"domain": "d", "method": "BPR (in-domain)", "ndcg@10": 0.9},
                     {"domain": "d", "method": "counts figure alone (no model)", "auc": 0.7, "p_yes": [0.6, 0.4]},
                     {"domain": "g", "method": "LLM base (zero-shot)", "ndcg@10": 0.3},
                     {"domain": "g", "method": "BPR (in-domain)", "ndcg@10": 0.9}]}
    (tmp_path / "zeroshot.json").write_text(json.dumps(old))
    monkeypatch.setattr(zs, "load_prepared", lambda name, **kw: types.SimpleNamespace(name=name))
    monkeypatch.setattr(zs, "yesno_subset", lambda ds, *a: pd.DataFrame(yn_rows))
    monkeypatch.setattr(zs, "counts_only_p_yes", lambda ds, ex: [0.6, 0.4])
    seen = []

    def fresh_rows(ds, a, yn):
        seen.append((ds.name, yn is not None, a.rank_users))
        rows = [{"domain": ds.name, "method": "BPR (in-domain)", "ndcg@10": 0.05}]
        if yn is not None:
            rows.insert(0, {"domain": ds.name, "method": "MF (in-domain)", "auc": 0.5, "p_yes": [0.2, 0.8],
                            "ndcg@10": 0.01})
        return rows

    monkeypatch.setattr(zs, "in_domain_rows", fresh_rows)
    zs.refresh_baselines("")
    new = json.loads((tmp_path / "zeroshot.json").read_text())
    assert seen == [("d", True, 5), ("g", False, 5)]  # the recorded settings, Yes/No rows only where recorded
    assert [(r["domain"], r["method"], r.get("ndcg@10")) for r in new["table"]] == [
        ("d", "retrieval alone (hybrid)", 0.1), ("d", "LLM + A adapter (in-domain)", 0.2),
        ("d", "MF (in-domain)", 0.01), ("d", "BPR (in-domain)", 0.05), ("d", "counts figure alone (no model)", None),
        ("g", "LLM base (zero-shot)", 0.3), ("g", "BPR (in-domain)", 0.05)]
    assert new["llm_rows_from"] == {"commit": "abc", "machine": "old box", "created": "2026-01-02T03:04:05+00:00"}
    assert new["command"].startswith("zeroshot.py --ml-adapter A; then ")
    assert [(r["method"], r["vs"]) for r in new["paired_auc"]] == [
        ("LLM + A adapter (in-domain)", "MF (in-domain)"),
        ("LLM + A adapter (in-domain)", "counts figure alone (no model)")]
    md = (tmp_path / "zeroshot.md").read_text()
    assert "Every other figure is from the run of 2026-01-02T03:04 at abc on old box" in md
    assert "--refresh-baselines" in md and "--refresh-contamination" not in md

    monkeypatch.setattr(zs, "yesno_subset", lambda ds, *a: pd.DataFrame(yn_rows[::-1]))
    before = (tmp_path / "zeroshot.json").read_text()
    with pytest.raises(SystemExit, match="Yes/No test rows are not the recorded ones"):
        zs.refresh_baselines("")
    assert (tmp_path / "zeroshot.json").read_text() == before

    # then only the probe: the recorded settings, every table row kept, both refreshes said, the LLM rows' source kept
    calls = []
    monkeypatch.setattr(zs, "load_backend", lambda kind, **kw: calls.append((kind, kw)) or "base")
    monkeypatch.setattr(zs, "contamination_probe",
                        lambda be, ds, n, seed: calls.append((be, ds.name, n, seed)) or {"rate": 0.25, "n": n})
    old_args = json.loads(before)["args"]
    json_args = {**old_args, "contamination_n": 7, "dtype": "float32"}
    (tmp_path / "zeroshot.json").write_text(json.dumps({**json.loads(before), "args": json_args}))
    zs.refresh_contamination("")
    after = json.loads((tmp_path / "zeroshot.json").read_text())
    assert calls == [("transformers", {"dtype": "float32"}), ("base", "ml-100k", 7, 0)]
    assert after["contamination"] == {"rate": 0.25, "n": 7}
    assert after["table"] == json.loads(before)["table"] and after["paired_auc"] == json.loads(before)["paired_auc"]
    assert after["llm_rows_from"]["commit"] == "abc" and "baselines_refreshed" in after
    assert after["command"].count("; then ") == 2
    md = (tmp_path / "zeroshot.md").read_text()
    assert "--refresh-baselines" in md and "--refresh-contamination" in md and "at abc on old box" in md
