"""Every command the docs give, and every command a result file records, still parses at HEAD: its sub-command and
options exist, its `key=value` overrides name real config keys with values of the right type, its `make` target
exists. Nothing is run: a script's `main()` stops at its argument parser. A renamed option or config key fails
here instead of in the hands of someone reproducing a figure."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "eval/FINDINGS.md", "llmrec/README.md", "finetune/README.md", "serve/README.md",
        "prompts/README.md", "llmrec/baselines/README.md"]
SCRIPT_DIRS = ["eval", "finetune", "serve"]
START = (r"(?:llmrec(?=\s|$)|make(?=\s)|python (?:eval|finetune|serve)/\w+\.py"
         r"|(?:accelerate launch|torchrun)\b[^`\n]*?finetune/train\.py)")
INLINE = re.compile(rf"`({START}\b[^`]*)`")
# placeholders the docs use for a value the reader fills in, and a value of the right type for each
PLACEHOLDERS = {"S": "1", "B": "1", "N": "1", "M": "artifacts/models/m", "DIR": "artifacts/x", "X": "x",
                "NAME": "x", "PATH": "x", "F": "x"}


def _optional_variants(cmd: str) -> list[str]:
    """`a [--b c]` -> ["a", "a --b c"]: an optional part (one starting with '-') left out and put in. A YAML list
    value such as `rank_modes=[likelihood]` is not optional."""
    m = re.search(r"\[(-[^\[\]]*)\]", cmd)
    if not m:
        return [cmd]
    return (_optional_variants(cmd[: m.start()] + cmd[m.end():])
            + _optional_variants(cmd[: m.start()] + m.group(1) + cmd[m.end():]))


def _alternatives(words: list[str]) -> list[list[str]]:
    """`--model pop|mf` -> one command per alternative."""
    for i, w in enumerate(words):
        if "|" in w and "://" not in w:
            return [alt for a in w.split("|") for alt in _alternatives(words[:i] + [a] + words[i + 1:])]
    return [words]


def _normalise(cmd: str) -> list[list[str]] | None:
    """The argv lists a documented command stands for, or None where it is prose (an ellipsis, `<a folder>`)."""
    cmd = " ".join(cmd.replace("\\\n", " ").split())
    if "..." in cmd or "<" in cmd or "…" in cmd:
        return None
    out = []
    for variant in _optional_variants(cmd):
        try:
            words = shlex.split(variant)
        except ValueError:
            return None
        words = [re.sub(r"(^|=)([A-Z]+)$", lambda m: m.group(1) + PLACEHOLDERS.get(m.group(2), m.group(2)), w)
                 for w in words]
        out += _alternatives(words)
    return out


def doc_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for m in INLINE.finditer(text):
            found.append((f"{doc} (inline)", m.group(1)))
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
            block = block.replace("\\\n", " ")
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                if re.match(START + r"(\s|$)", line):
                    found.append((doc, line))
    return found


def _split_outside_quotes(cmd: str) -> list[str]:
    """`A; B` -> [A, B], where the `;` is not inside a single-quoted argument (a note may hold one)."""
    parts, start, quoted = [], 0, False
    for i, c in enumerate(cmd):
        if c == "'":
            quoted = not quoted
        elif c == ";" and not quoted:
            parts.append(cmd[start:i])
            start = i + 1
    return [*parts, cmd[start:]]


def result_commands() -> list[tuple[str, str]]:
    found = []
    for path in sorted((ROOT / "eval" / "results").rglob("*.json")):
        data = json.loads(path.read_text())
        cmds = [data.get("command")] if isinstance(data, dict) else []
        if isinstance(data, dict):
            cmds += [v.get("command") for v in data.values() if isinstance(v, dict)]
            cmds += [v.get("command") for v in data.get("runs", []) if isinstance(v, dict)]
            cmds += list((data.get("commands") or {}).values())
        for cmd in cmds:
            if not isinstance(cmd, str) or not cmd:
                continue
            # a record of several steps ("A; then B"), some with a remark in parentheses or a label ("variants: B")
            while True:  # remarks in parentheses, innermost first (inside a quoted note they do no harm)
                shorter = re.sub(r"\s*\([^()]*\)", "", cmd)
                if shorter == cmd:
                    break
                cmd = shorter
            for part in _split_outside_quotes(cmd):
                m = re.search(r"(?:^|\s)((?:llmrec|python|\w+\.py)(?:\s.*)?)$", part)
                if m:
                    found.append((str(path.relative_to(ROOT)), m.group(1).strip()))
    return found


class _Parsed(BaseException):
    """Raised by the patched `parse_args` once a script's arguments parsed (a BaseException, so that no script's
    `except Exception` catches it)."""


_depth = [0]


def _stop_after(parse):
    """`parse`, raising `_Parsed` with its result when it is the outermost parse (`parse_intermixed_args` calls
    `parse_known_args` inside: stopping there would skip the checks of the outer call)."""

    def parse_then_stop(self, *args, **kwargs):
        _depth[0] += 1
        try:
            ns = parse(self, *args, **kwargs)
        finally:
            _depth[0] -= 1
        if _depth[0]:
            return ns
        raise _Parsed(ns)

    return parse_then_stop


@pytest.fixture(autouse=True)
def _nowhere_to_write(tmp_path, monkeypatch):
    """Should a command get past its parser after all, it finds an empty home and results folder, not the real ones."""
    import llmrec.bench_utils

    monkeypatch.setenv("LLMREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMREC_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(llmrec.bench_utils, "RESULTS_DIR", tmp_path / "results")


def _script(name: str) -> Path:
    path = ROOT / name
    if path.parent == ROOT:  # a bare `x.py`, as older result files record it
        hits = [ROOT / d / name for d in SCRIPT_DIRS if (ROOT / d / name).is_file()]
        assert len(hits) == 1, f"{name}: not one script of that name under {SCRIPT_DIRS}"
        path = hits[0]
    assert path.is_file(), f"{name}: no such script"
    return path


def _parse_script(path: Path, args: list[str], monkeypatch: pytest.MonkeyPatch, load_script) -> argparse.Namespace:
    source = path.read_text()
    if "ArgumentParser" not in source:
        assert args == [], f"{path.name} takes no arguments, got {args}"
        return argparse.Namespace()
    module = load_script(str(path.relative_to(ROOT)))
    # every way a script can parse stops there (a script that parsed by another and ran would train or write)
    for name in ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args"):
        monkeypatch.setattr(argparse.ArgumentParser, name, _stop_after(getattr(argparse.ArgumentParser, name)))
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    try:
        module.main()
    except _Parsed as done:
        return done.args[0]
    raise AssertionError(f"{path.name}: main() returned without parsing its arguments")


def _check_llmrec(args: list[str]) -> None:
    from llmrec.cli import build_parser
    from llmrec.config import ConfigError, apply_overrides, load_config

    ns = build_parser().parse_args(args)
    assert getattr(ns, "func", None), f"{args}: names no command"
    sets = list(getattr(ns, "set", None) or [])
    try:
        if ns.command == "finetune":
            from llmrec.finetune.config import FinetuneConfig

            config = ns.config if ns.config and (ROOT / ns.config).is_file() else None
            load_config(FinetuneConfig, config and ROOT / config, sets + list(ns.overrides or []))
        elif ns.command == "bench":
            from llmrec.bench import BenchConfig

            load_config(BenchConfig, ns.config and ROOT / ns.config, [f"dataset={ns.dataset}", *sets])
        elif ns.command == "data" and sets:
            from llmrec.data.prepare import PrepareConfig

            apply_overrides(PrepareConfig, {}, sets)
        elif ns.command == "serve":
            from llmrec.service.config import load_service_config

            load_service_config(ns.config and ROOT / ns.config, sets, environ={})
        elif ns.command == "baselines" and sets:
            from llmrec.baselines import get_model
            from llmrec.config import parse_overrides

            get_model(ns.model, **parse_overrides(sets))
    except ConfigError as e:
        raise AssertionError(f"{args}: {e}") from None


def _check(argv: list[str], monkeypatch: pytest.MonkeyPatch, load_script) -> None:
    head, *rest = argv
    if head == "make":
        targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        assert set(rest) <= targets, f"make: no target {sorted(set(rest) - targets)}"
    elif head == "llmrec":
        _check_llmrec(rest)
    elif head in ("accelerate", "torchrun"):  # the launcher's own options, then the training entry's
        i = next(i for i, w in enumerate(argv) if w.endswith("finetune/train.py"))
        _check_llmrec(["finetune", *argv[i + 1:]])
    elif head == "python" and rest[0].endswith("finetune/train.py"):
        _check_llmrec(["finetune", *rest[1:]])
    elif head == "python" or head.endswith(".py"):
        script, args = (_script(rest[0]), rest[1:]) if head == "python" else (_script(head), rest)
        ns = _parse_script(script, args, monkeypatch, load_script)
        if script == ROOT / "finetune" / "bench.py" and ns.overrides:  # recipe overrides, as `llmrec finetune` takes
            from llmrec.config import ConfigError, apply_overrides
            from llmrec.finetune.config import FinetuneConfig

            try:
                apply_overrides(FinetuneConfig, {}, ns.overrides)
            except ConfigError as e:
                raise AssertionError(str(e)) from None
    else:
        raise AssertionError(f"not a command these tests know: {argv}")


def _run(where: str, cmd: str, monkeypatch: pytest.MonkeyPatch, load_script) -> None:
    variants = _normalise(cmd)
    if variants is None:
        pytest.skip(f"prose, not a command: {cmd!r}")
    for argv in variants:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                _check(argv, monkeypatch, load_script)
        except SystemExit:  # argparse refused it
            if where.endswith("(inline)") and "arguments are required" in err.getvalue():
                continue  # prose naming a command and some of its options, not a whole invocation
            raise AssertionError(f"{where}: `{shlex.join(argv)}` does not parse: {err.getvalue().strip()}") from None
        except AssertionError as e:
            raise AssertionError(f"{where}: `{shlex.join(argv)}`: {e}") from None


def test_extraction_finds_the_readme_commands():
    cmds = [c for d, c in doc_commands() if d.startswith("README.md")]
    assert "make demo" in cmds and "make test" in cmds
    assert any(c.startswith("llmrec finetune --config finetune/recipes/") for c in cmds)
    assert _normalise("llmrec x [--a B] --m pop|mf") == [
        ["llmrec", "x", "--m", "pop"], ["llmrec", "x", "--m", "mf"],
        ["llmrec", "x", "--a", "1", "--m", "pop"], ["llmrec", "x", "--a", "1", "--m", "mf"]]
    assert _normalise("llmrec bench --set rank_modes=[likelihood]") == [["llmrec", "bench", "--set",
                                                                         "rank_modes=[likelihood]"]]
    assert _split_outside_quotes("a --note 'x; y'; then b") == ["a --note 'x; y'", " then b"]


@pytest.mark.parametrize("bad", [
    "llmrec finetune --config finetune/recipes/yesno_smollm2_qlora.yaml train.lr_typo=1e-4",
    "llmrec finetune --config finetune/recipes/yesno_smollm2_qlora.yaml train.batch_size=four",
    "llmrec bench --set no_such_key=1",
    "llmrec recommend --no-such-option",
    "python eval/title_prior.py --no-such-option",
    "python finetune/bench.py run --task yesno train.no_such_key=1",
    "python finetune/bench.py run --task yesno (a remark)",
    "python eval/nonexistent.py",
    "make no-such-target",
])
def test_a_stale_command_fails(bad, monkeypatch, load_script):
    with pytest.raises(AssertionError):
        _run("test", bad, monkeypatch, load_script)


@pytest.mark.parametrize("where,cmd", doc_commands(), ids=lambda v: " ".join(str(v).split())[:90])
def test_documented_command_parses(where, cmd, monkeypatch, load_script):
    _run(where, cmd, monkeypatch, load_script)


@pytest.mark.parametrize("where,cmd", result_commands(), ids=lambda v: " ".join(str(v).split())[:90])
def test_recorded_command_parses(where, cmd, monkeypatch, load_script):
    _run(where, cmd, monkeypatch, load_script)
