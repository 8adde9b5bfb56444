from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmrec.config import ConfigError, load_config


@dataclass
class Inner:
    r: int = 8
    modules: list[str] = field(default_factory=lambda: ["q_proj"])


@dataclass
class Cfg:
    name: str = "x"
    lr: float = 1e-3
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\nlr: 0.01\ninner:\n  r: 4\n")
    cfg = load_config(Cfg, p, ["flag=true", "inner.modules=[q_proj, v_proj]", "maybe=3"])
    assert cfg.name == "run" and cfg.lr == 0.01 and cfg.flag is True
    assert cfg.inner.r == 4 and cfg.inner.modules == ["q_proj", "v_proj"] and cfg.maybe == 3


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\nlearning_rate: 0.01\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*learning_rate"):
        load_config(Cfg, p)
    with pytest.raises(ConfigError, match=r"inner.*rank"):
        load_config(Cfg, None, ["inner.rank=3"])


def test_bad_types_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="lr"):
        load_config(Cfg, None, ["lr=fast"])
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Cfg, p)


@pytest.mark.parametrize("argv", [
    ["data", "show", "--dataset", "d"], ["prompt", "--template", "yesno", "--dataset", "d"],
    ["retrieve", "--dataset", "d"], ["recommend", "--dataset", "d"],
])
def test_every_user_command_takes_both_user_spellings(argv):
    from llmrec.cli import build_parser

    p = build_parser()
    for flag in ("--user", "--user-id"):
        ns = vars(p.parse_args(argv + [flag, "42"]))
        assert ns.get("user", ns.get("user_id")) == "42", flag


def test_an_override_error_names_the_override_not_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\n")
    with pytest.raises(ConfigError, match=r"^override inner\.rank: unknown key 'rank'; known keys of inner") as e:
        load_config(Cfg, p, ["inner.rank=3"])
    assert "c.yaml" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^override lr: expected float, got 'fast'"):
        load_config(Cfg, p, ["lr=fast"])
    with pytest.raises(ConfigError, match=r"^override inner: expected a mapping"):
        load_config(Cfg, p, ["inner=3"])
    assert load_config(Cfg, p, ["maybe=null"]).maybe is None
    p.write_text("name: run\nlearning_rate: 1\n")  # a bad file key is still the file's error, whatever the overrides
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key\(s\) \['learning_rate'\]"):
        load_config(Cfg, p, ["lr=0.1"])


def test_service_config_errors_name_the_environment_variable_or_the_override():
    from llmrec.service.config import load_service_config

    with pytest.raises(ConfigError, match=r"^environment \(LLMREC_SERVE_\*\) llm\.modle: unknown key 'modle' "
                                          r"\(did you mean 'model'\?\)"):
        load_service_config(None, [], environ={"LLMREC_SERVE_LLM__MODLE": "x"})
    with pytest.raises(ConfigError, match=r"^override max_k: expected int"):
        load_service_config(None, ["max_k=many"], environ={})
    with pytest.raises(ConfigError, match=r"^environment \(LLMREC_SERVE_\*\) port: must be within 1..65535"):
        load_service_config(None, [], environ={"LLMREC_SERVE_PORT": "0"})  # names the variable's source
    with pytest.raises(ConfigError, match=r"^override port: must be within"):
        load_service_config(None, ["port=0"], environ={"LLMREC_SERVE_PORT": "8000"})
    cfg = load_service_config(None, ["max_k=7"], environ={"LLMREC_SERVE_MAX_K": "9", "LLMREC_SERVE_DEFAULT_K": "5"})
    assert cfg.max_k == 7 and cfg.default_k == 5  # CLI overrides win over the environment


