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


def write_fake_run(out: Path, cfg) -> None:
    """What a training run leaves that the reuse check reads: the adapter's config, the resolved recipe.yaml and the
    data_manifest.json fields (the template's hash, the example code's version, the examples' hashes)."""
    import json

    import llmrec.prompts as prompts_api
    from llmrec.config import to_dict
    from llmrec.finetune.data import EXAMPLES_VERSION, resolve_template

    (out / "adapter").mkdir(parents=True, exist_ok=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    template = resolve_template(prompts_api, cfg.data.template or cfg.task)
    (out / "data_manifest.json").write_text(json.dumps({
        "task": cfg.task, "examples_version": EXAMPLES_VERSION[cfg.task], "template": {"hash": template.hash},
        "train": {"sha256": "train-of-" + cfg.task}, "valid": {"sha256": "valid-of-" + cfg.task}}))


class FakeTrain:
    """Stands in for `subprocess.run` of `finetune/train.py`: writes the adapter and the resolved recipe.yaml the run
    would leave in its output_dir; exit code 3 for a recipe named in `fail`."""

    def __init__(self, fail: str | None = None):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd, cwd=None, env=None, **kw):
        from llmrec.finetune import load_recipe

        self.calls.append(list(cmd))
        recipe = cmd[cmd.index("--config") + 1]
        if self.fail and self.fail in recipe:
            return subprocess.CompletedProcess(cmd, 3)
        sets = [w for w in cmd if "=" in w and not w.startswith("-")]
        out = Path(dict(s.split("=", 1) for s in sets)["output_dir"])
        write_fake_run(out, load_recipe(ROOT / recipe, sets))
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


def test_bench_train_retrains_an_adapter_whose_examples_the_code_no_longer_builds(bench, tmp_path, capsys,
                                                                                  monkeypatch):
    """The recipe alone decided reuse: an adapter trained on examples an older version of the example-building code
    made (title twins among rank's training candidates) was reused although a fresh machine trains on others. Where
    the recorded version differs, the examples are built again and compared: other examples -> trained again; the
    same ones -> reused. A changed template -> trained again."""
    import json

    import llmrec.data
    import llmrec.finetune.data as fdata
    import llmrec.llm.loading

    home = tmp_path / "home"
    assert main(["bench", "--train"]) == 0
    built: list[str] = []
    monkeypatch.setattr(llmrec.data, "load_prepared", lambda name, *a, **k: SimpleNamespace(name=name))
    monkeypatch.setattr(llmrec.llm.loading, "load_tokenizer", lambda model, *a, **k: None)
    monkeypatch.setattr(fdata, "build_examples", lambda ds, task, data, tok: built.append(task) or {"task": task})
    rebuilt = {"rank": "other", "next_title": "same"}
    monkeypatch.setattr(fdata, "manifest", lambda ds, task, data, ex, *a: {
        s: {"sha256": f"{s}-of-{task}" if rebuilt[task] == "same" else "changed"} for s in ("train", "valid")})
    for task in ("rank", "next_title"):  # both recorded by an older version (no examples_version: version 1)
        path = home / "finetune" / f"bench_{task}_ml-100k" / "data_manifest.json"
        man = json.loads(path.read_text())
        del man["examples_version"]
        path.write_text(json.dumps(man))
    capsys.readouterr()
    assert main(["bench", "--train"]) == 0
    assert built == ["rank", "next_title"]  # yesno's version is unchanged: not rebuilt
    again = bench.train.calls[3:]
    assert [Path(c[c.index("--config") + 1]).name for c in again] == ["rank_smollm2_qlora.yaml"]
    assert "train.resume=null" in again[0]
    out = capsys.readouterr().out
    assert "training examples (train/valid): built by example code version 1 -> 2" in out, out
    assert out.count("reusing") == 2, out  # yesno, and next_title whose rebuilt examples are the same
    # the same examples: the manifest now records the current version, so the next run builds nothing
    from llmrec.finetune.data import EXAMPLES_VERSION

    man = json.loads((home / "finetune" / "bench_next_title_ml-100k" / "data_manifest.json").read_text())
    assert man["examples_version"] == EXAMPLES_VERSION["next_title"] and man["examples_version_checked"]["from"] == 1
    assert man["train"]["sha256"] == "train-of-next_title"
    built.clear()
    assert main(["bench", "--train"]) == 0 and built == [] and len(bench.train.calls) == 4

    # a template edited since the run: trained again, without building anything
    path = home / "finetune" / "bench_yesno_ml-100k" / "data_manifest.json"
    man = json.loads(path.read_text())
    man["template"]["hash"] = "0" * 64
    path.write_text(json.dumps(man))
    built.clear()
    capsys.readouterr()
    assert main(["bench", "--train"]) == 0
    assert [Path(c[c.index("--config") + 1]).name for c in bench.train.calls[4:]] == ["yesno_smollm2_qlora.yaml"]
    assert "template yesno" in capsys.readouterr().out and built == []


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
