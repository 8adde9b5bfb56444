"""Typed configuration: dataclasses loaded from YAML with unknown-key errors, plus CLI/env overrides.

No config file is ever executed or `eval`-ed: values are plain YAML scalars/lists/maps, checked against the dataclass
fields and coerced to the annotated types.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override is malformed; the message names the file and the key."""


def llmrec_home() -> Path:
    """Root of everything llmrec writes (prepared data, models, checkpoints): `$LLMREC_HOME`, default `./artifacts`."""
    return Path(os.environ.get("LLMREC_HOME", "artifacts")).expanduser()


def shared_data_dir() -> Path:
    """Folder with the non-movie datasets: `$LLMREC_SHARED_DATA`, default `../shared/data` next to the checkout."""
    env = os.environ.get("LLMREC_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve().parent.parent
    for cand in (
        here.parent / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
    ):
        if cand.is_dir():
            return cand
    return here.parent / "shared" / "data"


_QUOTE_HINT = {bool: " (YAML reads yes/no/on/off/true/false as booleans: quote the value, e.g. 'yes')",
               type(None): " (YAML reads an empty value, null or ~ as null: give a value)"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        # keys and values to their annotated types, as for lists: `adapters: {a: null}` served the base model under
        # the adapter's name, `{7: x}` failed with "argument of type 'int' is not iterable"
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {_coerce(k, kt, f"{where} (key {k!r})"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        # YAML reads `key:` / `null` as None and yes/no/on/off as booleans: str() made them 'None' / 'True'
        if isinstance(value, dict | list | bool) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}" + _QUOTE_HINT.get(type(value), ""))
        return str(value)
    if tp is Path:
        # Path("") is "." (the current folder), Path(str(None)) a file named 'None'
        if isinstance(value, dict | list | bool) or value is None or not str(value).strip():
            raise ConfigError(f"{where}: expected a path, got {value!r}" + _QUOTE_HINT.get(type(value), ""))
        return Path(str(value)).expanduser()
    return value


def _key(where: str, key: str) -> str:
    """Where nested key `key` is: `file.yaml: a.b` below a config file (not `file.yaml.a.b`), else `where.key`."""
    return f"{where}: {key}" if where.endswith((".yaml", ".yml", ".json")) else f"{where}.{key}"


def _did_you_mean(keys: list[str], known: typing.Iterable[str]) -> str:
    """' (did you mean 'like_threshold'?)' for misspelt keys that are close to a known one, else ''."""
    known = list(known)
    close = {k: m[0] for k in keys if (m := difflib.get_close_matches(k, known, n=1, cutoff=0.75))}
    if not close:
        return ""
    if len(keys) == 1:
        return f" (did you mean {close[keys[0]]!r}?)"
    return " (did you mean " + ", ".join(f"{v!r} for {k!r}" for k, v in close.items()) + "?)"


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys raise `ConfigError` naming them and the known ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}{_did_you_mean(unknown, fields)}; known keys: "
                          f"{sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], _key(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:  # a __post_init__ check names the key ("port: ..."): say where its value came from
        key = str(e).split(":", 1)[0]
        label = getattr(data, "override_labels", {}).get(key)
        if label:  # set by a key=value override (`apply_overrides`), not by the file
            raise ConfigError(f"{label} {e}") from None
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden below it
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (first on line {first[key]})", key_node.start_mark)
                first[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: " + ("is a folder, not a file" if path.is_dir() else "config file not found"))
    try:
        raw = path.read_bytes()
        data = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    return data


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> nested dict; values are parsed as YAML scalars (so `1`, `true`, `[1,2]` work)."""
    return _parse_overrides(pairs)[0]


def _parse_overrides(pairs: list[str] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """`parse_overrides`, plus each dotted key's value as typed (the last one given)."""
    out: dict[str, Any] = {}
    raws: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        node = out
        parts = [p.strip() for p in key.split(".")]  # `llm. backend` is llm.backend, not the key ' backend'
        if not all(parts):
            raise ConfigError(f"override {pair!r}: empty key part in {key.strip()!r}")
        dotted = ".".join(parts)
        below = sorted(k for k in raws if k.startswith(dotted + "."))
        if below:  # `--set a.b=1 --set a=x` dropped a.b without a word
            raise ConfigError(f"override {pair!r}: {dotted} replaces what override {below[0]}={raws[below[0]]} set "
                              f"inside it; give one of them")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r}: {'.'.join(parts[: i + 1])} is already set to a value by "
                                  "another override, not a mapping")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
        raws[dotted] = raw
    return out, raws


def _wants_text(tp: Any) -> bool:
    """A str or Path key (optional or not): its override is the text as typed."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(a in (str, Path) for a in args)
    return tp in (str, Path)


def _keep_typed_text(cls: type, over: dict[str, Any], raws: dict[str, str], prefix: str = "") -> None:
    """In place: an override of a str / Path key whose text YAML read as a number or a date keeps the text as typed
    (`007` is 7, `0123` is 83 in octal, `12:30` is 750 in base 60, `1_000` is 1000: a folder or a name changed under
    the user's hands); true/false/null stay refused with their quoting hint by the type check."""
    hints = typing.get_type_hints(cls)
    for k, v in over.items():
        if k not in hints:
            continue  # check_overrides names it
        sub = _dataclass_of(hints[k])
        if sub is not None and isinstance(v, dict):
            _keep_typed_text(sub, v, raws, f"{prefix}{k}.")
        elif (_wants_text(hints[k]) and not isinstance(v, str | bool | dict | list) and v is not None
              and f"{prefix}{k}" in raws):
            over[k] = raws[f"{prefix}{k}"].strip()
        elif (typing.get_origin(hints[k]) is dict and isinstance(v, dict)
              and _wants_text((typing.get_args(hints[k]) or (Any, Any))[-1])):
            # a mapping of names / folders (`llm.adapters={a: 0123}` or `llm.adapters.a=0123`): its values as typed
            whole: Any = None
            if f"{prefix}{k}" in raws:
                try:
                    whole = yaml.load(raws[f"{prefix}{k}"], Loader=yaml.BaseLoader)  # every scalar as its text
                except yaml.YAMLError:
                    whole = None
            for n, x in v.items():
                if isinstance(x, str | bool | dict | list) or x is None:
                    continue
                if f"{prefix}{k}.{n}" in raws:
                    v[n] = raws[f"{prefix}{k}.{n}"].strip()
                elif isinstance(whole, dict) and isinstance(whole.get(str(n)), str):
                    v[n] = whole[str(n)]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dataclass_of(tp: Any) -> type | None:
    """`tp` itself, or the one dataclass in `X | None`, when it is a dataclass type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def check_overrides(cls: type, over: dict[str, Any], label: str = "override", prefix: str = "") -> None:
    """Check parsed `key=value` overrides against `cls` on their own, so that an error names the override (not the
    config file it would have been merged into): unknown keys, and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in fields:
            level = f" of {prefix[:-1]}" if prefix else ""
            raise ConfigError(f"{label} {key}: unknown key {k!r}{_did_you_mean([k], fields)}; known keys{level}: "
                              f"{sorted(fields)}")
        sub = _dataclass_of(hints[k])
        if sub is not None and isinstance(v, dict):
            check_overrides(sub, v, label, f"{key}.")
        else:
            _coerce(v, hints[k], f"{label} {key}")


def apply_overrides(cls: type, data: dict[str, Any], pairs: list[str] | None,
                    label: str = "override") -> dict[str, Any]:
    """`data` (e.g. a config file's mapping) with `key=value` `pairs` merged in, the pairs checked first
    (`check_overrides`)."""
    over, raws = _parse_overrides(pairs)
    _keep_typed_text(cls, over, raws)
    check_overrides(cls, over, label)
    out = _Overridden(deep_merge(data, over))
    out.override_labels = {**getattr(data, "override_labels", {}), **{k: label for k in _dotted(over)}}
    return out


class _Overridden(dict):
    """A config mapping that remembers which dotted keys `key=value` overrides set (`override_labels`: key -> label),
    so that a check made when the dataclass is built names the override rather than the config file."""

    override_labels: dict[str, str]


def _dotted(d: dict[str, Any], prefix: str = "") -> list[str]:
    return [k for key, v in d.items()
            for k in ([f"{prefix}{key}"] + (_dotted(v, f"{prefix}{key}.") if isinstance(v, dict) else []))]


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + `key=value` overrides -> dataclass `cls`, with errors that name the file and key (or the
    override)."""
    data = apply_overrides(cls, load_yaml(path) if path else {}, overrides)
    return from_dict(cls, data, where=str(path) if path else "config")


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML/JSON-able structure (Paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
