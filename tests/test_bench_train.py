"""`llmrec bench --train` (= `make bench`): the shipped recipes trained into the bench's folders (or reused), then
the bench run with those adapters; and which adapter a bench without one picks up. Training and the bench are
stand-ins here: the steps are recorded, never run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llmrec.cli import main

ROOT = Path(__file__).resolve().parent.parent


class FakeTrain:
    """Stands in for `subprocess.run` of `finetune/train.py`: writes the adapter and the resolved recipe.yaml the run
    would leave in its output_dir; exit code 3 for a recipe named in `fail`."""

    def __init__(self, fail: str | None = None):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd, cwd=None, env=None, **kw):
        from llmrec.config import to_dict
        from llmrec.finetune import load_recipe

        self.calls.append(list(cmd))
        recipe = cmd[cmd.index("--config") + 1]
        if self.fail and self.fail in recipe:
            return subprocess.CompletedProcess(cmd, 3)
        sets = [w for w in cmd if "=" in w and not w.startswith("-")]
        out = Path(dict(s.split("=", 1) for s in sets)["output_dir"])
        (out / "adapter").mkdir(parents=True, exist_ok=True)
        (out / "adapter" / "adapter_config.json").write_text("{}")
        (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(load_recipe(ROOT / recipe, sets)), sort_keys=False))
        return subprocess.CompletedProcess(cmd, 0)

    def recipes(self) -> list[str]:
        return [Path(c[c.index("--config") + 1]).name for c in self.calls]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """The CLI's bench with `run_bench` recording its config and the training steps faked."""
    import llmrec.bench
    import llmrec.finetune.runs as runs

    monkeypatch.setenv("LLMREC_HOME", str(tmp_path / "home"))
    state = SimpleNamespace(cfgs=[], train=FakeTrain())

    def fake_run_bench(cfg, command=None):
        state.cfgs.append(cfg)
        md = tmp_path / "bench.md"
        md.write_text("# bench\n")
        return md.with_suffix(".json")

    monkeypatch.setattr(llmrec.bench, "run_bench", fake_run_bench)

    def install(fail: str | None = None) -> FakeTrain:
        state.train = FakeTrain(fail)
        monkeypatch.setattr(runs, "subprocess", SimpleNamespace(**{**vars(subprocess), "run": state.train}))
        return state.train

    install()
    state.install = install
    return state


def test_bench_train_trains_the_three_shipped_recipes_then_benches_them(bench, tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["bench", "--dataset", "ml-100k", "--train"]) == 0
    assert bench.train.recipes() == ["yesno_smollm2_qlora.yaml", "rank_smollm2_qlora.yaml",
                                     "next_title_smollm2_qlora.yaml"]
    for cmd in bench.train.calls:
        assert cmd[:2] == [sys.executable, "finetune/train.py"]
        assert "eval_before=false" in cmd and "eval_after=false" in cmd and "dataset=ml-100k" in cmd
        # the recipe's own length: no step budget
        assert not any(w.startswith(("train.max_steps=", "data.n_train=")) for w in cmd)
    cfg = bench.cfgs[-1]
    assert cfg.adapter_yesno == str(home / "finetune" / "bench_yesno_ml-100k" / "adapter")
    assert cfg.adapter_rank == str(home / "finetune" / "bench_rank_ml-100k" / "adapter")
    assert cfg.adapter_title == str(home / "finetune" / "bench_next_title_ml-100k" / "adapter")

    # the same command again: every adapter reused, nothing trained, the bench run with the same adapters
    capsys.readouterr()
    assert main(["bench", "--dataset", "ml-100k", "--train"]) == 0
    assert len(bench.train.calls) == 3
    assert capsys.readouterr().out.count("reusing") == 3
    assert bench.cfgs[-1] == cfg


def test_bench_train_retrains_a_folder_trained_for_fewer_steps(bench, tmp_path, capsys):
    """A 32-step run of the same recipe (the demo's budget) saved in the bench's folder is not the recipe's adapter:
    `train.max_steps` is not a training key for resuming a checkpoint, so the recipe check alone took it."""
    home = tmp_path / "home"
    assert main(["bench", "--train"]) == 0
    saved = home / "finetune" / "bench_rank_ml-100k" / "recipe.yaml"
    recipe = yaml.safe_load(saved.read_text())
    recipe["train"]["max_steps"] = 32
    saved.write_text(yaml.safe_dump(recipe, sort_keys=False))
    capsys.readouterr()
    assert main(["bench", "--train"]) == 0
    again = bench.train.calls[3:]
    assert [Path(c[c.index("--config") + 1]).name for c in again] == ["rank_smollm2_qlora.yaml"]
    assert "train.resume=null" in again[0]
    out = capsys.readouterr().out
    assert "another recipe" in out and "train.max_steps: 32 -> -1" in out, out


def test_bench_train_leaves_named_adapters_and_unused_modes_alone(bench, tmp_path):
    mine = tmp_path / "mine" / "adapter"
    assert main(["bench", "--train", "--set", f"adapter_yesno={mine}", "rank_modes=[likelihood]"]) == 0
    assert bench.train.recipes() == ["next_title_smollm2_qlora.yaml"]  # no letters rows: no rank adapter
    cfg = bench.cfgs[-1]
    assert cfg.adapter_yesno == str(mine) and cfg.adapter_rank is None
    assert cfg.adapter_title.endswith("bench_next_title_ml-100k/adapter")
    assert main(["bench", "--train", "--set", "llm=false"]) == 0  # no LLM rows: nothing to train
    assert len(bench.train.calls) == 1


def test_bench_train_stops_at_a_failed_run_without_benching(bench, capsys):
    bench.install(fail="rank_smollm2")
    assert main(["bench", "--train"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmrec bench: error: `") and "rank_smollm2_qlora.yaml" in err and "code 3" in err
    assert len(err.splitlines()) == 1
    assert not bench.cfgs  # no bench with a missing adapter
    assert bench.train.recipes() == ["yesno_smollm2_qlora.yaml", "rank_smollm2_qlora.yaml"]


def test_bench_without_adapters_never_picks_a_demo_or_memory_run(tmp_path, monkeypatch):
    """The bench's default adapter was any folder matching *<task>*<dataset>*: after `make demo`, `make bench` wrote
    eval/results/ with the demo's 32-step adapters."""
    from llmrec.bench import _finetune_default

    monkeypatch.setenv("LLMREC_HOME", str(tmp_path))
    for name in ("demo_yesno_ml-100k_32steps", "yesno_ml-100k_1206b", "bench_yesno_mem_ml-100k"):
        (tmp_path / "finetune" / name / "adapter").mkdir(parents=True)
    assert _finetune_default("yesno", "ml-100k") is None
    (tmp_path / "finetune" / "bench_yesno_ml-100k" / "adapter").mkdir(parents=True)
    assert _finetune_default("yesno", "ml-100k") == str(tmp_path / "finetune" / "bench_yesno_ml-100k" / "adapter")
    (tmp_path / "finetune" / "yesno_ml-100k" / "adapter").mkdir(parents=True)  # `make finetune`'s output first
    assert _finetune_default("yesno", "ml-100k") == str(tmp_path / "finetune" / "yesno_ml-100k" / "adapter")
