"""Audit of how reported figures are computed: the paired bootstrap's "ahead" share (ties are not wins), the README
headline's explanation row (never another row's figures under the default mode's name) and the bench's verbalizer
vs generate timing (the same users, each mode warmed up). Expectations are derived by hand in the comments."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llmrec import metrics as M


def ndcg10(r: np.ndarray) -> float:
    return M.ndcg_at_k(r, 10)


# ------------------------------------------------------------------------------------- paired bootstrap: "ahead"
def test_identical_methods_are_never_ahead():
    # the same per-user ranks on both sides: every resample's ratio is exactly 1 -> at least as good in 100% of
    # resamples, strictly ahead in 0% (reporting p_ge_1 as "ahead" said 100% for a method against itself)
    r = np.array([1, 2, 30, 4, 5])
    out = M.paired_bootstrap_ratio(ndcg10, r, r.copy(), n_boot=500)
    assert (out["ratio"], out["lo"], out["hi"]) == (1.0, 1.0, 1.0)
    assert out["p_ge_1"] == 1.0
    assert out["p_gt_1"] == 0.0


def test_ahead_share_hand_computed_on_swapped_ranks():
    # user 0: a rank 1 (NDCG 1), b rank 3 (NDCG 1/log2 4 = 0.5); user 1: the reverse. A resample of 2 users is
    # {0,0} -> ratio 1 / 0.5 = 2, {1,1} -> 0.5 / 1 = 0.5, {0,1} in either order -> 1.5 / 1.5 = 1. So
    # p_gt_1 = share of resamples drawing user 0 twice, p_ge_1 = that plus the mixed ones.
    a, b = np.array([1, 3]), np.array([3, 1])
    n_boot, seed = 4000, 3
    out = M.paired_bootstrap_ratio(ndcg10, a, b, n_boot=n_boot, seed=seed)
    draws = np.random.default_rng(seed).integers(0, 2, size=(n_boot, 2)).sum(axis=1)  # 0: {0,0}, 1: mixed, 2: {1,1}
    assert out["p_gt_1"] == pytest.approx(np.mean(draws == 0))
    assert out["p_ge_1"] == pytest.approx(np.mean(draws <= 1))
    assert 0.2 < out["p_gt_1"] < 0.3 and 0.7 < out["p_ge_1"] < 0.8  # about 1/4 and 3/4
    assert out["ratio"] == 1.0 and (out["lo"], out["hi"]) == (0.5, 2.0)


def test_rank_ensemble_cell_says_ahead_only_for_a_strict_win(load_script):
    pytest.importorskip("faiss")
    mod = load_script("eval/rank_ensemble.py")
    r = np.array([1, 2, 30, 4, 5])
    # recorded before the fix: "1.000 (1.00-1.00, ahead 100%)" for the ensemble against itself
    assert mod.ratio_cell(M.paired_bootstrap_ratio(ndcg10, r, r.copy())) == "1.000 (1.00-1.00, ahead 0%, >= 100%)"


@pytest.fixture(scope="module")
def report(load_script):
    return load_script("eval/report.py")


def _bench_json(tmp_path: Path, ci: dict) -> None:
    methods = {"bert_lstm": {"ndcg@10": 0.1, "hr@10": 0.2}, "llm tuned": {"ndcg@10": 0.1, "hr@10": 0.2}}
    goals = {"ndcg@10": {"ratio": 1.0, "goal_ratio": 1.15, "met": False, "best_other_name": "bert_lstm",
                         "tuned_llm": 0.1, "best_other": 0.1, "tuned_name": "llm tuned", "rows": "users",
                         "ci": {"ratio": 1.0, "lo": 1.0, "hi": 1.0, "level": 0.95, "n": 200, "n_boot": 2000, **ci}}}
    (tmp_path / "bench_ml-100k.json").write_text(json.dumps(
        {"methods": methods, "goals": goals, "dataset": "ml-100k", "command": "llmrec bench", "commit": "abc",
         "machine": "m", "protocol": {"next_item": "loo", "yesno": "time"}}))


def test_report_says_ahead_from_the_strict_share(report, tmp_path):
    _bench_json(tmp_path, {"p_ge_1": 1.0, "p_gt_1": 0.0})
    text = report.section(tmp_path)
    assert "tuned LLM ahead in 0% of resamples" in text
    assert "ahead in 100%" not in text


def test_report_names_an_old_runs_share_for_what_it_is(report, tmp_path):
    # a JSON recorded before p_gt_1 existed holds only p_ge_1 (ties included): not to be called "ahead"
    _bench_json(tmp_path, {"p_ge_1": 1.0})
    text = report.section(tmp_path)
    assert "tuned LLM at least as good in 100% of resamples" in text
    assert "ahead in" not in text


# ------------------------------------------------------------------------------------- report: the right row
def test_glance_refuses_explanations_without_the_default_row(report, tmp_path):
    _bench_json(tmp_path, {"p_ge_1": 0.5, "p_gt_1": 0.5})
    rows = [{"explanations": "free text", "n": 40, "fallback_rate": 0.9, "hallucination_rate": 0.025,
             "mean_words": 35.8, "s_per_user": 0.61},
            {"explanations": report.DEFAULT_EXPLANATIONS + ", frequency_penalty 0", "n": 40, "fallback_rate": 0.025,
             "hallucination_rate": 0.0, "mean_words": 26.5, "s_per_user": 1.25}]
    (tmp_path / "explanations_ml-100k.json").write_text(json.dumps({"rows": rows, "command": "python e.py",
                                                                     "commit": "abc", "machine": "m"}))
    # before: the last row's 3% / 27 words / 1.25 s printed as "the default mode"
    with pytest.raises(ValueError, match="default mode"):
        report.glance(tmp_path)


# ------------------------------------------------------------------------------------- verbalizer vs generate
def test_verbalizer_and_generate_are_timed_on_the_same_users_after_a_warm_up(monkeypatch):
    from llmrec import bench

    calls = []
    secs = {"verbalizer": 0.2, "generate": 3.0}

    def fake_eval_rank(rec, ds, max_users=200, seed=0, mode=None, retrieval_only=False, split="test",
                       return_ranks=False):
        calls.append({"users": max_users, "seed": seed, "mode": mode, "split": split,
                      "cache_empty": rec.llm_cache == {}})
        if mode == "verbalizer":
            rec.llm_cache["prompt"] = 1.0  # what a scoring run leaves in the cache
        if mode == "generate":
            rec.generate_totals["users"] += max_users
        return {"seconds_per_user": secs[mode], "ndcg@10": 0.05, "n_users": max_users}

    monkeypatch.setattr("llmrec.ranking.evaluate.eval_rank", fake_eval_rank)
    from collections import Counter

    cached = {"scored on valid": 0.5}
    rec = SimpleNamespace(llm_cache=cached, generate_totals=Counter())
    out = bench.time_verbalizer_vs_generate(rec, object(), 10, 7)
    # warm-up first, one validation user per mode, untimed; then both modes on the same 10 seeded test users
    assert [(c["mode"], c["split"], c["users"]) for c in calls] == [
        ("verbalizer", "valid", 1), ("generate", "valid", 1), ("verbalizer", "test", 10), ("generate", "test", 10)]
    assert all(c["seed"] == 7 for c in calls)
    assert calls[2]["cache_empty"]  # the timed verbalizer run computes every score it ranks by
    assert out["users"] == 10 and out["verbalizer_s_per_user"] == 0.2 and out["generate_s_per_user"] == 3.0
    assert out["speedup"] == pytest.approx(15.0)  # 3.0 / 0.2
    assert out["generate_mapping"] == {"users": 10}  # the timed run only, not the warm-up's user
    assert rec.llm_cache is cached and cached == {"scored on valid": 0.5}  # the caller's cache is back untouched


# ------------------------------------------------------------------------------------- bench protocol line
def test_bench_protocol_counts_the_users_actually_scored():
    import pandas as pd

    from llmrec.bench import BenchConfig, protocol

    ds = SimpleNamespace(n_items=50, targets=lambda split: pd.DataFrame({"user_id": ["a", "b", "c"]}))
    ex = pd.DataFrame({"label": [1, 0, 1, 1]})
    # rank_users 200 on a dataset with 3 test users scores 3 of them, all: the line said "200 users (seed 0)"
    p = protocol(ds, BenchConfig(rank_users=200), ex, None, ["a", "b", "c"])
    assert "; 3 users (all of them) for every method; baselines also on all 3 users" in p["next_item"]
    p = protocol(ds, BenchConfig(rank_users=2, seed=4), ex, None, ["a", "c"])
    assert "; 2 users (seed 4) for every method" in p["next_item"]
    assert p["yesno"] == ("time-split test examples, fixed subset of 4 (seed 4), positive rate 0.750; "
                          "accuracy/f1 at 0.5")


def test_ranking_modes_times_every_mode_warm(load_script, monkeypatch):
    mod = load_script("eval/ranking_modes.py")
    from collections import Counter

    calls = []

    def fake_eval_rank(rec, ds, max_users=200, seed=0, mode=None, retrieval_only=False, split="test",
                       return_ranks=False):
        calls.append((mode, retrieval_only, split, max_users, seed))
        rec.generate_totals["users"] += max_users
        return {"n_users": max_users, "ndcg@10": 0.1}

    monkeypatch.setattr(mod, "eval_rank", fake_eval_rank)
    rec = SimpleNamespace(generate_totals=Counter())
    for mode in (None, "verbalizer", "generate"):
        calls.clear()
        r, s = mod.timed_rank(rec, object(), 20, 3, mode)
        # one untimed validation user of the same mode first, then the 20 test users
        assert calls == [(mode, mode is None, "valid", 1, 3), (mode, mode is None, "test", 20, 3)]
        assert r["n_users"] == 20 and s >= 0
        assert rec.generate_totals == {"users": 20}  # the warm-up's generation not counted in the row
