"""The `llmrec` command line as a user meets it: `--help` (instant, and saying what each command does), usage errors
(exit 2), config files and `key=value` overrides (refused with the file or the override and the key), and
`llmrec demo` (honest about its own results, loud when a step fails, no stale artifacts, right folders). Nothing
here trains, benchmarks or loads a model: the demo's steps are faked at the subprocess boundary."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llmrec.cli import build_parser, main
from llmrec.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMREC_RESULTS", str(tmp_path / "results"))


# ---------------------------------------------------------------------------------------------------------------
# --help
def test_top_level_help_imports_no_heavy_module():
    """`llmrec --help` stays instant: no torch / transformers / pandas / numpy import on the way to the parser."""
    code = ("import sys\nfrom llmrec.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'pandas', 'numpy', 'sentence_transformers', 'httpx',"
            " 'fastapi') if m in sys.modules]\nprint('HEAVY', heavy)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stdout, p.stdout[-500:]


def _subparsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*prefix, name), sub, helps.get(name)
                yield from _subparsers(sub, (*prefix, name))


def test_every_subcommand_help_says_what_it_does():
    """`llmrec recommend --help` used to print only its usage and options: the one-line description shown in
    `llmrec --help` was not in the sub-command's own help."""
    missing = []
    for path, sub, line in _subparsers(build_parser()):
        assert line, f"llmrec {' '.join(path)}: no help line in its parent's list"
        own = " ".join((sub.description or "").split())  # that line, or a description of its own
        if not own or own not in " ".join(sub.format_help().split()):
            missing.append(" ".join(path))
    assert not missing, f"--help without a description: {missing}"


@pytest.mark.parametrize("command", [("recommend",), ("demo",), ("bench",), ("retrieve",), ("prompt",),
                                     ("eval", "rank"), ("eval", "yesno"), ("eval", "contamination"),
                                     ("baselines", "train"), ("baselines", "eval"), ("finetune",), ("export",)])
def test_every_option_has_a_help_text(command):
    sub = {path: p for path, p, _ in _subparsers(build_parser())}[command]
    bare = [a.option_strings[0] for a in sub._actions if a.option_strings and a.help is None]
    assert not bare, f"llmrec {' '.join(command)}: options without help: {bare}"


# ---------------------------------------------------------------------------------------------------------------
# usage errors: exit status 2 with the reason, before any data or model is loaded
def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, (e.value.code, err)
    return err + str(e.value)


def test_retrieve_needs_exactly_one_of_user_or_profile(capsys):
    assert "--user" in _usage_error(["retrieve", "--dataset", "nowhere"], capsys)
    assert "not allowed with" in _usage_error(["retrieve", "--dataset", "nowhere", "--user", "1", "--profile", "x"],
                                              capsys)


def test_retrieve_profile_with_a_cf_mode_is_a_usage_error_before_the_dataset_is_read(capsys):
    """It used to read the dataset (an error about it came first) and, for a prepared one, build the text index
    before saying that --profile works with --mode text only."""
    err = _usage_error(["retrieve", "--dataset", "nowhere", "--profile", "space operas", "--mode", "cf"], capsys)
    assert "--profile works with --mode text" in err


def test_conflicting_flags_are_usage_errors(capsys):
    err = _usage_error(["recommend", "--dataset", "nowhere", "--user-id", "1", "--backend", "vllm",
                        "--load-in-4bit"], capsys)
    assert "--load-in-4bit is for --backend transformers" in err
    assert "exactly one of --merge" in _usage_error(["export", "--out", "x"], capsys)
    assert "--merge needs --adapter" in _usage_error(["export", "--merge", "--out", "x"], capsys)


# ---------------------------------------------------------------------------------------------------------------
# config values
@pytest.mark.parametrize("override,expected", [
    ("backend=null", r"^override backend: expected a string, got None"),
    ("dtype=yes", r"^override dtype: expected a string, got True \(YAML reads"),
    ("baselines=[pop, no]", r"^override baselines\[1\]: expected a string, got False"),
])
def test_a_null_or_boolean_for_a_string_key_is_refused(override, expected):
    """`--set backend=null` (or `dtype: yes` in a file: YAML's boolean) became the string 'None' / 'True'."""
    from llmrec.bench import BenchConfig

    with pytest.raises(ConfigError, match=expected):
        load_config(BenchConfig, None, [override])


