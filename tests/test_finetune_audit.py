"""Audit of the fine-tuning run (tiny 4-bit Llama, CPU): exact resume, loss scaling, evaluation, export --merge."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from llm_fixtures import make_tiny_llm  # noqa: E402

from llmrec.finetune import load_recipe, run_finetune  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "finetune" / "recipes"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm_audit"))


def overrides(tiny_dir, out, extra=()) -> list[str]:
    return [f"model={tiny_dir}", "dataset=tiny", "dtype=float32", "quant.compute_dtype=float32", "eval_dtype=float32",
            "data.n_train=16", "data.n_valid=0", "data.n_test=0", "data.max_len=1024", "data.history_max=3",
            "data.n_candidates=5", "train.progress=false", "train.logging_steps=1", "eval_before=false",
            "eval_after=false", "lora.target_modules=[q_proj,v_proj]", f"output_dir={out}", *extra]


def recipe(tiny_dir, out, task="yesno", extra=()):
    return load_recipe(RECIPES / f"{task}_smollm2_qlora.yaml", overrides(tiny_dir, out, extra))


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


class Interrupted(Exception):
    pass


@contextlib.contextmanager
def die_after_checkpoint(monkeypatch, step: int):
    """Inside: the Trainer saves checkpoint-`step`, then the run dies (Interrupted), as a kill right after a save."""
    from transformers import Trainer

    orig = Trainer._save_checkpoint

    def save_then_die(self, *a, **k):
        orig(self, *a, **k)
        if self.state.global_step == step:
            raise Interrupted

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    try:
        yield
    finally:
        monkeypatch.setattr(Trainer, "_save_checkpoint", orig)


def test_an_interrupted_run_resumes_to_the_same_adapter(tiny_dataset, tiny_dir, tmp_path, monkeypatch):
    """Killed right after checkpoint-3 (mid-epoch: 16 examples, batch 2 x accumulation 2 = 4 steps an epoch) and run
    again, the run continues from the checkpoint (optimizer, scheduler, RNG with LoRA dropout on, the epoch's data
    order and the next epoch's) and ends with the adapter and the losses of the run that was never stopped."""

    extra = ["train.batch_size=2", "train.grad_accum=2", "train.max_steps=6", "train.save_steps=3",
             "train.save_total_limit=5", "train.lr=0.01", "train.warmup_ratio=0.34", "lora.dropout=0.1"]
    ref = run_finetune(recipe(tiny_dir, tmp_path / "ref", extra=extra), ds=tiny_dataset)

    with die_after_checkpoint(monkeypatch, 3), pytest.raises(Interrupted):
        run_finetune(recipe(tiny_dir, tmp_path / "cut", extra=extra), ds=tiny_dataset)
    got = run_finetune(recipe(tiny_dir, tmp_path / "cut", extra=extra), ds=tiny_dataset)
    assert got["train"]["resumed_from"].endswith("checkpoint-3") and got["train"]["steps"] == 6
    a, b = adapter_weights(tmp_path / "ref" / "adapter"), adapter_weights(tmp_path / "cut" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    assert [s for s, _ in got["train"]["losses"]] == [s for s, _ in ref["train"]["losses"]]
    for (_, x), (_, y) in zip(got["train"]["losses"], ref["train"]["losses"]):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5)


def test_gradient_accumulation_trains_as_the_larger_batch(tiny_dataset, tiny_dir, tmp_path):
    """Batch 2 x accumulation 2 is batch 4: the same examples per optimizer step (the sampler's order does not
    depend on the batch size), the loss normalised by the answer tokens of the whole accumulated batch, the same
    number of optimizer steps for an epoch and so the same learning-rate schedule: the same adapter and losses."""
    common = ["train.epochs=1", "train.max_steps=-1", "train.save_steps=0", "train.lr=0.01", "train.warmup_ratio=0.3",
              "train.lr_scheduler=linear"]
    big = run_finetune(recipe(tiny_dir, tmp_path / "big", extra=[*common, "train.batch_size=4", "train.grad_accum=1"]),
                       ds=tiny_dataset)
    acc = run_finetune(recipe(tiny_dir, tmp_path / "acc", extra=[*common, "train.batch_size=2", "train.grad_accum=2"]),
                       ds=tiny_dataset)
    assert big["train"]["steps"] == acc["train"]["steps"] == 4
    for (s1, x), (s2, y) in zip(big["train"]["losses"], acc["train"]["losses"], strict=True):
        assert s1 == s2 and x == pytest.approx(y, rel=1e-3)
    a, b = adapter_weights(tmp_path / "big" / "adapter"), adapter_weights(tmp_path / "acc" / "adapter")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)


