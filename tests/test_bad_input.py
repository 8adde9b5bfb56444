"""Bad input at the CLI's entry points (`data prepare`, `eval yesno --file`'s reader, `finetune --dry-run`,
`serve --print-config`): one `llmrec: error: ...` line naming the file / line / field, and nothing written.
No model is loaded and nothing is trained or served."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli_refused

from llmrec.cli import main
from llmrec.config import ConfigError, apply_overrides, from_dict, load_yaml

EVENTS = """user_id,item_id,timestamp,rating
u1,b1,1700000000,5
u1,b2,1700000100,2
u1,b3,1700000200,4
u2,b1,1700000300,4
u2,b2,1700000400,1
u2,b3,1700000500,5
u3,b2,1700000600,3
u3,b3,1700000700,5
u3,b1,1700000800,2
"""
ITEMS = "item_id,title,genres\nb1,Dune,SF\nb2,Emma,Romance\nb3,Ubik,SF\n"


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("LLMREC_HOME", str(h))
    monkeypatch.setenv("LLMREC_RESULTS", str(tmp_path / "results"))
    monkeypatch.chdir(tmp_path)
    return h


_refused = cli_refused


def _nothing_written(home) -> None:
    assert not (home / "data").exists() or not any((home / "data").iterdir())


def _prepare(events: str | bytes, items: str | None = ITEMS, *sets: str) -> list[str]:
    Path("events.csv").write_bytes(events.encode("utf-8") if isinstance(events, str) else events)
    argv = ["data", "prepare", "--dataset", "events.csv"]
    if items is not None:
        Path("items.csv").write_text(items)
        argv += ["--items", "items.csv"]
    return argv + ["--set", "name=mine", *sets]


# ---------------------------------------------------------------------------------------------------------------
# data prepare: CSV / Parquet / RecBole files
def test_good_files_are_prepared(home, capsys):
    assert main(_prepare(EVENTS)) == 0
    assert (home / "data" / "mine" / "manifest.json").is_file()


def test_duplicate_header_in_events_is_refused(home, capsys):
    # pandas renamed the second `item_id` to `item_id.1`: the ratings were lost and every event became a "like"
    msg = _refused(capsys, _prepare(EVENTS.replace("timestamp,rating", "timestamp,item_id", 1)))
    assert "events.csv: line 1: duplicate column name(s) ['item_id']" in msg
    _nothing_written(home)


def test_duplicate_header_in_items_is_refused(home, capsys):
    msg = _refused(capsys, _prepare(EVENTS, "item_id,title,title\nb1,Dune,x\nb2,Emma,y\nb3,Ubik,z\n"))
    assert "items.csv: line 1: duplicate column name(s) ['title']" in msg
    _nothing_written(home)


def test_item_id_twice_with_different_rows_is_refused(home, capsys):
    msg = _refused(capsys, _prepare(EVENTS, ITEMS + "b1,Dune Messiah,SF\n"))
    assert "items.csv: line 5: field 'item_id': 'b1' already has a different row at line 2" in msg
    _nothing_written(home)
    assert main(_prepare(EVENTS, ITEMS + "b1,Dune,SF\n")) == 0  # the same row twice is no conflict


def test_empty_title_is_refused(home, capsys):
    msg = _refused(capsys, _prepare(EVENTS, ITEMS.replace("Emma", "")))
    assert "items.csv: line 3: field 'title' is empty (item 'b2'" in msg
    msg = _refused(capsys, _prepare(EVENTS, ITEMS.replace("b2,Emma,Romance", "b2")))  # a short row: title missing
    assert "items.csv: line 3: field 'title' is empty" in msg
    _nothing_written(home)


def test_non_utf8_file_names_the_line(home, capsys):
    msg = _refused(capsys, _prepare(EVENTS.encode().replace(b"u2,b2", b"\xff\xfe,b2")))
    assert msg.endswith("events.csv: line 6: not UTF-8 text")
    _nothing_written(home)


def test_unclosed_quote_names_the_line(home, capsys):
    msg = _refused(capsys, _prepare(EVENTS.replace("u1,b2,", '"u1,b2,')))
    assert "events.csv: cannot parse: line 3: a quoted field is never closed" in msg
    _nothing_written(home)


def test_items_file_that_is_a_folder(home, capsys, tmp_path):
    (tmp_path / "dir.csv").mkdir()
    Path("events.csv").write_text(EVENTS)
    msg = _refused(capsys, ["data", "prepare", "--dataset", "events.csv", "--items", "dir.csv"])
    assert msg.endswith("dir.csv: is a folder, not a file")  # was "file not found"


def _parquet(df: pd.DataFrame, name: str) -> str:
    df.to_parquet(name, index=False)
    return name


def _events_df() -> pd.DataFrame:
    import io

    return pd.read_csv(io.StringIO(EVENTS), dtype={"user_id": str, "item_id": str, "rating": float})


def test_parquet_nulls_are_empty_fields_not_the_string_none(home, capsys):
    df = _events_df()
    df.loc[2, "user_id"] = None  # was read as a user named "None"
    df.loc[4, "rating"] = None  # was refused as "nan is not a number", while an empty CSV rating is "no rating"
    p = _parquet(df, "ev.parquet")
    assert main(["data", "prepare", "--dataset", p, "--set", "name=mine"]) == 0
    from llmrec.data import load_prepared

    ds = load_prepared("mine")
    assert "None" not in set(ds.interactions["user_id"])
    assert ds.manifest["stats"]["dropped"]["missing_id"] == 1
    assert ds.manifest["stats"]["dropped"]["missing_rating"] == 1


def test_parquet_errors_name_the_row_not_a_line(home, capsys):
    df = _events_df().astype({"rating": str})
    df.loc[3, "rating"] = "four"
    msg = _refused(capsys, ["data", "prepare", "--dataset", _parquet(df, "ev.parquet"), "--set", "name=mine"])
    assert "ev.parquet: row 4: field 'rating': 'four' is not a number" in msg
    items = pd.DataFrame({"item_id": ["b1", "b2", "b3"], "title": ["Dune", None, "Ubik"]})
    p = _parquet(_events_df(), "ok.parquet")
    msg = _refused(capsys, ["data", "prepare", "--dataset", p, "--items", _parquet(items, "it.parquet")])
    assert "it.parquet: row 2: field 'title' is empty" in msg  # a null title was the string "None"
    _nothing_written(home)


def test_parquet_items_missing_or_not_parquet(home, capsys, tmp_path):
    p = _parquet(_events_df(), "ok.parquet")
    msg = _refused(capsys, ["data", "prepare", "--dataset", p, "--items", "nope.parquet"])
    assert msg == "llmrec: error: nope.parquet: file not found"  # was the bare path
    (tmp_path / "junk.parquet").write_text("not parquet")
    msg = _refused(capsys, ["data", "prepare", "--dataset", p, "--items", "junk.parquet"])
    assert msg.startswith("llmrec: error: junk.parquet: not a readable Parquet file")
    _nothing_written(home)


def _recbole(folder, header: str) -> str:
    folder.mkdir()
    (folder / f"{folder.name}.inter").write_text(
        header + "\n" + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in
                                [(1, 10, 5, 100), (1, 11, 3, 200), (1, 12, 4, 300), (2, 10, 2, 150), (2, 11, 5, 250),
                                 (2, 12, 4, 350)]))
    return str(folder)


def test_recbole_header_with_a_name_twice_is_refused(home, capsys, tmp_path):
    # `item_id:token` and `item_id:float` are one name twice once the types are dropped (was an AttributeError)
    d = _recbole(tmp_path / "rb", "user_id:token\titem_id:token\titem_id:float\ttimestamp:float")
    msg = _refused(capsys, ["data", "prepare", "--dataset", d])
    assert "rb.inter: line 1: duplicate column name(s) ['item_id']" in msg
    _nothing_written(home)


def test_items_with_a_recbole_folder_or_builtin_is_refused(home, capsys, tmp_path):
    # it was ignored without a word: these bring their own item metadata
    d = _recbole(tmp_path / "rb", "user_id:token\titem_id:token\trating:float\ttimestamp:float")
    (tmp_path / "items.csv").write_text(ITEMS)
    msg = _refused(capsys, ["data", "prepare", "--dataset", d, "--items", "items.csv"])
    assert "--items / items_file items.csv: only for a CSV/TSV/Parquet interaction file" in msg
    msg = _refused(capsys, ["data", "prepare", "--dataset", "ml-100k", "--items", "items.csv"])
    assert "'ml-100k' is a built-in dataset" in msg
    _nothing_written(home)


def test_items_flag_and_items_file_key_disagree(home, capsys, tmp_path):
    msg = _refused(capsys, _prepare(EVENTS, ITEMS, "items_file=other.csv"))
    assert "--items items.csv and items_file=other.csv" in msg
    _nothing_written(home)


@pytest.mark.parametrize("setting, expected", [
    ("kcore=-1", "PrepareConfig.kcore: must be >= 0, got -1"),
    ("history_len=0", "PrepareConfig.history_len: must be >= 1, got 0"),
    ("neg_per_pos=-1", "PrepareConfig.neg_per_pos: must be >= 0"),
    ("n_sampled_negatives=-5", "PrepareConfig.n_sampled_negatives: must be >= 0"),
    ("valid_frac=-1", "PrepareConfig.valid_frac: must be between 0 and 1"),  # was numpy's "Quantiles must be ..."
    ("test_frac=0", "PrepareConfig.test_frac: must be between 0 and 1"),
    ("valid_frac=0.6", "PrepareConfig.valid_frac + test_frac: must be below 1"),
    ("like_threshold=.nan", "PrepareConfig.like_threshold: must be a finite number"),  # every event a dislike
    ("name=", "PrepareConfig.name: '' is not a plain folder name"),  # was taken as "no name": the file's stem
])
def test_prepare_settings_out_of_range(home, capsys, setting, expected):
    second = ["test_frac=0.5"] if setting.startswith("valid_frac=0.6") else []
    msg = _refused(capsys, _prepare(EVENTS, ITEMS, setting, *second))
    assert expected in msg
    _nothing_written(home)


def test_failed_re_prepare_keeps_the_previous_folder(home, capsys):
    assert main(_prepare(EVENTS)) == 0
    before = {p.name: p.read_bytes() for p in (home / "data" / "mine").iterdir()}
    _refused(capsys, _prepare(EVENTS.replace("timestamp,rating", "timestamp,item_id", 1)))
    _refused(capsys, _prepare(EVENTS, ITEMS, "valid_frac=0.95"))
    assert {p.name: p.read_bytes() for p in (home / "data" / "mine").iterdir()} == before


# ---------------------------------------------------------------------------------------------------------------
# YAML configs: finetune --dry-run, serve --print-config, and the shared loader
def test_yaml_key_given_twice_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: yesno\ntrain:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")  # PyYAML kept the last one silently
    with pytest.raises(ConfigError, match=r"c\.yaml: line 4 invalid YAML: key 'lr' given twice \(first on line 3\)"):
        load_yaml(p)
    p.write_text("base: &b {x: 1}\nd:\n  <<: *b\n  x: 2\n")  # a merge key is no repeat
    assert load_yaml(p)["d"] == {"x": 2}


def test_yaml_not_utf8_or_a_folder(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"task: yesno\n\xff\xfe: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line 2: not UTF-8 text"):  # was a bare UnicodeDecodeError
        load_yaml(p)
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"d\.yaml: is a folder"):
        load_yaml(tmp_path / "d.yaml")


def test_finetune_dry_run_messages_name_file_and_key(home, capsys, tmp_path):
    (tmp_path / "r.yaml").write_text("task: yesno\ntrain:\n  lr: fast\n")
    msg = _refused(capsys, ["finetune", "--config", "r.yaml", "--dry-run"])
    assert msg == "llmrec: error: r.yaml: train.lr: expected float, got 'fast'"  # was "r.yaml.train.lr: ..."
    (tmp_path / "r.yaml").write_text("task: yesno\ntask: rank\n")
    msg = _refused(capsys, ["finetune", "--config", "r.yaml", "--dry-run"])
    assert "r.yaml: line 2 invalid YAML: key 'task' given twice" in msg


def test_empty_path_value_is_refused(home, capsys):
    # Path("") is ".": the run would have written into the current folder
    recipe = Path(__file__).resolve().parent.parent / "finetune" / "recipes" / "yesno_smollm2_qlora.yaml"
    msg = _refused(capsys, ["finetune", "--config", str(recipe), "--dry-run", "output_dir="])
    assert msg == "llmrec: error: override output_dir: expected a path, got ''"


def test_finetune_dry_run_refuses_a_dataset_a_run_would_refuse(home, capsys):
    recipe = Path(__file__).resolve().parent.parent / "finetune" / "recipes" / "yesno_smollm2_qlora.yaml"
    msg = _refused(capsys, ["finetune", "--config", str(recipe), "--dry-run", "dataset=nope"])
    assert "dataset 'nope' is not prepared under" in msg and "llmrec data prepare --dataset nope" in msg
    # a built-in dataset is prepared on first use: accepted, and the dry run prepares nothing
    assert main(["finetune", "--config", str(recipe), "--dry-run", "dataset=lastfm"]) == 0
    _nothing_written(home)


def test_serve_config_value_checks_name_the_file_or_the_override(home, capsys, tmp_path):
    (tmp_path / "s.yaml").write_text("port: 70000\n")
    msg = _refused(capsys, ["serve", "--config", "s.yaml", "--print-config"])
    assert msg == "llmrec: error: s.yaml: port: must be within 1..65535 (got 70000)"  # the file was not named
    (tmp_path / "s.yaml").write_text("max_k: 1000\n")
    msg = _refused(capsys, ["serve", "--config", "s.yaml", "--print-config", "--set", "default_k=2000"])
    assert msg == "llmrec: error: override default_k: must be within 1..max_k (1000)"
    assert main(["serve", "--config", "s.yaml", "--print-config", "--set", "default_k=500"]) == 0


def test_post_init_errors_carry_where(tmp_path):
    @dataclass
    class C:
        n: int = 1

        def __post_init__(self):
            if self.n < 1:
                raise ConfigError(f"n: must be >= 1 (got {self.n})")

    with pytest.raises(ConfigError, match=r"^x\.yaml: n: must be >= 1"):
        from_dict(C, {"n": 0}, where="x.yaml")
    with pytest.raises(ConfigError, match=r"^override n: must be >= 1"):
        from_dict(C, apply_overrides(C, {"n": 5}, ["n=0"]), where="x.yaml")


# ---------------------------------------------------------------------------------------------------------------
# eval yesno --file: the TALLRec reader (read before any model is loaded)
def _tallrec(tmp_path, content) -> str:
    p = tmp_path / "t.json"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(p)


def _row(output="Yes."):
    return {"instruction": "Will the user like it?", "input": "History: ...", "output": output}


@pytest.mark.parametrize("content, match", [
    ([_row(), _row("Yes, but not really.")], r"entry 1: field 'output' must be 'Yes\.' or 'No\.'"),  # was a Yes
    ([_row(), 5], r"entry 1: expected an object with instruction, input and output, got int"),
    ('[\n{"instruction": "a",\n "input": "b" "output": "Yes."}]', r"line 3: invalid JSON: .* \(column 15\)"),
    ("", r"t\.json: file is empty"),
    (b'[{"instruction": "\xff"}]', r"t\.json: line 1: not UTF-8 text"),  # was a bare UnicodeDecodeError
    ([], r"expected a non-empty JSON list of examples, got an empty list"),
])
def test_tallrec_reader_refuses(tmp_path, content, match):
    from llmrec.ranking.evaluate import TallrecFormatError, load_tallrec

    with pytest.raises(TallrecFormatError, match=match):
        load_tallrec(_tallrec(tmp_path, content))


def test_tallrec_reader_folder_and_one_class(tmp_path, caplog):
    from llmrec.ranking.evaluate import TallrecFormatError, load_tallrec

    (tmp_path / "d.json").mkdir()
    with pytest.raises(TallrecFormatError, match="is a folder"):  # was an IsADirectoryError traceback
        load_tallrec(tmp_path / "d.json")
    assert len(load_tallrec(_tallrec(tmp_path, [_row("no"), _row(" Yes ")]))) == 2
    with caplog.at_level(logging.WARNING):
        load_tallrec(_tallrec(tmp_path, [_row(), _row()]))
    assert "AUC is undefined" in caplog.text


def test_eval_yesno_file_refused_before_a_model_loads(home, capsys, tmp_path, monkeypatch):
    import llmrec.cli.recommend as rec

    monkeypatch.setattr(rec, "_backend", lambda args: pytest.fail("a model was loaded"))
    p = _tallrec(tmp_path, [_row(), _row("Maybe.")])
    msg = _refused(capsys, ["eval", "yesno", "--file", p])
    assert "t.json: entry 1: field 'output'" in msg


def test_eval_yesno_refuses_a_split_with_no_rows_before_a_model_loads(home, capsys, monkeypatch):
    """`--split nosuch` scored 0 rows and printed AUC nan with exit status 0; a split outside train/valid/test is now
    a usage error, and a split the dataset has no rows of is refused, both before any model loads."""
    import llmrec.cli.recommend as rec

    monkeypatch.setattr(rec, "_recommender", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        main(["eval", "yesno", "--dataset", "mine", "--split", "nosuch"])
    assert e.value.code == 2 and "--split" in capsys.readouterr().err
    import llmrec.data

    class NoValidRows:  # e.g. a small dataset whose Yes/No cut-offs left no valid row
        name, yesno = "mine", pd.DataFrame({"split": ["train", "test"], "label": [1, 0]})

    monkeypatch.setattr(llmrec.data, "load_prepared", lambda *a, **k: NoValidRows())
    msg = _refused(capsys, ["eval", "yesno", "--dataset", "mine", "--split", "valid"])
    assert "dataset mine has no Yes/No rows in split 'valid'" in msg


@pytest.mark.parametrize("flags", [["--max-examples", "10"], ["--split", "valid"], ["--seed", "3"],
                                   ["--valid-examples", "0"], ["--template", "yesno=yesno_stats"]])
def test_eval_yesno_file_refuses_the_flags_it_would_ignore(home, capsys, tmp_path, monkeypatch, flags):
    """With --file every row of the file is scored: `--max-examples 10` scored them all without a word."""
    import llmrec.cli.recommend as rec

    monkeypatch.setattr(rec, "_backend", lambda args: pytest.fail("a model was loaded"))
    p = _tallrec(tmp_path, [_row(), _row("No.")])
    with pytest.raises(SystemExit) as e:
        main(["eval", "yesno", "--file", p, *flags])
    assert e.value.code == 2
    assert f"{flags[0]}: not used with --file" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["--dataset", "--file"])
@pytest.mark.parametrize("flags", [["--mode", "likelihood"], ["--retriever", "text"], ["--retrieval-weight", "0"],
                                   ["--listings", "3"]])
def test_eval_yesno_refuses_the_ranking_flags_it_would_ignore(home, capsys, tmp_path, monkeypatch, flags, source):
    """A Yes/No prompt holds the history and the target: `--mode likelihood` or `--retriever text` changed nothing
    and said nothing. A usage error (exit 2) before any data or model is read."""
    import llmrec.cli.recommend as rec
    import llmrec.data

    monkeypatch.setattr(rec, "_backend", lambda args: pytest.fail("a model was loaded"))
    monkeypatch.setattr(llmrec.data, "load_prepared", lambda *a, **k: pytest.fail("a dataset was read"))
    src = [source, _tallrec(tmp_path, [_row(), _row("No.")]) if source == "--file" else "ml-100k"]
    with pytest.raises(SystemExit) as e:
        main(["eval", "yesno", *src, *flags])
    assert e.value.code == 2
    assert f"{flags[0]}: not used by eval yesno" in capsys.readouterr().err
