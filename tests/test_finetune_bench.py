"""`finetune/bench.py`'s memory summary: each QLoRA run is divided by the bf16 LoRA run with the same allocator
setting, and only runs that exist get ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def fbench(tmp_path, monkeypatch, load_script):
    monkeypatch.setenv("LLMREC_HOME", str(tmp_path))
    return load_script("finetune/bench.py")


def write_run(fbench, kind: str, peak: float, start: float = 400.0, weights: float = 100.0,
              train_peak: float | None = None, tensor_peak: float | None = None) -> None:
    d = fbench.run_dir("yesno", "tiny", f"_mem_{kind}")
    d.mkdir(parents=True)
    t = {"peak_rss_mb": peak, "rss_before_load_mb": start, "weights_mb": weights, "batch_size": 4, "steps": 1,
         "examples_per_s": 1.0, "wall_s": 10.0, "malloc_mmap_threshold_mb": 1 if kind.endswith("_mmap") else 0,
         **({"peak_rss_train_mb": train_peak} if train_peak else {}),
         **({"peak_tensor_mb": tensor_peak} if tensor_peak else {})}
    (d / "metrics.json").write_text(json.dumps({"train": t}))


def test_memory_ratios_pair_runs_with_the_same_allocator_setting(fbench):
    write_run(fbench, "bf16", 1000.0, weights=270.0, train_peak=900.0, tensor_peak=360.0)
    write_run(fbench, "qlora_bf16all", 900.0, weights=170.0, train_peak=810.0, tensor_peak=216.0)
    write_run(fbench, "bf16_mmap", 800.0, weights=270.0)
    write_run(fbench, "qlora_bf16all_mmap", 600.0, weights=170.0)
    write_run(fbench, "qlora_bf16all_pre_mmap", 560.0, weights=170.0)
    mem = fbench.memory_summary("yesno", "tiny")
    assert mem["ratio_peak_rss_qlora_bf16all_over_bf16"] == 0.9
    assert mem["ratio_above_start_qlora_bf16all_over_bf16"] == round(500 / 600, 3)
    assert mem["ratio_peak_train_qlora_bf16all_over_bf16"] == 0.9
    assert mem["ratio_peak_tensor_qlora_bf16all_over_bf16"] == 0.6 and mem["bf16"]["peak_tensor_mb"] == 360.0
    assert "ratio_peak_tensor_qlora_bf16all_mmap_over_bf16_mmap" not in mem  # runs without train.tensor_memory
    assert mem["ratio_weights_qlora_bf16all_over_bf16"] == round(170 / 270, 3)
    assert mem["ratio_peak_rss_qlora_bf16all_mmap_over_bf16_mmap"] == 0.75  # 600 / 800, not 600 / 1000
    assert mem["ratio_above_start_qlora_bf16all_mmap_over_bf16_mmap"] == 0.5  # (600 - 400) / (800 - 400)
    assert "ratio_peak_train_qlora_bf16all_mmap_over_bf16_mmap" not in mem  # no VmHWM figure in those runs
    assert mem["qlora_bf16all_mmap"]["malloc_mmap_threshold_mb"] == 1
    assert mem["ratio_peak_rss_qlora_bf16all_pre_mmap_over_bf16_mmap"] == 0.7  # the saved 4-bit copy + the option
    # the bf16 runs are denominators, never ratios; runs that do not exist get none
    assert not any(k.startswith(("ratio_peak_rss_bf16", "ratio_peak_rss_qlora_over", "ratio_peak_rss_qlora_bf16emb"))
                   for k in mem)


def test_short_run_trains_exactly_the_measured_steps(fbench):
    from argparse import Namespace

    o = fbench.short_run(Namespace(dataset="tiny", batch_size=4, steps=2))
    # as many examples as the steps consume, one optimizer step per batch, nothing else timed or written
    for kv in ("dataset=tiny", "data.n_train=8", "train.max_steps=2", "train.batch_size=4", "train.grad_accum=1",
               "eval_before=false", "eval_after=false", "train.save_steps=0", "train.resume=null"):
        assert kv in o, kv


def test_rank_baselines_score_the_run_s_own_candidate_sets(fbench, tiny_dataset, tiny_home, tmp_path, monkeypatch):
    """An oracle that scores each user's test target highest gets NDCG 1 over the rebuilt candidate sets, one that
    scores it lowest gets HR@10 0 (20 candidates): candidates, scores and labels line up, at the test split."""
    import numpy as np
    import yaml
    from llm_fixtures import make_tiny_llm

    from llmrec.config import to_dict
    from llmrec.finetune import load_recipe

    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_recipe(ROOT / "finetune" / "recipes" / "rank_smollm2_qlora.yaml", [
        f"model={make_tiny_llm(tmp_path / 'llm')}", "dataset=tiny", "data.n_test=8", "data.max_len=2048",
        "data.history_max=3"])
    (run / "recipe.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    target = dict(zip(tiny_dataset.targets("test")["user_id"].astype(str),
                      tiny_dataset.targets("test")["item_id"].astype(str)))

    class Oracle:
        def __init__(self, sign):
            self.sign = sign

        def score_items(self, user_ids, split):
            assert split == "test"
            s = np.zeros((len(user_ids), tiny_dataset.n_items))
            for r, u in enumerate(user_ids):
                s[r, tiny_dataset.item_index[target[u]]] = self.sign
            return s

    def fake(name, ds):
        if name == "broken":
            raise RuntimeError("no checkpoint")
        return Oracle(1.0 if name == "best" else -1.0), "fake"

    monkeypatch.setattr("llmrec.baselines.load_or_fit", fake)
    out = fbench.baseline_rank(["best", "worst", "broken"], run)
    assert out["best"]["n_users"] == 8 and out["best"]["ndcg@10"] == 1.0 and out["best"]["mrr@10"] == 1.0
    assert out["worst"]["hr@10"] == 0.0
    assert "RuntimeError: no checkpoint" in out["broken"]["error"]
    assert out["random order (expected)"]["hr@10"] == 0.5


def test_gpu_summary_divides_each_qlora_run_by_the_bf16_run(fbench):
    runs = {"qlora": {"peak_cuda_mb": 3000.0, "peak_cuda_train_mb": 2500.0, "weights_mb": 900.0,
                      "examples_per_s": 30.0, "steps": 20},
            "qlora_bf16all": {"peak_cuda_mb": 2400.0, "peak_cuda_train_mb": 2000.0, "weights_mb": 800.0,
                              "examples_per_s": 36.0},
            "bf16": {"peak_cuda_mb": 6000.0, "peak_cuda_train_mb": 4000.0, "weights_mb": 2100.0,
                     "examples_per_s": 40.0}}
    s = fbench.gpu_summary(runs)
    assert [r["run"] for r in s["rows"]] == ["qlora", "qlora_bf16all", "bf16"]
    assert s["rows"][0]["steps"] == 20 and s["rows"][1]["steps"] is None  # every row has every column
    assert s["ratio_peak_cuda_qlora_over_bf16"] == 0.5
    assert s["ratio_peak_cuda_train_qlora_over_bf16"] == 0.625
    assert s["ratio_weights_qlora_bf16all_over_bf16"] == round(800 / 2100, 3)
    assert s["ratio_speed_qlora_bf16all_over_bf16"] == 0.9
    assert not any(k.startswith("ratio_") and "_bf16_over" in k for k in s)  # bf16 is only a denominator
    # a CPU smoke run has no CUDA figures: no CUDA ratios, the others stay; no bf16 run: no ratios at all
    cpu = fbench.gpu_summary({"qlora": {"weights_mb": 1.0, "examples_per_s": 2.0},
                              "bf16": {"weights_mb": 2.0, "examples_per_s": 4.0}})
    assert cpu["ratio_weights_qlora_over_bf16"] == 0.5 and "ratio_peak_cuda_qlora_over_bf16" not in cpu
    assert not [k for k in fbench.gpu_summary({"qlora": runs["qlora"]}) if k.startswith("ratio_")]


def test_gpu_check_runs_the_gpu_recipe_three_ways(fbench, tiny_dataset, tiny_home, tmp_path, monkeypatch):
    """`finetune/bench.py gpu` (what finetune/gpu_check.sh runs on a GPU machine) on the CPU: the GPU recipe trains as
    written, with bf16 embeddings/norms and as bf16 LoRA, one process each, and the result files name the runs. It is
    the only test that loads `yesno_gpu_qlora.yaml` (its eval_steps with data.n_valid=0 once failed in Trainer)."""
    from argparse import Namespace

    from llm_fixtures import make_tiny_llm

    import llmrec.bench_utils as bench_utils

    tiny_dir = make_tiny_llm(tmp_path / "llm")
    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    monkeypatch.setattr(bench_utils, "RESULTS_DIR", tmp_path / "results")
    a = Namespace(task="yesno", dataset="tiny", model=str(tiny_dir), steps=1, batch_size=2, label="_t",
                  only_gpu=None, model_note="tiny", note="",
                  overrides=["data.max_len=1024", "data.history_max=3", "lora.target_modules=[q_proj,v_proj]"])
    fbench.cmd_gpu(a)
    res = json.loads((tmp_path / "results" / "finetune_gpu_yesno_tiny_t.json").read_text())
    assert [r["run"] for r in res["rows"]] == ["qlora", "qlora_bf16all", "bf16"]
    assert all(r["steps"] == 1 and r["examples"] == 2 and r["gradient_checkpointing"] for r in res["rows"])
    for kind in ("qlora", "qlora_bf16all", "bf16"):  # each in its own run folder, with the recipe it ran
        recipe = (fbench.run_dir("yesno", "tiny", f"_gpu_t_{kind}") / "recipe.yaml").read_text()
        assert ("load_in_4bit: true" in recipe) == kind.startswith("qlora")
    import torch

    if not torch.cuda.is_available():
        assert "ratio_peak_cuda_qlora_over_bf16" not in res and res["rows"][0]["peak_cuda_mb"] is None
    assert "ratio_weights_qlora_bf16all_over_bf16" in res and "qlora_bf16all" in (
        tmp_path / "results" / "finetune_gpu_yesno_tiny_t.md").read_text()


def test_variants_belong_to_one_task_and_name_the_prompt_they_ran_with(fbench):
    import argparse

    ns = argparse.Namespace
    fbench.check_variant(ns(task="yesno", variant="lora"))
    fbench.check_variant(ns(task="rank", variant="retrieval"))
    fbench.check_variant(ns(task="rank", variant=None))
    with pytest.raises(SystemExit, match="--variant lora belongs to --task yesno, not rank"):
        fbench.check_variant(ns(task="rank", variant="lora"))
    with pytest.raises(SystemExit, match="--variant retrieval belongs to --task rank"):
        fbench.check_variant(ns(task="yesno", variant="retrieval"))
    # the recipe's prompt changed to yesno_estimate: the variants measured on yesno_stats re-run on it
    import yaml

    recipe = yaml.safe_load((ROOT / "finetune" / "recipes" / "yesno_smollm2_qlora.yaml").read_text())
    assert recipe["data"]["template"] == "yesno_estimate"
    for name in ("stats", "lora", "qlora_upcast", "n1536"):
        assert "data.template=yesno_stats" in fbench.VARIANTS[name], name


def test_auc_intervals_pair_the_run_s_scores_with_each_method_s_by_row(fbench, tmp_path):
    """The LLM's saved per-row P(Yes) are matched to another method's on (user_id, item_id), whatever the order."""
    import numpy as np
    import pandas as pd

    from llmrec.metrics import auc, paired_bootstrap_ratio

    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 2, n)
    llm = pd.DataFrame({"user_id": [str(i) for i in range(n)], "item_id": ["i7"] * n, "label": y,
                        "p_yes": np.clip(0.5 * y + rng.random(n) * 0.7, 0, 1)})
    (tmp_path / "scores").mkdir()
    llm.to_csv(tmp_path / "scores" / "test_after.csv", index=False)
    other = llm.assign(p_yes=rng.random(n)).iloc[::-1].reset_index(drop=True)  # other order, other scores
    (iv,) = fbench.paired_auc_intervals(tmp_path, {"mf": other}, seed=3)
    assert iv["vs"] == "mf" and iv["n"] == n
    o = other.iloc[::-1]
    assert iv["ratio"] == pytest.approx(auc(y, llm["p_yes"]) / auc(y, o["p_yes"]))
    ref = paired_bootstrap_ratio(lambda m: auc(m[:, 0], m[:, 1]), np.column_stack([y, llm["p_yes"]]),
                                 np.column_stack([y, o["p_yes"]]), seed=3)
    assert (iv["lo"], iv["hi"]) == (ref["lo"], ref["hi"])
    with pytest.raises(ValueError, match="not mf's"):  # another test subset: refused, not silently mismatched
        fbench.paired_auc_intervals(tmp_path, {"mf": other.iloc[:50]})
    assert fbench.paired_auc_intervals(tmp_path / "nothing", {"mf": other}) == []


def test_counts_reading_tells_a_copy_of_the_figure_from_a_score_that_adds_to_it(fbench, tmp_path):
    """A run whose P(Yes) is a monotone copy of the counts figure ranks as it does (rho 1) and tells apart within
    the figure's bins no better than the figure; one that knows the labels does, and a run on other rows is skipped."""
    import numpy as np
    import pandas as pd

    from llmrec.metrics import stratified_auc

    rng = np.random.default_rng(1)
    n = 100
    y = rng.integers(0, 2, n)
    counts = pd.DataFrame({"user_id": [str(i) for i in range(n)], "item_id": ["i"] * n, "label": y,
                           "p_yes": np.clip(0.3 * y + 0.7 * rng.random(n), 0.01, 0.99)})
    runs = {}
    for name, p in {"copy": counts["p_yes"] ** 2, "knows": 0.5 * counts["p_yes"] + 0.5 * y,
                    "other_rows": counts["p_yes"]}.items():
        run = tmp_path / name
        (run / "scores").mkdir(parents=True)
        frame = counts.assign(p_yes=p).iloc[::-1]  # another order: matched by row id
        (frame.iloc[:50] if name == "other_rows" else frame).to_csv(run / "scores" / "test_after.csv", index=False)
        runs[name] = run
    copy, knows = fbench.counts_reading(runs, counts)
    assert [copy["run"], knows["run"]] == ["copy", "knows"]
    assert copy["spearman_vs_counts"] == pytest.approx(1.0)
    assert copy["auc_within_5_bins"] == pytest.approx(copy["counts_auc_within_5_bins"])
    assert knows["auc_within_5_bins"] == pytest.approx(1.0)
    assert knows["counts_auc_within_5_bins"] < 0.9
    bins = pd.qcut(counts["p_yes"].rank(method="first"), 5, labels=False)
    assert copy["counts_auc_within_5_bins"] == pytest.approx(stratified_auc(y, counts["p_yes"], bins))