def test_a_null_string_key_in_a_config_file_names_the_file_and_key(tmp_path):
    from llmrec.bench import BenchConfig

    p = tmp_path / "bench.yaml"
    p.write_text("rank_users: 10\ndataset:\n")
    with pytest.raises(ConfigError, match=r"bench\.yaml: dataset: expected a string, got None"):
        load_config(BenchConfig, p)
    p.write_text("rank_users: 10\ndataset: 'no'\nmodel: null\n")  # quoted: a string; null where None is allowed
    cfg = load_config(BenchConfig, p)
    assert cfg.dataset == "no" and cfg.model is None


def test_every_shipped_config_still_loads():
    """The stricter string check refuses nothing the repository ships."""
    from llmrec.finetune import load_recipe
    from llmrec.prompts import load_template
    from llmrec.service.config import load_service_config

    for recipe in sorted((ROOT / "finetune" / "recipes").glob("*.yaml")):
        load_recipe(recipe)
    load_service_config(ROOT / "serve" / "config.yaml", [], environ={})
    for template in sorted((ROOT / "prompts").glob("*.yaml")):
        load_template(template.stem)


def test_baselines_train_config_errors_name_the_file_or_the_override_before_reading_data(tmp_path, capsys):
    """`llmrec baselines train --config my.yaml` with a misspelt key said `baselines.mf: unknown key(s)`, naming
    neither the file nor `--set`, and only after reading the dataset."""
    bad = tmp_path / "my_mf.yaml"
    bad.write_text("dimm: 8\n")
    assert main(["baselines", "train", "--dataset", "nowhere", "--model", "mf", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: unknown key(s) ['dimm'] (did you mean 'dim'?)" in err, err
    assert main(["baselines", "train", "--dataset", "nowhere", "--model", "mf", "--set", "lr=fast"]) == 1
    err = capsys.readouterr().err
    assert "--set lr: expected float, got 'fast'" in err, err
    bad.write_text("dim: 8\nepochs: [1\n")
    assert main(["baselines", "train", "--dataset", "nowhere", "--model", "mf", "--config", str(bad)]) == 1
    assert f"{bad}: line 3 invalid YAML" in capsys.readouterr().err


def test_recommend_unknown_user_is_one_clear_line_before_a_model_loads(tiny_dataset, tiny_home, monkeypatch, capsys):
    import llmrec.cli.recommend as rec_cli

    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    monkeypatch.setattr(rec_cli, "_backend", lambda args: pytest.fail("a model was loaded for an unknown user"))
    assert main(["recommend", "--dataset", "tiny", "--user-id", "nobody"]) == 1
    assert capsys.readouterr().err.strip() == "llmrec: error: unknown user 'nobody' in dataset tiny"


# ---------------------------------------------------------------------------------------------------------------
# llmrec demo: its steps faked at the subprocess boundary (nothing is trained, benchmarked or served)
class FakeSteps:
    """Stands in for `subprocess.run` in llmrec.demo: records each command with its folder and environment, and
    writes what the real step would (an adapter with its recipe.yaml, the bench's json/md), resolving relative paths
    against the folder the step runs in, as the real one would. A path that would land outside `home` is recorded
    in `escaped` and not written."""

    def __init__(self, home: Path, fail: str | None = None):
        self.home, self.fail, self.calls, self.escaped = home.resolve(), fail, [], []

    def _path(self, value: str, cwd, env) -> Path | None:
        p = Path(value)
        p = p if p.is_absolute() else Path(cwd or os.getcwd()) / p
        if not p.resolve().is_relative_to(self.home):
            self.escaped.append(str(p))
            return None
        return p

    def __call__(self, cmd, check=False, cwd=None, env=None, **kw):
        self.calls.append(SimpleNamespace(cmd=list(cmd), cwd=cwd, env=env))
        text = " ".join(cmd)
        if self.fail and self.fail in text:
            if check:
                raise subprocess.CalledProcessError(3, cmd)
            return subprocess.CompletedProcess(cmd, 3)
        sets = [w for w in cmd if "=" in w and not w.startswith("-")]
        if "finetune/train.py" in text:
            from llmrec.finetune import load_recipe

            recipe = cmd[cmd.index("--config") + 1]
            out = self._path(dict(s.split("=", 1) for s in sets)["output_dir"], cwd, env)
            if out is not None:
                from tests.test_bench_train import write_fake_run

                write_fake_run(out, load_recipe(ROOT / recipe, sets))
        elif " bench " in f" {text} ":
            from llmrec.bench import BenchConfig

            dataset = cmd[cmd.index("--dataset") + 1]
            cfg = load_config(BenchConfig, None, [f"dataset={dataset}", *sets])
            out = self._path(cfg.results_dir, cwd, env)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"bench_{dataset}.json").write_text(json.dumps({"config": vars(cfg)}, default=str))
                (out / f"bench_{dataset}.md").write_text(f"# bench_{dataset}\n")
        return subprocess.CompletedProcess(cmd, 0)

    def ran(self, what: str) -> list[SimpleNamespace]:
        return [c for c in self.calls if what in " ".join(c.cmd)]


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """llmrec.demo with stage 1 (data) and stage 4 (the service) faked; `demo.steps` records the subprocesses."""
    import llmrec.cli.data
    import llmrec.data
    from llmrec import demo as demo_mod

    def fake_dir(name, home=None):
        d = tmp_path / "data" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").write_text("{}")
        return d

    def fake_load(name, home=None, prepare_if_missing=None):
        return SimpleNamespace(name=name, manifest={"stats": {}}, has_user=lambda u: u == "1")

    monkeypatch.setattr(llmrec.data, "dataset_dir", fake_dir)
    monkeypatch.setattr(llmrec.data, "load_prepared", fake_load)
    monkeypatch.setattr(llmrec.data, "prepare", lambda *a, **k: pytest.fail("prepare() called"))
    monkeypatch.setattr(llmrec.cli.data, "format_stats", lambda name, st, seconds=None: f"== {name}")
    state = SimpleNamespace(served=[], steps=None)
    monkeypatch.setattr(demo_mod, "service_stage", lambda *a, **k: state.served.append((a, k)))
    monkeypatch.chdir(tmp_path)

    def install(home: Path, fail: str | None = None) -> FakeSteps:
        state.steps = FakeSteps(home, fail)
        # the demo module's view of subprocess only: pytest and everything else keep the real one
        monkeypatch.setattr(demo_mod, "subprocess", SimpleNamespace(**{**vars(subprocess), "run": state.steps}))
        return state.steps

    state.install = install
    state.ran = lambda what: state.steps.ran(what)
    install(tmp_path / "home")
    return state


def test_demo_a_failed_step_exits_1_naming_the_command(demo, capsys):
    """A failed fine-tuning run ended the demo with a CalledProcessError traceback."""
    demo.install(Path(os.environ["LLMREC_HOME"]), fail="rank_smollm2_qlora.yaml")
    assert main(["demo", "--fast"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "finetune/recipes/rank_smollm2_qlora.yaml" in err and "exited with code 3" in err, err
    assert "fine-tune" in err  # the stage
    assert not demo.ran(" bench ") and not demo.served  # nothing after the failed step ran


def test_demo_refuses_an_unknown_user_before_any_training(demo, capsys):
    """`llmrec demo --user-id nobody` trained and benchmarked for half an hour, then failed in the service stage
    on the 404 answer with `llmrec: error: items`."""
    assert main(["demo", "--fast", "--user-id", "nobody"]) != 0
    assert "'nobody'" in capsys.readouterr().err
    assert not demo.steps.calls and not demo.served


def test_demo_reruns_a_bench_made_with_other_settings(demo, capsys):
    """A `llmrec demo --fast` bench (10 users, 3 baselines, 2-step adapters) newer than the full demo's adapters was
    shown as the full demo's benchmark: reuse looked at file times only, not at what the bench ran."""
    home = Path(os.environ["LLMREC_HOME"])
    assert main(["demo"]) == 0 and len(demo.ran(" bench ")) == 1
    assert main(["demo", "--fast"]) == 0 and len(demo.ran(" bench ")) == 2
    past = time.time() - 3600  # the full demo's adapters are older than the fast bench
    for d in (home / "finetune").glob("demo_*_32steps/adapter"):
        for f in (d, *d.iterdir()):
            os.utime(f, (past, past))
    capsys.readouterr()
    assert main(["demo"]) == 0
    assert len(demo.ran(" bench ")) == 3, "the fast run's bench was reused for the full demo"
    assert "other settings" in capsys.readouterr().out
    # and the same settings again: reused, and said so
    assert main(["demo"]) == 0 and len(demo.ran(" bench ")) == 3
    assert "reused" in capsys.readouterr().out


def test_demo_retrains_an_adapter_trained_with_another_recipe(demo, capsys):
    """An adapter in the demo's folder was reused whatever recipe it had been trained with (an older version of the
    recipe, another learning rate)."""
    home = Path(os.environ["LLMREC_HOME"])
    assert main(["demo", "--fast"]) == 0
    assert len(demo.ran("finetune/train.py")) == 3
    run = home / "finetune" / "demo_yesno_ml-100k_2steps"
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["train"]["lr"] = saved["train"]["lr"] * 10
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    capsys.readouterr()
    assert main(["demo", "--fast"]) == 0
    again = demo.ran("finetune/train.py")[3:]
    assert [c.cmd[c.cmd.index("--config") + 1] for c in again] == ["finetune/recipes/yesno_smollm2_qlora.yaml"]
    assert "train.resume=null" in again[0].cmd  # a checkpoint of the other recipe is not resumed
    assert len(demo.ran(" bench ")) == 2  # the retrained adapter (rewritten in place) is benchmarked again
    out = capsys.readouterr().out
    assert "another recipe" in out and "train.lr" in out, out
    assert out.count("reusing") == 2  # rank and next_title: their recipes did not change


def test_demo_with_a_relative_home_uses_the_same_folders_in_every_step(demo, tmp_path, monkeypatch):
    """`LLMREC_HOME` defaults to `./artifacts`, relative to where `llmrec demo` starts; the steps run in the
    checkout, where the same relative path names another folder: from outside the checkout the demo checked one
    folder for adapters and trained into another (never reusing them; with a bench present it failed on the
    missing adapter paths)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("LLMREC_HOME", "artifacts")
    steps = demo.install(elsewhere / "artifacts")
    assert main(["demo", "--fast"]) == 0
    assert not steps.escaped, f"written outside {elsewhere / 'artifacts'}: {steps.escaped}"
    assert all(c.env and c.env.get("LLMREC_HOME") == str(elsewhere / "artifacts") for c in steps.calls)
    n = len(steps.calls)
    assert main(["demo", "--fast"]) == 0 and len(steps.calls) == n  # the second run reuses all of it


# the service stage against a stand-in service (stdlib HTTP server): never the real one
FAKE_SERVICE = textwrap.dedent('''
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    port, mode = int(sys.argv[1]), sys.argv[2]
    items = [{"rank": i + 1, "score": 1.0 - i / 10, "item_id": f"i{i}", "title": f"Film {i}"} for i in range(6)]
    state = {"rated": set()}

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.startswith("/ready") or self.path.startswith("/health"):
                return self._send(200, {"ready": True, "backend": "fake"})
            if mode == "404":
                return self._send(404, {"error": {"type": "not_found", "field": "path.user_id",
                                                  "message": "unknown user: no events stored for this user_id"}})
            shown = [it for it in items if it["item_id"] not in state["rated"]][:5]
            self._send(200, {"user_id": "1", "items": shown, "backend": "fake", "model": "m",
                             "degraded": mode == "degraded", "explanation": "x"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if mode != "same":
                state["rated"].add(body["item_id"])
            self._send(201, {"event": body})

    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')


@pytest.fixture
def fake_service(tmp_path, monkeypatch):
    from llmrec import demo as demo_mod

    script = tmp_path / "fake_service.py"
    script.write_text(FAKE_SERVICE)
    real_popen = subprocess.Popen
    mode = {"mode": "ok"}
    launched = []

    def popen(cmd, **kw):
        launched.append(cmd)
        if mode["mode"] == "crash":
            return real_popen([sys.executable, "-c", "raise SystemExit(3)"], start_new_session=True)
        port = next(w.split("=", 1)[1] for w in cmd if w.startswith("port="))
        return real_popen([sys.executable, str(script), port, mode["mode"]], start_new_session=True)

    monkeypatch.setattr(demo_mod, "subprocess", SimpleNamespace(**{**vars(subprocess), "Popen": popen}))

    def run(m: str, **kw):
        mode["mode"] = m
        return demo_mod.service_stage("ml-100k", "1", None, **kw)

    run.launched = launched
    return run


def test_demo_service_stage_passes_when_feedback_changes_the_answer(fake_service, capsys):
    fake_service("ok")
    out = capsys.readouterr().out
    assert "changed: True" in out and "now absent" in out and "service stopped" in out


@pytest.mark.parametrize("mode,match", [
    ("same", r"still recommended after the feedback"),  # the demo printed "changed: False" and succeeded
    ("404", r"HTTP 404 not_found: unknown user"),  # was `llmrec: error: items` (a KeyError on the error body)
    ("degraded", r"degraded"),  # the LLM did not answer: a collaborative fallback passed as the demo's result
    ("crash", r"exited with code 3"),  # was ProcessLookupError from stopping the already dead service
])
def test_demo_service_stage_fails_loudly(fake_service, mode, match, capsys):
    with pytest.raises(Exception, match=match):
        fake_service(mode)
    assert "service stopped" in capsys.readouterr().out


def test_bench_config_file_dataset_is_not_overridden_by_the_flag_default(tmp_path, monkeypatch, capsys):
    """`llmrec bench --config my.yaml` with `dataset: lastfm` in the file benchmarked ml-100k: the `--dataset`
    default was always passed as an override, and overrides win over the file."""
    import llmrec.bench

    ran = []
    monkeypatch.setattr(llmrec.bench, "run_bench", lambda cfg, command=None: ran.append(cfg) or pytest.fail("ran"))
    cfg_file = tmp_path / "bench.yaml"
    cfg_file.write_text("dataset: lastfm\nrank_users: 5\n")

    def resolved(argv: list[str]):
        with pytest.raises(pytest.fail.Exception):
            main(argv)
        return ran.pop()

    assert resolved(["bench", "--config", str(cfg_file)]).dataset == "lastfm"
    assert resolved(["bench"]).dataset == "ml-100k"  # the documented default
    assert resolved(["bench", "--config", str(cfg_file), "--dataset", "ml-1m"]).dataset == "ml-1m"  # the flag wins
    assert resolved(["bench", "--set", "dataset=ml-1m"]).dataset == "ml-1m"
    # two different datasets on one command line: refused, neither silently wins
    with pytest.raises(SystemExit) as e:
        main(["bench", "--dataset", "ml-100k", "--set", "dataset=ml-1m", "rank_users=3"])
    assert e.value.code == 2 and "--dataset ml-100k and --set dataset=ml-1m" in capsys.readouterr().err


def test_demo_service_uses_a_fresh_store_of_its_own(fake_service, tmp_path):
    """The demo's feedback event (user 1 rates the top item 1/5) went into the service's default event store,
    `$LLMREC_HOME/store/<dataset>.db`, which `llmrec serve` answers from afterwards; and each re-run of the demo
    started from the previous runs' fake ratings."""
    from llmrec import demo as demo_mod

    store = tmp_path / "home" / "demo" / "store_ml-100k.db"
    store.parent.mkdir(parents=True)
    for f in (store, Path(f"{store}-wal")):
        f.write_text("an earlier demo run's events")
    fake_service("ok", store=demo_mod.demo_store(tmp_path / "home", "ml-100k"))
    cmd = fake_service.launched[-1]
    assert f"store_url=sqlite:///{store}" in cmd
    assert not store.exists() and not Path(f"{store}-wal").exists()  # removed before the service started


def test_a_bare_key_error_says_where_it_came_from(monkeypatch, capsys):
    """`main` turns KeyError into one line; a failed dict lookup (a bug) printed only `llmrec: error: items`. It now
    names the exception and the line it came from; worded refusals ("unknown user ...") stay as they are."""
    import llmrec.cli.serve as serve_cli
    from llmrec.cli import main

    def lookup(args):
        return {}["items"]

    monkeypatch.setattr(serve_cli, "cmd_serve", lookup)
    assert main(["serve"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmrec: error: items (KeyError at test_cli_audit.py:") and "-v" in err, err

    def refusal(args):
        raise KeyError("unknown user 'x' in dataset tiny")

    monkeypatch.setattr(serve_cli, "cmd_serve", refusal)
    assert main(["serve"]) == 1
    assert capsys.readouterr().err.strip() == "llmrec: error: unknown user 'x' in dataset tiny"