def test_listwise_term_of_a_short_last_accumulation_window_is_not_scaled_down(tiny_dataset, tiny_dir, tmp_path,
                                                                              monkeypatch):
    """6 listwise groups at batch 2 x accumulation 2: the epoch's second optimizer step accumulates one micro-batch,
    not two. The listwise term (a mean over a micro-batch's groups) is then averaged over the one micro-batch the
    step has, as the LM term is normalised by that window's tokens: the run trains as batch 4 does (groups 1-4,
    then 5-6), instead of halving the last step's listwise gradient."""
    common = ["data.n_train=6", "data.negatives=3", "data.candidates=popular", "data.n_candidates=5",
              "train.epochs=1", "train.max_steps=-1", "train.save_steps=0", "train.lr=0.01", "train.warmup_ratio=0",
              "train.lr_scheduler=constant"]
    task = "next_title_listwise"
    from transformers import Trainer

    logged: list[dict] = []
    orig = Trainer.log

    def keep(self, logs, *a, **k):
        if "listwise_lm" in logs:
            logged.append(dict(logs))
        return orig(self, logs, *a, **k)

    monkeypatch.setattr(Trainer, "log", keep)
    big = run_finetune(recipe(tiny_dir, tmp_path / "big", task, [*common, "train.batch_size=4", "train.grad_accum=1"]),
                       ds=tiny_dataset)
    acc = run_finetune(recipe(tiny_dir, tmp_path / "acc", task, [*common, "train.batch_size=2", "train.grad_accum=2"]),
                       ds=tiny_dataset)
    assert big["train"]["steps"] == acc["train"]["steps"] == 2
    # the loss each optimizer step backpropagates (gradient clipping at norm 1 would hide a halved gradient from
    # the adapter's weights here, not from the loss): step 2 was half batch 4's
    for (s1, x), (s2, y) in zip(big["train"]["losses"], acc["train"]["losses"], strict=True):
        assert s1 == s2 and y == pytest.approx(x, rel=1e-3), (s1, x, y)
    # the logged parts are per optimizer step too: the LM term of an accumulated step is its whole window's
    assert len(logged) == 4
    for x, y in zip(logged[:2], logged[2:], strict=True):
        for k in ("listwise_lm", "listwise_loss"):
            assert y[k] == pytest.approx(x[k], rel=1e-3), (k, x, y)
    a, b = adapter_weights(tmp_path / "big" / "adapter"), adapter_weights(tmp_path / "acc" / "adapter")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)


