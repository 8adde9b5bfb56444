"""Audit of the eval/ scripts' honesty: counts on the command line, the report's loudness on a bad result file."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from llmrec.bench_utils import count_or_all, positive_int


class Loaded(Exception):
    """Raised in place of loading a dataset: the script got past its argument checks."""


def _refuse_load(*_a, **_k):
    raise Loaded


def _usage_error(load_script, monkeypatch, capsys, script: str, argv: list[str],
                 stubs: tuple[str, ...] = ("load_prepared", "load_backend")) -> str:
    """Run `script` with `argv`, its loaders (`stubs`) raising `Loaded`: expect argparse's exit 2 before any of
    them; returns stderr."""
    mod = load_script(script)
    for name in stubs:
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, _refuse_load)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == 2
    return capsys.readouterr().err


# (script, argv): a count of 0 would score no user / row at all (or a negative one crashes deep in pandas), so each
# must be refused as a usage error (exit 2) before anything is loaded; where 0 says "all", a negative count
@pytest.mark.parametrize("script, argv", [
    ("eval/pointwise_rank.py", ["--adapter", "x", "--users", "0"]),
    ("eval/pointwise_rank.py", ["--adapter", "x", "--users", "-3"]),
    ("eval/position_bias.py", ["--users", "0"]),
    ("eval/position_bias.py", ["--listings", "0"]),
    ("eval/zeroshot.py", ["--rank-users", "0"]),
    ("eval/zeroshot.py", ["--yesno-examples", "-1"]),
    ("eval/rank_ensemble.py", ["--users", "-5"]),
    ("eval/rank_ensemble.py", ["--valid-users", "-1"]),
    ("eval/title_prior.py", ["--users", "-1"]),
    ("eval/title_prior.py", ["--valid-users", "-2"]),
    ("eval/yesno_blend.py", ["--valid-examples", "0"]),
    ("eval/ranking_modes.py", ["--users", "0"]),
    ("eval/explanations.py", ["--users", "0"]),
    ("eval/zeroshot.py", ["--retrieval-weight", "-1"]),
    ("eval/zeroshot.py", ["--likelihood-weight", "nan"]),
    # an unknown retriever was refused only after the dataset (explanations: and the model) had loaded
    ("eval/explanations.py", ["--retriever", "hybird"]),
    ("eval/pointwise_rank.py", ["--adapter", "x", "--retriever", "bm25"]),
    ("eval/position_bias.py", ["--retriever", "x"]),
    ("eval/rank_ensemble.py", ["--retriever", "x"]),
    ("eval/ranking_modes.py", ["--retriever", "x"]),
    ("eval/score_batching.py", ["--retriever", "x"]),
    ("eval/title_prior.py", ["--retriever", "x"]),
    ("eval/ranking_modes.py", ["--titles", "0"]),
    ("eval/ranking_modes.py", ["--batch-size", "0"]),
    ("eval/explanations.py", ["--examples", "-1"]),
    ("eval/score_batching.py", ["--users", "0"]),
    ("eval/score_batching.py", ["--repeats", "0"]),
    ("eval/score_batching.py", ["--batch-sizes", "4,0"]),
    ("eval/retrieval.py", ["--batch-size", "0"]),
    ("eval/retrieval.py", ["--latency-users", "-1"]),
])
def test_a_count_of_zero_or_less_is_a_usage_error(load_script, monkeypatch, script, argv, tmp_path):
    mod = load_script(script)
    for name in ("load_prepared", "load_backend"):
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, _refuse_load)
    monkeypatch.setenv("LLMREC_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == 2


def test_count_types():
    assert positive_int("3") == 3 and count_or_all("0") == 0
    for bad in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        count_or_all("-1")


def test_report_names_a_malformed_result_file(load_script, tmp_path):
    report = load_script("eval/report.py")
    (tmp_path / "zeroshot.json").write_text('{"created": "2026-12-06", ')  # cut short
    with pytest.raises(ValueError, match="zeroshot.json"):
        report.section(tmp_path)
    (tmp_path / "zeroshot.json").write_text(json.dumps({"created": "2026-12-06", "commit": "abc"}))
    (tmp_path / "bench_ml-100k.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="bench_ml-100k.json"):
        report.glance(tmp_path)


def test_rank_ensemble_records_its_user_subsets_and_its_table_matches_the_json(load_script, monkeypatch, tmp_path):
    """The JSON names the exact (seeded) test and validation users it scored, carries the header, and every figure of
    its markdown table is the JSON's; weights come from the validation features only."""
    import types

    import numpy as np

    import llmrec.llm

    ens = load_script("eval/rank_ensemble.py")
    ens.write_result.__globals__["RESULTS_DIR"] = tmp_path
    rng = np.random.default_rng(0)
    uids = {"valid": ["7", "8", "9", "10"], "test": ["1", "2", "3", "4", "5", "6"]}
    calls = []

    def features(rec, ds, models, split, users, seed, llm):
        calls.append(split)
        n = len(uids[split])
        return rng.normal(size=(n, 5, 2 + len(models))), np.array([0, 1, -1, 3, 2, 4][:n]), uids[split]

    model = types.SimpleNamespace(score_items=None)
    monkeypatch.setattr(ens, "features", features)
    monkeypatch.setattr(ens, "load_prepared", lambda *a, **k: types.SimpleNamespace(n_items=50))
    monkeypatch.setattr(ens, "build_retriever", lambda *a, **k: model)
    monkeypatch.setattr(ens, "collaborative_model", lambda *a, **k: model)
    monkeypatch.setattr(ens, "Recommender", lambda *a, **k: None)
    monkeypatch.setattr(ens, "with_adapter_templates", lambda cfg, a: cfg)
    monkeypatch.setattr(llmrec.llm, "load_backend", lambda *a, **k: None)
    monkeypatch.setattr(ens, "evaluate_ranking", lambda *a, **k: {"ndcg@10": 0.25, "hr@10": 0.5, "mrr@10": 0.2,
                                                                  "n_users": 6, "ranks": [1, 3, 50, 2, 11, 4]})
    monkeypatch.setattr(sys, "argv", ["eval/rank_ensemble.py", "--baselines", "sasrec", "--grid", "0", "1",
                                      "--users", "6", "--name", "ens_audit"])
    ens.main()
    assert calls == ["valid", "test"]
    d = json.loads((tmp_path / "ens_audit.json").read_text())
    assert {"dataset", "commit", "machine", "command", "created"} <= set(d)
    assert d["test_user_ids"] == uids["test"] and d["valid_user_ids"] == uids["valid"]
    md = (tmp_path / "ens_audit.md").read_text()
    for row in d["rows"]:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row['method']} |"))
        for k in ("ndcg@10", "hr@10", "mrr@10"):
            assert f"{row[k]:.4f}" in line