def test_report_keeps_the_previous_figures_of_runs_whose_folders_are_gone(fbench, tmp_path, monkeypatch):
    """A variant run done since ($LLMREC_HOME has its folder) is reported from it; one whose folder is gone keeps the
    previous report's figures, labelled, instead of silently dropping its row; so do the memory runs."""
    import argparse

    import llmrec.bench_utils as bu

    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(bu, "RESULTS_DIR", results)
    main = fbench.run_dir("yesno", "tiny")
    main.mkdir(parents=True)
    train = {"examples": 8, "steps": 2, "examples_per_s": 1.0, "wall_s": 8.0, "peak_rss_mb": 900.0}
    (main / "metrics.json").write_text(json.dumps({"status": "done", "train": train, "wall_s": 9.0,
                                                   "test_after": {"auc": 0.7, "accuracy": 0.6, "f1": 0.5}}))
    (main / "recipe.yaml").write_text("task: yesno\n")
    (main / "data_manifest.json").write_text(json.dumps({"seed": 0, "test": {"n": 10}, "train": {"n": 8},
                                                         "valid": {"n": 4}}))
    fresh = fbench.run_dir("yesno", "tiny", "_fast_n1536")
    fresh.mkdir()
    (fresh / "metrics.json").write_text(json.dumps({"status": "done", "train": train, "wall_s": 5.0,
                                                    "test_after": {"auc": 0.8, "accuracy": 0.7, "f1": 0.6}}))
    old_mem = {"qlora": {"peak_rss_mb": 1000.0, "peak_above_start_mb": 600.0, "batch_size": 4, "steps": 1,
                         "examples_per_s": 0.5, "wall_s": 8.0}, "ratio_peak_rss_qlora_over_bf16": 0.9}
    (results / "finetune_yesno_tiny.json").write_text(json.dumps({
        "memory": old_mem,
        "variants": {"lr1e3": {"train": train, "wall_s": 7.0,
                               "test_after": {"auc": 0.75, "accuracy": 0.65, "f1": 0.55}},
                     "fast_n1536": {"train": train, "wall_s": 1.0, "test_after": {"auc": 0.1}}}}))
    rows = "user_id,item_id,label,p_yes\n" + "".join(f"u{i},i{i},{i % 2},{p}\n" for i, p in enumerate(
        [0.1, 0.9, 0.2, 0.8, 0.6, 0.4]))
    for run in (main, fresh):
        (run / "scores").mkdir()
        (run / "scores" / "test_after.csv").write_text(rows)
    a = argparse.Namespace(task="yesno", dataset="tiny", few_shot=False, baselines="", note="", command="test",
                           log=None)
    fbench.cmd_report(a)
    out = json.loads((results / "finetune_yesno_tiny.json").read_text())
    fresh_v = out["variants"]["fast_n1536"]
    assert fresh_v["test_after"]["auc"] == 0.8 and "carried_over" not in fresh_v
    assert out["variants"]["lr1e3"]["test_after"]["auc"] == 0.75
    assert out["variants"]["lr1e3"]["carried_over"] == "finetune_yesno_tiny.json"
    assert out["memory"] == old_mem
    # the main run against the variant scored on the same rows (here the same scores: ratio 1)
    iv = {r["vs"]: r for r in out["auc_intervals"]}
    assert set(iv) == {"SmolLM2 + QLoRA, 1536 training examples"} and iv["SmolLM2 + QLoRA, 1536 training examples"][
        "ratio"] == 1.0
    md = (results / "finetune_yesno_tiny.md").read_text()
    lr_row = next(line for line in md.splitlines() if "learning rate 1e-3" in line)
    assert "0.7500" in lr_row and "figures kept from the previous finetune_yesno_tiny.json" in lr_row
    fast_row = next(line for line in md.splitlines() if line.startswith("| SmolLM2 + QLoRA, 1536 training examples |"))
    assert "0.8000" in fast_row and "kept" not in fast_row


