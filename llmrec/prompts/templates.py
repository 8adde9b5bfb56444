"""Prompt templates as versioned data: one YAML file per template under `prompts/`.

A template file holds `name`, `version`, `task`, `text` (placeholders in `{braces}`), `answer_prefix` (the cue the
answer follows, e.g. `Answer:`), an optional `system` message for the chat form, `options` (how items and history
lines are written) and, where the answer is scored, the `verbalizer`:

- `choices: [" Yes", " No"]` - fixed answer strings (the FIRST token of each is scored), or
- `labels: "ABCDEFGHIJKLMNOPQRST"` + `label_format: " {label}"` - one single-token label per candidate.

Placeholders (all text is produced by the renderer, quoted and escaped):
`{domain}` `{domains}` `{Domain}` `{Domains}` (the dataset's noun, singular/plural/capitalised), `{history}` (all
history lines, oldest first), `{liked}` / `{disliked}` (the history split by the user's reaction), `{target}`,
`{candidates}` (labelled lines), `{recommended}`, `{n_candidates}`, `{first_label}`, `{last_label}`, `{n_history}`,
`{target_stats}` (other users' earlier reactions to the target), `{user_stats}` (the user's like count), `{estimate}`
(the two counts combined into one figure, no fitting). A line starting with `{?name}` is kept only when `name`
(candidates, target, recommended, history, liked, disliked, target_stats, user_stats, estimate) is non-empty.
Literal braces are written `{{` and `}}`.

`template_hash` covers every field that changes a render; `prompts/versions.lock` records (version, hash) per
template and a test fails when the hash changed but the version did not.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from llmrec.config import ConfigError, from_dict, load_yaml

TASKS = ("yesno", "rank", "next_title", "explain")
NEGATIVE_ANSWERS = {"no", "false", "n", "nope", "non", "nein"}  # a yesno template's first choice must not be one
PLACEHOLDERS = {
    "domain", "domains", "Domain", "Domains", "history", "liked", "disliked", "target", "candidates",
    "recommended", "n_candidates", "first_label", "last_label", "n_history", "target_stats", "user_stats",
    "estimate", "first_recommended",
}
# the placeholders of the per-line formats in `options` and of `verbalizer.label_format`
LINE_PLACEHOLDERS = {
    "history_line": {"item", "details"},
    "candidate_line": {"label", "item"},
    "recommended_line": {"item"},
}
LABEL_PLACEHOLDERS = {"label"}
CONDITIONS = {"candidates", "target", "recommended", "history", "liked", "disliked", "target_stats", "user_stats",
              "estimate"}


def prompts_dir() -> Path:
    """The `prompts/` folder of the repository (next to the `llmrec` package)."""
    return Path(__file__).resolve().parent.parent.parent / "prompts"


@dataclass
class Verbalizer:
    choices: list[str] | None = None  # fixed answers, first token scored (yesno: [" Yes", " No"])
    labels: str | None = None  # one character per candidate (rank: "ABCDEFGHIJKLMNOPQRST")
    label_format: str = " {label}"  # how a label is written as an answer (the scored string)


@dataclass
class TemplateOptions:
    item_fields: list[str] | None = None  # None: every text field of the dataset; []: title only
    candidate_fields: list[str] | None = None  # fields shown for candidates/recommended; None: as item_fields
    time_context: bool = False  # history lines carry "rated 4/5, 3 weeks ago" (when known)
    mark_likes: bool = True  # {history} lines say "(liked)" / "(disliked)" when known
    history_line: str = "- {item}{details}"
    candidate_line: str = "{label}. {item}"
    recommended_line: str = "- {item}"
    empty: str = "(none)"  # written for an empty {liked}/{disliked}/{history}
    title_max_chars: int = 120
    field_max_chars: int = 80
    max_history: int | None = None  # hard cap before the token budget (most recent kept)
    lead_quote: bool = False  # explain: the generated text must open with a quoted history title (the answer prefix
    # ends where a title is cited: "... because they liked"); Backend.generate_quoted(lead_quote=True)
    rating_scale: float | None = 5.0  # "rated 4/5"; None writes the bare rating


@dataclass
class PromptTemplate:
    name: str
    version: int
    task: Literal["yesno", "rank", "next_title", "explain"]
    text: str
    answer_prefix: str = "Answer:"
    verbalizer: Verbalizer | None = None
    system: str | None = None
    description: str = ""
    options: TemplateOptions = field(default_factory=TemplateOptions)
    path: str | None = None  # where it was loaded from (not part of the hash)

    @property
    def placeholders(self) -> set[str]:
        """The placeholder names the text fills (a line's `{?condition}` prefix is not one), e.g. whether a caller
        must compute `target_stats`."""
        out: set[str] = set()
        for line in self.text.splitlines():
            body = line[line.index("}") + 1 :] if line.startswith("{?") else line
            out.update(f for _, f, _, _ in string.Formatter().parse(body) if f)
        return out

    @property
    def needs_feedback(self) -> bool:
        """Whether a render needs the target's earlier feedback (`target_stats=`): `{target_stats}` or `{estimate}`."""
        return bool({"target_stats", "estimate"} & self.placeholders)

    @property
    def hash(self) -> str:
        return template_hash(self)


def _non_default(obj: Any) -> dict[str, Any] | None:
    """A dataclass as a dict of the fields that differ from their defaults (so adding a new option with a default
    does not change existing hashes; a changed code default is caught by the golden renders where their inputs show
    it, and by `tests/test_prompts_audit.py::test_option_defaults_are_pinned` for every default: the golden inputs'
    titles are too short to show `title_max_chars`, for one)."""
    if obj is None:
        return None
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                               else MISSING)
        if v != default:
            out[f.name] = v
    return out