@pytest.mark.parametrize("k", ["0", "-3", "ten"])
def test_recommend_refuses_a_k_below_one(k, capsys):
    from llmrec.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["recommend", "--user-id", "1", "--k", k])
    assert "--k" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["eval", "rank", "--dataset", "d", "--max-users", "-1"],
                                  ["eval", "yesno", "--dataset", "d", "--max-examples", "-5"],
                                  ["eval", "yesno", "--dataset", "d", "--valid-examples", "x"],
                                  ["eval", "contamination", "--dataset", "d", "--n", "0"],
                                  ["data", "show", "--dataset", "d", "--user", "1", "--limit", "-3"],
                                  ["retrieve", "--dataset", "d", "--k", "0"],
                                  ["prompt", "--template", "t", "--dataset", "d", "--user", "1", "--history", "-1"],
                                  ["prompt", "--template", "t", "--dataset", "d", "--user", "1", "--max-tokens", "0"],
                                  ["baselines", "eval", "--dataset", "d", "--max-users", "0"],
                                  ["serve", "--port", "-1"]])
def test_cli_counts_refuse_negative_or_non_integer_values(argv, capsys):
    """A count below what it can mean (`data show --limit -3` used to print all but the first 3 events) stops at
    parsing with the option's name, before anything is loaded."""
    from llmrec.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert argv[-2] in capsys.readouterr().err
    smallest = "1" if argv[-2] in ("--n", "--k", "--max-tokens", "--max-users") else "0"
    assert build_parser().parse_args([*argv[:-1], smallest])