def test_two_processes_train_as_one_with_the_whole_batch_and_score_every_example(tiny_dataset, tiny_home, tiny_dir,
                                                                                  tmp_path):
    """`torchrun --nproc_per_node 2` at batch 2 per process trains as one process at batch 4 (the same examples per
    step, the loss normalised by the answer tokens of both processes, DDP's gradient average undone): the same
    losses and adapter. Validation during training and the final scores cover every example (an odd count, so a
    sharded evaluation would give the ranks unequal shares), and only rank 0 writes."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    common = ["train.max_steps=2", "train.save_steps=2", "train.lr=0.01", "train.warmup_ratio=0",
              "train.grad_accum=1", "data.n_valid=5", "data.n_test=3", "train.eval_steps=1", "eval_after=true"]
    one = run_finetune(recipe(tiny_dir, tmp_path / "one", extra=[*common, "train.batch_size=4"]), ds=tiny_dataset)
    out = tmp_path / "ddp"
    args = overrides(tiny_dir, out, [*common, "train.batch_size=2"])
    env = {**os.environ, "LLMREC_HOME": str(tiny_home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "finetune" / "train.py"), "--config", str(RECIPES / "yesno_smollm2_qlora.yaml"), *args]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["steps"] == 2
    for (s1, x), (s2, y) in zip(one["train"]["losses"], m["train"]["losses"], strict=True):
        assert s1 == s2 and y == pytest.approx(x, rel=1e-3), (s1, x, y)
    a, b = adapter_weights(tmp_path / "one" / "adapter"), adapter_weights(out / "adapter")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)
    assert m["valid_after"]["n"] == 5 and m["test_after"]["n"] == 3
    assert m["valid_after"]["auc"] == pytest.approx(one["valid_after"]["auc"], abs=1e-6)
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_auc" in h]
    assert [h["step"] for h in evals] == [1, 2] and all(h["eval_n"] == 5 for h in evals)


def test_a_fresh_run_never_resumes_from_checkpoints_an_earlier_run_left(tiny_dataset, tiny_dir, tmp_path,
                                                                       monkeypatch):
    """A run started over (train.resume=null) in a folder holding another run's checkpoints, then interrupted and
    run again with resume: auto, continues from ITS OWN last checkpoint, not from the earlier run's higher-numbered
    one (which the recipe check cannot tell apart: recipe.yaml is the new run's by then), and ends with the adapter
    of an uninterrupted run."""

    base = ["train.batch_size=4", "train.grad_accum=1", "train.max_steps=4", "train.save_steps=2",
            "train.save_total_limit=2"]
    run_finetune(recipe(tiny_dir, tmp_path / "run", extra=[*base, "train.lr=0.01"]), ds=tiny_dataset)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-4").is_dir()
    new = [*base, "train.lr=0.02"]
    ref = run_finetune(recipe(tiny_dir, tmp_path / "ref", extra=new), ds=tiny_dataset)

    with die_after_checkpoint(monkeypatch, 2), pytest.raises(Interrupted):
        run_finetune(recipe(tiny_dir, tmp_path / "run", extra=[*new, "train.resume=null"]), ds=tiny_dataset)
    got = run_finetune(recipe(tiny_dir, tmp_path / "run", extra=new), ds=tiny_dataset)
    assert got["train"]["resumed_from"].endswith("checkpoint-2")
    for (s1, x), (s2, y) in zip(ref["train"]["losses"], got["train"]["losses"], strict=True):
        assert s1 == s2 and y == pytest.approx(x, rel=1e-4)
    a, b = adapter_weights(tmp_path / "ref" / "adapter"), adapter_weights(tmp_path / "run" / "adapter")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_stale_checkpoints_are_those_the_run_does_not_continue(tmp_path):
    from llmrec.finetune.trainer import stale_checkpoints

    ck = tmp_path / "checkpoints"
    assert stale_checkpoints(ck, None) == []
    for n in (2, 4, 10):
        (ck / f"checkpoint-{n}").mkdir(parents=True)
    (ck / "notes").mkdir()
    names = lambda r: [d.name for d in stale_checkpoints(ck, r)]  # noqa: E731
    assert names(None) == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]  # started over: all
    assert names(str(ck / "checkpoint-10")) == []  # resume: auto picks the last one
    assert names(str(ck / "checkpoint-4")) == ["checkpoint-10"]  # continued from an older one: the later ones
    elsewhere = tmp_path / "other" / "checkpoints" / "checkpoint-6"
    assert names(str(elsewhere)) == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]


def test_report_scores_the_baselines_on_the_run_s_test_rows_drawn_with_eval_seed(tmp_path, monkeypatch, load_script):
    """`finetune/bench.py report` scores the baselines on the LLM's test subset, which `build_examples` draws with
    `data.eval_seed` (the manifest's `eval_seed`), not with the training seed: for a run of data.seed=3 the baselines
    are asked for the eval_seed rows (the bootstrap pairing them with the run's scores row by row needs that too)."""
    import argparse
    import json

    import llmrec.bench_utils as bu

    monkeypatch.setenv("LLMREC_HOME", str(tmp_path))
    fbench = load_script("finetune/bench.py")
    monkeypatch.setattr(bu, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "results").mkdir()
    main = fbench.run_dir("yesno", "tiny")
    main.mkdir(parents=True)
    (main / "metrics.json").write_text(json.dumps({"status": "done", "train": {"examples": 8}, "wall_s": 9.0,
                                                   "test_after": {"auc": 0.7}}))
    (main / "recipe.yaml").write_text("task: yesno\n")
    (main / "data_manifest.json").write_text(json.dumps({"seed": 3, "eval_seed": 0, "test": {"n": 10},
                                                         "train": {"n": 8}, "valid": {"n": 4}}))
    asked = {}

    def fake(names, dataset, n_test, seed, few_shot=None, probs=None, train_seed=None):
        asked.update(n_test=n_test, seed=seed)
        return {}

    monkeypatch.setattr(fbench, "baseline_yesno", fake)
    fbench.cmd_report(argparse.Namespace(task="yesno", dataset="tiny", few_shot=False, baselines="mf", note="",
                                         command="test", log=None))
    assert asked == {"n_test": 10, "seed": 0}
    out = json.loads((tmp_path / "results" / "finetune_yesno_tiny.json").read_text())
    assert out["test_subset"] == {"n": 10, "seed": 0}
    # a manifest from before eval_seed existed drew its subsets with `seed`
    (main / "data_manifest.json").write_text(json.dumps({"seed": 2, "test": {"n": 10}, "train": {"n": 8},
                                                         "valid": {"n": 4}}))
    fbench.cmd_report(argparse.Namespace(task="yesno", dataset="tiny", few_shot=False, baselines="mf", note="",
                                         command="test", log=None))
    assert asked["seed"] == 2


def test_export_merge_of_a_trained_qlora_adapter_gives_the_logits_the_run_scored(tiny_dataset, tiny_dir, tmp_path):
    """`llmrec export --adapter <run>/adapter --merge` (base taken from the adapter's config, written fp32): the
    merged model's logits are those of the run's evaluation model (the dequantized 4-bit base read in the recipe's
    dtype + the LoRA layers), and its test P(Yes) give the run's own test AUC."""
    from llmrec.cli import main
    from llmrec.finetune.data import build_examples
    from llmrec.finetune.trainer import Evaluator, evaluate_examples
    from llmrec.llm import load_backend, load_causal_lm
    from llmrec.llm.loading import load_adapter_weights

    cfg = recipe(tiny_dir, tmp_path / "run", extra=["train.batch_size=4", "train.grad_accum=1", "train.max_steps=3",
                                                   "train.save_steps=0", "train.lr=0.02", "data.n_test=8",
                                                   "eval_after=true"])
    m = run_finetune(cfg, ds=tiny_dataset)
    assert main(["export", "--adapter", str(tmp_path / "run" / "adapter"), "--merge", "--out",
                 str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged, tok = load_causal_lm(tmp_path / "merged", dtype="float32")
    ev = Evaluator(cfg, None, tok)
    ref = ev._eval_model()
    load_adapter_weights(ref, tmp_path / "run" / "adapter")
    ids = tok(["The user watched Action Story 1. Will the user like Horror Story 4? Answer:"],
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, merged(input_ids=ids).logits
        with ref.disable_adapter():
            plain = ref(input_ids=ids).logits
    assert float((want - plain).abs().max()) > 1e-3  # the adapter moved them
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    test = build_examples(tiny_dataset, "yesno", cfg.data, tok)["test"]
    be = load_backend("transformers", model=tmp_path / "merged", dtype="float32")
    assert evaluate_examples(be, "yesno", test)["auc"] == pytest.approx(m["test_after"]["auc"], abs=1e-9)


def test_the_recipe_not_the_launcher_s_environment_decides_mixed_precision(tiny_dataset, tiny_dir, tmp_path,
                                                                           monkeypatch):
    """`accelerate launch --config_file finetune/accelerate/multi_gpu.yaml` exports ACCELERATE_MIXED_PRECISION=bf16,
    which transformers takes for every run whose TrainingArguments set neither bf16 nor fp16: a recipe with
    `train.bf16_autocast: false` (or "auto" resolving to off) would train under bf16 autocast all the same. The
    recipe decides: the same losses with and without that variable."""
    extra = ["train.batch_size=4", "train.grad_accum=1", "train.max_steps=2", "train.save_steps=0", "train.lr=0.02",
             "train.bf16_autocast=false"]
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    plain = run_finetune(recipe(tiny_dir, tmp_path / "plain", extra=extra), ds=tiny_dataset)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    launched = run_finetune(recipe(tiny_dir, tmp_path / "launched", extra=extra), ds=tiny_dataset)
    assert launched["train"]["losses"] == plain["train"]["losses"]