def test_speed_runs_alternate_and_each_change_is_measured_alone(fbench, monkeypatch):
    import argparse

    from llmrec.finetune import load_recipe

    recipe = ROOT / "finetune" / "recipes" / "yesno_smollm2_qlora.yaml"
    now = load_recipe(recipe)
    assert now.lora.dropout == 0 and now.train.bf16_autocast == "auto"
    settings = {name: load_recipe(recipe, over) for name, over in fbench.SPEED_CONFIGS.items()}
    assert [(c.lora.dropout, c.train.bf16_autocast, c.train.loss_positions) for c in settings.values()] == [
        (0.05, False, "index"), (0.0, False, "index"), (0.05, "auto", "index"), (0.0, "auto", "index"),
        (0.0, "auto", "int")]  # int_window: the recipe, with the loss window handed over as its length
    calls = []
    speed = {"recipe_1205": 1.0, "no_dropout": 1.5, "autocast": 1.2, "recipe": 2.0, "int_window": 1.6}

    def fake_finetune(task, out, overrides):
        name = out.name.removeprefix("bench_yesno_tiny_speed_").rsplit("_", 1)[0]
        calls.append(name)
        own = fbench.SPEED_CONFIGS[name]
        assert "train.max_steps=3" in overrides and overrides[len(overrides) - len(own):] == own
        return {"train": {"examples_per_s": speed[name], "wall_s": 1.0, "peak_rss_train_mb": 100.0 * speed[name],
                          "peak_rss_mb": 500.0}}

    monkeypatch.setattr(fbench, "finetune", fake_finetune)
    a = argparse.Namespace(task="yesno", dataset="tiny", steps=3, batch_size=2, repeats=2, overrides=[])
    runs, summary = fbench.alternating_runs(a, fbench.SPEED_CONFIGS, "speed_", "config")
    assert calls == list(fbench.SPEED_CONFIGS) * 2  # alternating, not one configuration's repeats in a row
    by = {r["config"]: r for r in summary}
    assert by["recipe"]["runs"] == 2 and by["recipe"]["speed_vs_first"] == 2.0
    assert by["no_dropout"]["peak_train_vs_first"] == 1.5 and "speed_vs_first" not in by["recipe_1205"]