# eval/baselines.py checked --models and --set only after load_prepared (which prepares a missing dataset), with exit
# 1; an unknown config key or a bad value surfaced only when that model's turn came, after the ones before it had
# trained (hours on ML-1M); an empty --models ended in UnboundLocalError
@pytest.mark.parametrize("argv, says", [
    (["--models", "mf,sasrex"], "--models: unknown"),
    (["--models", ","], "--models: no model named"),
    (["--set", "mf.lrr=0.1"], "unknown key"),
    (["--set", "sasrec.lr=fast"], "expected float"),
    (["--set", "lr=0.1"], "is not MODEL.KEY=VALUE"),
    (["--set", "mf=3"], "is not MODEL.KEY=VALUE"),
    (["--set", "mf.lr"], "expected key=value"),
])
def test_baselines_bad_models_or_overrides_are_usage_errors_before_loading(load_script, monkeypatch, capsys, argv,
                                                                            says):
    import llmrec.data

    mod = load_script("eval/baselines.py")
    monkeypatch.setattr(llmrec.data, "load_prepared", _refuse_load)
    monkeypatch.setattr(sys, "argv", ["eval/baselines.py", "--dataset", "ml-100k", *argv])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_baselines_good_arguments_reach_the_dataset(load_script, monkeypatch):
    import llmrec.data

    mod = load_script("eval/baselines.py")
    monkeypatch.setattr(llmrec.data, "load_prepared", _refuse_load)
    monkeypatch.setattr(sys, "argv", ["eval/baselines.py", "--dataset", "ml-100k", "--models", "mf,sasrec",
                                      "--set", "mf.lr=0.01", "sasrec.time_budget_s=60"])
    with pytest.raises(Loaded):
        mod.main()