def test_a_misspelt_key_gets_a_suggestion_and_a_foreign_one_none(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\nflga: true\nnmae: x\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['flga', 'learning_rate', 'nmae'\] \(did you mean "
                                          r"'flag' for 'flga', 'name' for 'nmae'\?\); known keys"):
        load_config(Cfg, p)
    with pytest.raises(ConfigError, match=r"^override inner\.modules_: unknown key 'modules_' \(did you mean "
                                          r"'modules'\?\)"):
        load_config(Cfg, None, ["inner.modules_=[a]"])


def test_a_malformed_or_conflicting_override_is_a_config_error_naming_it(capsys):
    with pytest.raises(ConfigError, match=r"^override 'inner\.modules=\[a, b': the value is not valid YAML"):
        load_config(Cfg, None, ["inner.modules=[a, b"])
    with pytest.raises(ConfigError, match=r"^override 'inner\.r=2': inner is already set to a value"):
        load_config(Cfg, None, ["inner=3", "inner.r=2"])
    # the other order dropped inner.r without a word
    with pytest.raises(ConfigError, match=r"^override 'inner=3': inner replaces what override inner\.r=2 set"):
        load_config(Cfg, None, ["inner.r=2", "inner=3"])
    with pytest.raises(ConfigError, match=r"empty key part in 'inner\.\.r'"):
        load_config(Cfg, None, ["inner..r=2"])
    # spaces around a dotted part are not part of the key
    assert load_config(Cfg, None, ["inner. r=2"]).inner.r == 2
    from llmrec.cli import main

    # the CLI: a message and exit status 1, not a traceback (checked before any data is read)
    for bad in (["a=[1,2"], ["min_user_events=1", "min_user_events.x=2"]):
        assert main(["data", "prepare", "--dataset", "nowhere", "--set", *bad]) == 1
        assert "llmrec: error: override" in capsys.readouterr().err


def test_cli_prints_a_refused_value_as_one_line_and_shows_the_traceback_with_v(monkeypatch, capsys):
    """A ValueError from the library (a prompt over its token budget, too many candidates for the letters) is a
    one-line `llmrec: error:` with exit 1, not a traceback; `-v` re-raises it for debugging."""
    import llmrec.cli.data as cli_data
    from llmrec.cli import main

    def refuse(args):
        raise ValueError("RankingConfig.n_candidates=25 exceeds the 20 labels")

    monkeypatch.setattr(cli_data, "cmd_show", refuse)
    assert main(["data", "show", "--dataset", "d", "--user", "1"]) == 1
    assert capsys.readouterr().err.strip() == "llmrec: error: RankingConfig.n_candidates=25 exceeds the 20 labels"
    with pytest.raises(ValueError, match="n_candidates=25"):
        main(["-v", "data", "show", "--dataset", "d", "--user", "1"])


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`llmrec ... | head`: the reader closes the pipe; the command stops without a traceback or an
    'Exception ignored' report at exit."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LLMREC_HOME": str(tmp_path)}
    p = subprocess.Popen([sys.executable, "-m", "llmrec", "serve", "--print-config"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # before the command has written anything: every write of it meets a closed pipe
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert p.returncode == 1


@dataclass
class Named:
    out: Path | None = None
    tag: str = "x"
    count: int = 0
    ratio: float = 0.5
    sub: Inner = field(default_factory=Inner)


@pytest.mark.parametrize("typed", ["007", "0123", "12:30", "1_000", "0x1F", "1.10", "2024-01-01", "1e3"])
def test_a_name_or_folder_override_keeps_the_text_as_typed(typed, tmp_path):
    """YAML reads `007` as 7, `0123` as 83 (octal), `12:30` as 750 (base 60), `1.10` as 1.1: `--set output_dir=0123`
    wrote the run into a folder named 83. Str and Path keys keep the text; numeric keys still get the number."""

    cfg = load_config(Named, None, [f"out={typed}", f"tag= {typed}"])
    assert cfg.out == Path(typed) and cfg.tag == typed
    p = tmp_path / "c.yaml"
    p.write_text("tag: file\n")
    assert load_config(Named, p, [f"tag={typed}"]).tag == typed
    assert load_config(Named, None, ["count=007", "ratio=1.10"]) == Named(count=7, ratio=1.1)
    with pytest.raises(ConfigError, match="expected a string"):  # booleans and null stay refused, with the hint
        load_config(Named, None, ["tag=yes"])


def test_a_mapping_of_folders_keeps_its_values_as_typed():
    """Inside a mapping (the service's adapter registry) YAML still read `0123` as 83: `llm.adapters={a: 0123}`
    served the adapter folder '83'. Inline or dotted, the values keep their text; null / booleans stay refused."""
    from llmrec.service.config import load_service_config

    assert load_service_config(None, ["llm.adapters={a: 0123, b: 12:30, c: /x/y}"]).llm.adapters == {
        "a": "0123", "b": "12:30", "c": "/x/y"}
    assert load_service_config(None, ["llm.adapters.a=007", "llm.adapters.b=x"]).llm.adapters == {"a": "007", "b": "x"}
    for bad in ("llm.adapters={a: null}", "llm.adapters.a=true"):
        with pytest.raises(ConfigError, match="llm.adapters.a: expected a string"):
            load_service_config(None, [bad])


def test_service_environment_and_bench_dataset_keep_typed_text(monkeypatch, capsys):
    from llmrec.cli import main
    from llmrec.service.config import load_service_config

    cfg = load_service_config(None, ["dataset=0123"], environ={"LLMREC_SERVE_HOST": "0123"})
    assert cfg.dataset == "0123" and cfg.host == "0123"
    import llmrec.bench

    seen = []
    monkeypatch.setattr(llmrec.bench, "run_bench", lambda cfg, command=None: seen.append(cfg) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the config reached the bench: no "different datasets" refusal
        main(["bench", "--dataset", "0123", "--set", "dataset=0123"])
    assert seen[0].dataset == "0123"


@pytest.mark.parametrize("argv", [["serve"], ["data", "prepare", "--dataset", "d"],
                                  ["baselines", "train", "--dataset", "d", "--model", "mf"], ["bench"],
                                  ["finetune"]])
def test_set_given_twice_keeps_both_overrides(argv):
    """`--set port=8001 --set host=0.0.0.0` kept only the last --set's pairs (argparse's `store`): port 8001 was
    dropped without a word. Every --set now adds to the ones before it."""
    from llmrec.cli import build_parser

    args = build_parser().parse_args([*argv, "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]
    assert build_parser().parse_args(argv).set == []  # the default list is not shared between parses


def test_serve_set_given_twice_reaches_the_config(capsys):
    from llmrec.cli import main

    assert main(["serve", "--print-config", "--set", "port=8001", "--set", "host=0.0.0.0"]) == 0
    out = capsys.readouterr().out
    assert "\nport: 8001\n" in out and "\nhost: 0.0.0.0\n" in out


@pytest.mark.parametrize("script, argv", [("eval/baselines.py", ["--dataset", "d"]),
                                          ("serve/bench_serving.py", ["report"])])
def test_scripts_set_given_twice_keeps_both_overrides(load_script, monkeypatch, script, argv):
    import argparse
    import sys

    mod = load_script(script)
    seen = {}
    parse = argparse.ArgumentParser.parse_args

    class Parsed(Exception):
        pass

    def stop_after_parse(self, *a, **k):
        seen["args"] = parse(self, *a, **k)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after_parse)
    monkeypatch.setattr(sys, "argv", [script, *argv, "--set", "a.x=1", "--set", "b.y=2"])
    with pytest.raises(Parsed):
        mod.main()
    assert seen["args"].set == ["a.x=1", "b.y=2"]


def test_baselines_eval_model_given_twice_evaluates_both(monkeypatch, capsys):
    """`--model mf --model bpr` evaluated bpr alone; each model once, in the order given."""
    import llmrec.baselines
    import llmrec.baselines.evaluate
    import llmrec.data
    from llmrec.cli import main

    class DS:
        name, n_items = "d", 3

    evaluated = []
    monkeypatch.setattr(llmrec.data, "load_prepared", lambda *a, **k: DS())
    monkeypatch.setattr(llmrec.baselines, "load_model", lambda name, *a, **k: name)
    monkeypatch.setattr(llmrec.baselines.evaluate, "evaluate_model",
                        lambda model, *a, **k: evaluated.append(model) or {"ndcg@10": 0.5})
    assert main(["baselines", "eval", "--dataset", "d", "--model", "mf", "--model", "bpr", "mf"]) == 0
    assert evaluated == ["mf", "bpr"]
    assert capsys.readouterr().out.count("| mf ") == 1


@pytest.mark.parametrize("cmd", [["recommend", "--user-id", "1"], ["eval", "rank", "--dataset", "d"],
                                 ["eval", "yesno", "--dataset", "d"]])
@pytest.mark.parametrize("weight", ["-1", "nan", "inf", "x"])
def test_retrieval_weight_must_be_a_finite_number_at_least_zero(cmd, weight, capsys):
    """The service refuses a negative or non-finite retrieval_weight; `llmrec recommend` took -1 (the retrieval
    order counted against a candidate) and nan (refused only after the model had loaded)."""
    from llmrec.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*cmd, "--retrieval-weight", weight])
    assert e.value.code == 2 and "--retrieval-weight" in capsys.readouterr().err
    assert build_parser().parse_args([*cmd, "--retrieval-weight", "0"]).retrieval_weight == 0.0
    assert build_parser().parse_args([*cmd, "--retrieval-weight", "2.5"]).retrieval_weight == 2.5


def test_mapping_keys_and_values_are_coerced_to_their_types():
    """`llm.adapters: {a: null}` was kept as None (the service then served the base model under the adapter's
    name), and `{7: x}` failed with "argument of type 'int' is not iterable" (no key named)."""
    from llmrec.service.config import load_service_config

    with pytest.raises(ConfigError, match=r"override llm.adapters.a: expected a string, got None"):
        load_service_config(None, ["llm.adapters={a: null}"], environ={})
    with pytest.raises(ConfigError, match=r"llm.adapters.a: expected a string, got True"):
        load_service_config(None, ["llm.adapters={a: yes}"], environ={})
    cfg = load_service_config(None, ["llm.adapters={7: x, b: 12}", "llm.default_adapter=7"], environ={})
    assert cfg.llm.adapters == {"7": "x", "b": "12"} and cfg.llm.default_adapter == "7"