def template_hash(t: PromptTemplate) -> str:
    """sha256 over everything in the template that changes a render (not the version, description or path)."""
    payload = {
        "task": t.task,
        "text": t.text,
        "answer_prefix": t.answer_prefix,
        "system": t.system,
        "verbalizer": _non_default(t.verbalizer),
        "options": _non_default(t.options),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# the placeholders a line format must show: without `{item}` a list line would show no item, without `{label}` (when
# the template labels its candidates) the answer letters would be missing from the prompt
REQUIRED_LINE_PLACEHOLDERS = {"history_line": {"item"}, "candidate_line": {"item"}, "recommended_line": {"item"}}


def _placeholder_names(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}


def _validate_options(t: PromptTemplate, where: str) -> None:
    o = t.options
    for key in ("title_max_chars", "field_max_chars"):  # 0 or less would disable the cap or cut every title to "…"
        if getattr(o, key) < 2:
            raise ConfigError(f"{where}: options.{key} must be at least 2 (one character and the ellipsis), got "
                              f"{getattr(o, key)}")
    if o.max_history is not None and o.max_history < 0:  # -1 used to list no history at all, silently
        raise ConfigError(f"{where}: options.max_history must be null or >= 0, got {o.max_history}")
    if o.rating_scale is not None and not o.rating_scale > 0:
        raise ConfigError(f"{where}: options.rating_scale must be null or > 0, got {o.rating_scale}")
    labelled = bool(t.verbalizer and t.verbalizer.labels)
    for key, needed in REQUIRED_LINE_PLACEHOLDERS.items():
        need = needed | ({"label"} if key == "candidate_line" and labelled else set())
        missing = need - _placeholder_names(getattr(o, key))
        if missing:
            raise ConfigError(f"{where}: options.{key} {getattr(o, key)!r} must show "
                              + " and ".join(f"{{{m}}}" for m in sorted(missing)))
    if labelled and "label" not in _placeholder_names(t.verbalizer.label_format):
        # every candidate's answer would be the same string
        raise ConfigError(f"{where}: verbalizer.label_format {t.verbalizer.label_format!r} must show {{label}}")


def _validate(t: PromptTemplate, where: str) -> None:
    if t.task not in TASKS:
        raise ConfigError(f"{where}: task {t.task!r} is not one of {list(TASKS)}")
    if t.version < 1:
        raise ConfigError(f"{where}: version must be a positive integer, got {t.version}")
    for n, line in enumerate(t.text.splitlines(), 1):
        body = line
        if body.startswith("{?"):
            end = body.find("}")
            cond = body[2:end] if end > 0 else ""
            if cond not in CONDITIONS:
                raise ConfigError(
                    f"{where}: text line {n}: unknown condition {{?{cond}}}; use one of {sorted(CONDITIONS)}"
                )
            body = body[end + 1 :]
        _check_placeholders(body, f"{where}: text line {n}")
    _check_placeholders(t.answer_prefix, f"{where}: answer_prefix")
    for key, known in LINE_PLACEHOLDERS.items():
        _check_placeholders(getattr(t.options, key), f"{where}: options.{key}", known)
    v = t.verbalizer
    if v is not None:
        _check_placeholders(v.label_format, f"{where}: verbalizer.label_format", LABEL_PLACEHOLDERS)
    _validate_options(t, where)
    if t.task == "yesno" and (v is None or not v.choices or len(v.choices) != 2):
        raise ConfigError(f"{where}: a yesno template needs verbalizer.choices with 2 answers")
    if t.task == "yesno" and v.choices[0].strip(" .!").lower() in NEGATIVE_ANSWERS:
        # every scorer reads P(first choice) as P(like): [" No", " Yes"] would invert every score silently
        raise ConfigError(f"{where}: verbalizer.choices {v.choices!r}: the first answer is the positive one "
                          "(scored as P(like)); list it first")
    if t.task == "rank":
        if v is None or not v.labels:
            raise ConfigError(f"{where}: a rank template needs verbalizer.labels (one character per candidate)")
        if len(set(v.labels)) != len(v.labels):
            raise ConfigError(f"{where}: verbalizer.labels has repeated characters: {v.labels!r}")
        if "{candidates}" not in t.text:
            raise ConfigError(f"{where}: a rank template must show {{candidates}}")
    if t.task == "yesno" and "{target}" not in t.text:
        raise ConfigError(f"{where}: a yesno template must show {{target}}")
    if t.task == "explain" and "{recommended}" not in t.text:
        raise ConfigError(f"{where}: an explain template must show {{recommended}}")


def _check_placeholders(text: str, where: str, known: set[str] = PLACEHOLDERS) -> None:
    """Every `{name}` of `text` must be one of `known`, written plainly: a conversion (`{history!r}`) or a format
    spec (`{target:>80}`) would change the renderer's quoted text, so both are refused."""
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{where}: {e} (write literal braces as {{{{ and }}}})") from None
    for f, spec, conv in parsed:
        if f not in known:
            raise ConfigError(f"{where}: unknown placeholder {{{f}}}; known: {sorted(known)}")
        if spec or conv:
            shown = f"{{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
            raise ConfigError(f"{where}: placeholder {shown} may not carry a conversion or format spec; write {{{f}}}")


def parse_template(data: dict[str, Any], where: str = "template") -> PromptTemplate:
    t = from_dict(PromptTemplate, data, where=where)
    _validate(t, where)
    return t


def load_template(name: str | Path) -> PromptTemplate:
    """A template by name (`prompts/<name>.yaml`) or by path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):  # a path (prompts/<name>.yaml.yaml is never meant)
        if not p.is_file():
            raise FileNotFoundError(f"no prompt template file {str(name)!r}: {p.resolve()} does not exist "
                                    f"(or give a template name: {list_templates()})")
    else:
        p = prompts_dir() / f"{name}.yaml"
        if not p.is_file():
            raise FileNotFoundError(
                f"no prompt template {str(name)!r}: {p} does not exist; available: {list_templates()}"
            )
    data = load_yaml(p)
    t = parse_template(data, where=str(p))
    if p.parent == prompts_dir() and t.name != p.stem:
        raise ConfigError(f"{p}: name {t.name!r} must match the file name {p.stem!r}")
    t.path = str(p)
    return t


def list_templates() -> list[str]:
    return sorted(p.stem for p in prompts_dir().glob("*.yaml"))


def read_lock(path: Path | None = None) -> dict[str, dict[str, Any]]:
    p = path or prompts_dir() / "versions.lock"
    if not p.is_file():
        return {}
    try:
        lock = json.loads(p.read_text())
    except json.JSONDecodeError as e:  # e.g. merge-conflict markers after two branches bumped templates
        raise ConfigError(f"{p}: line {e.lineno}: not valid JSON ({e.msg}); resolve it (or restore it from git), "
                          "then run `python -m llmrec.prompts`") from None
    bad = [k for k, v in lock.items() if not (isinstance(v, dict) and {"version", "hash"} <= set(v))] \
        if isinstance(lock, dict) else ["(top level)"]
    if bad:
        raise ConfigError(f"{p}: entries {bad} need a version and a hash; resolve it (or restore it from git), then "
                          "run `python -m llmrec.prompts`")
    return lock


def lock_problems(lock: dict[str, dict[str, Any]], templates: list[PromptTemplate]) -> list[str]:
    """What is wrong between templates and their lock entries: a template whose text changed while its version
    did not, a version bumped without updating the lock, or a template missing from the lock."""
    out = []
    for t in templates:
        prev = lock.get(t.name)
        if prev is None:
            out.append(f"{t.name}: not in versions.lock (run `python -m llmrec.prompts` to record it)")
        elif prev["hash"] != t.hash and prev["version"] >= t.version:
            out.append(f"{t.name}: the template changed but its version is still {t.version}: bump `version` "
                       f"(locked version {prev['version']})")
        elif prev["hash"] != t.hash or prev["version"] != t.version:
            out.append(f"{t.name}: version {t.version} is not recorded in versions.lock (locked {prev['version']}); "
                       f"run `python -m llmrec.prompts`")
    return out


def write_lock(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Record (version, hash) of every template; refuses when a hash changed while the version stayed the same."""
    p = path or prompts_dir() / "versions.lock"
    templates = [load_template(n) for n in list_templates()]
    bad = [m for m in lock_problems(read_lock(p), templates) if "bump `version`" in m]
    if bad:
        raise ConfigError("; ".join(bad))
    new = {t.name: {"version": t.version, "hash": t.hash} for t in templates}
    p.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    return new