# a grid weight of nan made every fused score nan: no candidate compared above the target, so each target the
# retriever listed ranked 1st, and validation chose that weight (rank_ensemble, title_prior); inf turned
# pointwise_rank's "P(Yes) + retrieval" row into the retrieval order; a nan penalty reached the logits
@pytest.mark.parametrize("script, argv", [
    ("eval/rank_ensemble.py", ["--grid", "0", "nan"]),
    ("eval/rank_ensemble.py", ["--grid", "inf"]),
    ("eval/rank_ensemble.py", ["--grid", "-1"]),
    ("eval/pointwise_rank.py", ["--adapter", "x", "--grid", "0", "inf"]),
    ("eval/pointwise_rank.py", ["--adapter", "x", "--grid", "nan"]),
    ("eval/title_prior.py", ["--grid", "nan"]),
    ("eval/title_prior.py", ["--prior-grid", "0", "-0.5"]),
    ("eval/explanations.py", ["--frequency-penalty", "nan"]),
    ("eval/explanations.py", ["--frequency-penalty", "0", "3"]),
])
def test_a_weight_that_is_not_a_finite_number_in_range_is_a_usage_error(load_script, monkeypatch, capsys, script,
                                                                         argv):
    err = _usage_error(load_script, monkeypatch, capsys, script, argv)
    assert f"argument {argv[-2] if argv[-2].startswith('--') else argv[-3]}" in err


def test_rank_ensemble_nan_weight_would_rank_every_listed_target_first(load_script):
    """Why the grid must be finite: target_ranks with a nan weight puts every listed target at rank 1."""
    import numpy as np

    ens = load_script("eval/rank_ensemble.py")
    feats = np.array([[[0.0, 5.0], [-0.7, 1.0], [-1.1, 0.0]]])  # the target (index 2) is last on both features
    assert ens.target_ranks(feats, np.array([1.0, 1.0]), np.array([2]), 99).tolist() == [3]
    assert ens.target_ranks(feats, np.array([1.0, np.nan]), np.array([2]), 99).tolist() == [1]


# arguments that parse one by one but not together: refused before anything loads, naming the options
@pytest.mark.parametrize("script, argv, says", [
    # before: no tuned rows at all (no adapter), and a result file of the retrieval row alone, without a word
    ("eval/title_prior.py", ["--models", "tuned"], "--models tuned needs --adapter"),
    ("eval/title_prior.py", ["--models", "zero-shot", "tuned"], "--models tuned needs --adapter"),
    # before: the recommender used 20 listings while the row said "+ 29 cyclic shifts", "shifted by 0.67 places"
    ("eval/position_bias.py", ["--listings", "30"], "--listings 30 is more than --candidates 20"),
    ("eval/position_bias.py", ["--listings", "5", "--candidates", "4"], "--listings 5 is more than --candidates 4"),
])
def test_contradictory_arguments_are_usage_errors(load_script, monkeypatch, capsys, script, argv, says):
    assert says in _usage_error(load_script, monkeypatch, capsys, script, argv)


@pytest.mark.parametrize("script, argv", [
    ("eval/title_prior.py", ["--models", "zero-shot"]),
    ("eval/title_prior.py", ["--models", "tuned", "--adapter", "a"]),
    ("eval/position_bias.py", ["--listings", "20"]),
])
def test_consistent_arguments_get_past_the_checks(load_script, monkeypatch, script, argv):
    mod = load_script(script)
    monkeypatch.setattr(mod, "load_prepared", _refuse_load)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(Loaded):
        mod.main()


@pytest.mark.parametrize("argv, says", [
    # before: only the baselines were refreshed, the probe silently not
    (["--refresh-baselines", "--refresh-contamination"], "one at a time"),
    # before: ignored (the recorded settings are used), yet written into the result's command as if they applied
    (["--refresh-baselines", "--seed", "3"], "--seed would be ignored"),
    (["--refresh-contamination", "--contamination-n", "50", "--dtype", "float32"],
     "--contamination-n, --dtype would be ignored"),
    (["--refresh-baselines", "--ml-adapter", "a"], "--ml-adapter would be ignored"),
    # before: FileNotFoundError traceback
    (["--refresh-baselines", "--label", "_nothere"], "no result to refresh"),
])
def test_zeroshot_refresh_with_other_options_is_a_usage_error(load_script, monkeypatch, capsys, tmp_path, argv, says):
    from llmrec import bench_utils

    mod = load_script("eval/zeroshot.py")
    (tmp_path / "zeroshot.json").write_text("{}")
    monkeypatch.setattr(bench_utils, "RESULTS_DIR", tmp_path)
    for name in ("load_prepared", "load_backend", "refresh_baselines", "refresh_contamination"):
        monkeypatch.setattr(mod, name, _refuse_load)
    monkeypatch.setattr(sys, "argv", ["eval/zeroshot.py", *argv])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--refresh-baselines"], ["--refresh-contamination", "--label", ""]])
