from dataclasses import dataclass, field

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