def test_zeroshot_refresh_alone_goes_ahead(load_script, monkeypatch, tmp_path, argv):
    from llmrec import bench_utils

    mod = load_script("eval/zeroshot.py")
    (tmp_path / "zeroshot.json").write_text("{}")
    monkeypatch.setattr(bench_utils, "RESULTS_DIR", tmp_path)
    for name in ("refresh_baselines", "refresh_contamination"):
        monkeypatch.setattr(mod, name, _refuse_load)
    monkeypatch.setattr(sys, "argv", ["eval/zeroshot.py", *argv])
    with pytest.raises(Loaded):
        mod.main()


def _retrieval_result(n_scored: int) -> dict:
    rec = {"recall@20": 0.1, "recall@50": 0.2, "recall@100": 0.3, "ndcg@20": 0.05, "n_users": n_scored}
    lat = {"p50_ms": 1.0, "p95_ms": 2.0, "mean_ms": 1.2, "n": 50}
    return {"n_items": 1682, "n_users": 943, "selected_text_weight": 0.25, "bpr": "skipped (--no-bpr)",
            "test": {"text": dict(rec), "itemcf": dict(rec), "hybrid": dict(rec)}, "valid": {"text": dict(rec)},
            "goal": {"hybrid": "hybrid", "hybrid_recall@20": 0.1, "best_single": "text", "best_single_recall@20": 0.1,
                     "met": True, "paired": {"only_hybrid": 0, "only_single": 0, "sign_test_p": 1.0}},
            "settings": {"text": {"knn_tau": 0.1, "knn_neighbors": 50}},
            "encoding": {"items": 1682, "seconds": 1.0, "items_per_second": 1682.0, "batch_size": 64,
                         "mean_text_chars": 80.0, "model_load_seconds": 1.0},
            "query_latency": {"text_knn(flat)": lat}, "ivf_nlist": 40, "ivf_top100_overlap_with_flat": 0.9}


def test_retrieval_table_names_the_user_subset_it_scored(load_script):
    ret = load_script("eval/retrieval.py")
    head = ret.table(_retrieval_result(943)).splitlines()[0]
    assert "(943 users)" in head  # every test user: as before
    head = ret.table(_retrieval_result(100)).splitlines()[0]
    # before: "(943 users)" over rows that scored 100 (--max-users 100)
    assert "(943 users)" not in head
    assert "a seeded subset of 100 of the 943 test users by --max-users" in head


@pytest.mark.parametrize("argv", [["--models", "bpr"], ["--models", "sasrec", "itemcf"], ["--bpr-budget", "nan"],
                                  ["--bpr-budget", "0"], ["--bpr-budget", "-5"]])
def test_retrieval_bad_models_or_budget_are_usage_errors(load_script, monkeypatch, argv):
    # before: an unknown model failed (reported as a row note) after the encoder and every other retriever had
    # run; `bpr` overwrote the BPR rows; a nan / 0 / negative budget reached BPR's training loop
    ret = load_script("eval/retrieval.py")
    monkeypatch.setattr(ret, "run", _refuse_load)
    monkeypatch.setattr(sys, "argv", ["eval/retrieval.py", *argv])
    with pytest.raises(SystemExit) as e:
        ret.main()
    assert e.value.code == 2


@pytest.mark.parametrize("asked, scored, says", [
    # before: "20 test users (seed 0)" under a table of 3 users (a dataset with 3 test users)
    (20, 3, "\n3 test users (seed 0; all of them, --users was 20), "),
    (2, 2, "\n2 test users (seed 0), "),
])
def test_ranking_modes_note_gives_the_number_of_users_scored(load_script, monkeypatch, asked, scored, says):
    from collections import Counter
    from types import SimpleNamespace

    mod = load_script("eval/ranking_modes.py")
    monkeypatch.setattr(mod, "load_prepared", lambda *a, **k: object())
    monkeypatch.setattr(mod, "build_retriever", lambda *a, **k: object())
    monkeypatch.setattr(mod, "load_backend", lambda *a, **k: SimpleNamespace(name="fake", close=lambda: None))
    monkeypatch.setattr(mod, "with_adapter_templates", lambda cfg, a: cfg)
    monkeypatch.setattr(mod, "Recommender", lambda ds, b, r, cfg: SimpleNamespace(cfg=cfg, generate_totals=Counter()))
    metrics = {"n_users": scored, "ndcg@10": 0.1, "recall@10": 0.2, "mrr@10": 0.05}
    monkeypatch.setattr(mod, "timed_rank", lambda rec, ds, users, seed, mode: (dict(metrics), 0.5))
    got = {}
    monkeypatch.setattr(mod, "write_result", lambda name, payload, md, command=None: got.update(md=md, p=payload))
    monkeypatch.setattr(sys, "argv", ["eval/ranking_modes.py", "--users", str(asked)])
    mod.main()
    assert says in got["md"]
    assert all(r["users"] == scored for r in got["p"]["rows"])


def _baselines_merge(load_script, monkeypatch, tmp_path, trained):
    """eval/baselines.py --merge --models mf on a fake dataset `tiny` writing to tmp_path; training and evaluation
    are fakes that record the models they are asked for in `trained`."""
    from types import SimpleNamespace

    import pandas as pd

    import llmrec.baselines.evaluate
    import llmrec.data

    mod = load_script("eval/baselines.py")
    ds = SimpleNamespace(name="tiny", n_items=5, targets=lambda split: [1, 2, 3],
                         yesno=pd.DataFrame({"split": ["train", "test"]}))
    monkeypatch.setattr(llmrec.data, "load_prepared", lambda *a, **k: ds)

    def run_model(name, ds, cfg, reuse):
        trained.append(name)
        return SimpleNamespace(cfg=SimpleNamespace(dim=8), fit_info={}), False

    monkeypatch.setattr(mod, "run_model", run_model)
    monkeypatch.setattr(llmrec.baselines.evaluate, "evaluate_model", lambda m, ds, split: {"ndcg@10": 0.3})
    monkeypatch.setattr(sys, "argv", ["eval/baselines.py", "--dataset", "tiny", "--models", "mf", "--merge",
                                      "--results-dir", str(tmp_path)])
    return mod


# before: a raw json.JSONDecodeError traceback (a list: AttributeError; methods a list: TypeError) with no file named
@pytest.mark.parametrize("text, says", [
    ('{"methods": {"pop": {"ndcg@10": 0.1}}, ', "is not valid JSON"),
    ("\udcff", "is not valid JSON"),  # not UTF-8
    ("[1, 2]", "not a JSON object"),
    ('{"methods": ["pop"]}', "its 'methods' is not an object"),
    ('{"methods": {"pop": 0.1}}', "its 'methods' is not an object"),
    ('{"methods": {"pop": {}}, "details": {"pop": []}}', "its 'details' is not an object"),
])
def test_baselines_merge_into_a_malformed_file_fails_naming_it_before_training(load_script, monkeypatch, tmp_path,
                                                                              text, says):
    trained = []
    mod = _baselines_merge(load_script, monkeypatch, tmp_path, trained)
    f = tmp_path / "baselines_tiny.json"
    f.write_bytes(text.encode("utf-8", "surrogateescape"))
    before = f.read_bytes()
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert isinstance(e.value.code, str) and str(f) in e.value.code and says in e.value.code  # exit status 1
    assert trained == [] and f.read_bytes() == before and not (tmp_path / "baselines_tiny.md").exists()


def test_baselines_merge_keeps_the_other_models_rows(load_script, monkeypatch, tmp_path):
    trained = []
    mod = _baselines_merge(load_script, monkeypatch, tmp_path, trained)
    f = tmp_path / "baselines_tiny.json"
    f.write_text(json.dumps({"commit": "abc", "methods": {"pop": {"ndcg@10": 0.1}, "mf": {"ndcg@10": 0.2}},
                             "details": {"pop": {"wall_s": 1.0}}}))
    mod.main()
    d = json.loads(f.read_text())
    assert trained == ["mf"]
    assert d["methods"] == {"pop": {"ndcg@10": 0.1}, "mf": {"ndcg@10": 0.3}}
    assert d["details"]["pop"] == {"wall_s": 1.0, "from_earlier_run": "abc"}
