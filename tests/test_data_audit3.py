"""Data-layer audit: time splits and their tie-break, leakage across splits, the manifest's counts (hand-computed on a
tiny fixture), idempotent re-prepares, bad input at `llmrec data prepare` (file, line and field named; a previously
prepared folder left byte for byte as it was) and the command's help. Tiny files in tmp dirs only, except one check
that pins what the built-in datasets prepare to."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import files_under

from llmrec.cli import main
from llmrec.data import DataError, PrepareConfig, load_prepared, prepare
from llmrec.data.prepare import _write_atomic, file_sha256
from llmrec.data.stats import yesno_row_feedback

ITEMS = "item_id,title,genres\ni1,One,A\ni2,Two,B\ni3,Three,A\ni4,Four,B\ni5,Five,A\n"

# the hand-computed fixture (line numbers on the right)
EVENTS = """user_id,item_id,timestamp,rating
u1,i1,100,5
u1,i2,200,2
u1,i3,300,4
u1,i4,400,5
u2,i1,150,1
u2,i2,250,
u2,i3,250,5
u2,i4,350,4
u2,i3,360,4
u3,i2,500,5
,i1,120,3
u1,i1,100,5
u4,i1,600,4
u4,i2,600,2
u4,i3,700,5
"""
# line 7: no rating (missing_rating); line 10: u2 meets i3 again (duplicate: the first meeting stays); line 11: u3's
# only event (user_below_min_events); line 12: no user (missing_id); line 13: line 2 again (duplicate); lines 14-15:
# one timestamp, so file order decides: i1 then i2


_files = files_under


def _prepare_file(tmp_path: Path, events: str, name: str = "mine", items: str = ITEMS, **cfg) -> PrepareConfig:
    (tmp_path / "events.csv").write_text(events)
    (tmp_path / "items.csv").write_text(items)
    c = PrepareConfig(items_file=str(tmp_path / "items.csv"), name=name, **cfg)
    prepare(str(tmp_path / "events.csv"), c, home=tmp_path / "home")
    return c


# ---------------------------------------------------------------------------------------------------------------
# the manifest's counts, by hand
def test_manifest_counts_match_a_hand_computation(tmp_path):
    _prepare_file(tmp_path, EVENTS)
    ds = load_prepared("mine", home=tmp_path / "home")
    m, st = ds.manifest, ds.manifest["stats"]
    assert st["dropped"] == {"missing_id": 1, "missing_rating": 1, "duplicate": 2, "user_below_min_events": 1}
    # u1: i1 i2 i3 i4; u2: i1 i3 i4; u4: i1 i2 i3 -> 10 events, 3 users, 4 items (i5, without events, is not in the
    # catalogue)
    assert (st["users"], st["items"], st["interactions"]) == (3, 4, 10)
    assert st["density"] == pytest.approx(10 / 12)
    assert st["like_rate"] == pytest.approx(7 / 10)  # rating > 3: u1 1,0,1,1; u2 0,1,1; u4 1,0,1
    assert st["loo_split"] == {"train": 4, "valid": 3, "test": 3}
    assert (st["time_start"], st["time_end"]) == ("1970-01-01", "1970-01-01")
    # the 0.8 / 0.9 quantiles of [100 150 200 250 300 350 400 600 600 700]: 600 and 610 (linear interpolation)
    assert m["yesno_cutoffs"] == {"t_valid": 600, "t_test": 610}
    # rows with >= 1 earlier event: u1 i2 i3 i4, u2 i3 i4 (before 600: train), u4 i2 at 600 (valid), u4 i3 (test)
    assert st["yesno_split"] == {"train": 5, "valid": 1, "test": 1}
    assert st["yesno_positive_rate"] == {"train": pytest.approx(4 / 5), "valid": 0.0, "test": 1.0}
    seq = {u: list(g["item_id"]) for u, g in ds.interactions.groupby("user_id", sort=True)}
    assert seq == {"u1": ["i1", "i2", "i3", "i4"], "u2": ["i1", "i3", "i4"], "u4": ["i1", "i2", "i3"]}
    split = {u: list(g["split"]) for u, g in ds.interactions.groupby("user_id", sort=True)}
    assert split == {"u1": ["train", "train", "valid", "test"], "u2": ["train", "valid", "test"],
                     "u4": ["train", "valid", "test"]}
    # the kept duplicate is the first meeting (u2, i3 at 250, rated 5), not the repeat at 360
    r = ds.interactions.set_index(["user_id", "item_id"])
    assert (r.loc[("u2", "i3"), "timestamp"], r.loc[("u2", "i3"), "rating"]) == (250, 5.0)
    test_row = ds.yesno[ds.yesno["split"] == "test"].iloc[0]
    assert (test_row["user_id"], test_row["item_id"], list(test_row["hist_items"]),
            list(test_row["hist_labels"])) == ("u4", "i3", ["i1", "i2"], [1, 0])
    # the content hash is the hash of the folder's data files, each as recorded
    root = tmp_path / "home" / "data" / "mine"
    files = m["files_sha256"]
    assert sorted(files) == sorted(p.name for p in root.glob("*.parquet"))
    assert all(file_sha256(root / f) == h for f, h in files.items())
    assert m["content_hash"] == hashlib.sha256("".join(files[k] for k in sorted(files)).encode()).hexdigest()


def test_cli_summary_prints_the_manifest_counts(home, capsys):
    Path("events.csv").write_text(EVENTS)
    Path("items.csv").write_text(ITEMS)
    assert main(["data", "prepare", "--dataset", "events.csv", "--items", "items.csv", "--set", "name=mine"]) == 0
    out = capsys.readouterr().out
    assert "dropped          missing_id=1, missing_rating=1, duplicate=2, user_below_min_events=1" in out
    assert "next-item split  test=3, train=4, valid=3" in out
    assert "yes/no split     test=1, train=5, valid=1" in out


# ---------------------------------------------------------------------------------------------------------------
# time order, ties, determinism
def test_time_decides_the_order_and_file_order_only_breaks_ties(tmp_path):
    lines = EVENTS.strip().splitlines()
    head, body = lines[0], lines[1:]
    _prepare_file(tmp_path, EVENTS, name="a")
    a = load_prepared("a", home=tmp_path / "home")
    # the same rows in reverse file order: every order decided by time stays, the one tie (u4's i1/i2 at 600) flips,
    # and the duplicate kept is still the earlier meeting
    _prepare_file(tmp_path, "\n".join([head, *reversed(body)]) + "\n", name="b")
    b = load_prepared("b", home=tmp_path / "home")
    cols = ["user_id", "item_id", "timestamp", "split", "pos"]
    sa = a.interactions[cols].set_index(["user_id", "item_id"]).sort_index()
    sb = b.interactions[cols].set_index(["user_id", "item_id"]).sort_index()
    differ = sorted(set(sa.index[(sa != sb).any(axis=1)]))
    assert differ == [("u4", "i1"), ("u4", "i2")]
    assert list(b.interactions.query("user_id == 'u4'")["item_id"]) == ["i2", "i1", "i3"]
    # the rule: each user's events by (timestamp, source line); the last is test, the one before valid
    assert b.manifest["tie_break"] == "file order"


def _random_events(seed: int, n_users: int = 30, n_items: int = 25) -> pd.DataFrame:
    """Heavy ties (timestamps from 12 values), repeated (user, item) pairs, shuffled file order."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for _ in range(int(rng.integers(1, 14))):
            rows.append((f"u{u}", f"i{int(rng.integers(n_items))}", int(rng.integers(12)) * 1000,
                         int(rng.integers(1, 6))))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.mark.parametrize("seed,rule", [(0, "rating_threshold"), (1, "implicit"), (2, "rating_threshold"),
                                       (3, "implicit")])
def test_splits_follow_time_and_nothing_from_later_periods_reaches_earlier_rows(tmp_path, seed, rule):
    df = _random_events(seed)
    src = tmp_path / "ev.csv"
    df.to_csv(src, index=False)
    cfg = PrepareConfig(label_rule=rule, history_len=4, n_sampled_negatives=5)
    prepare(str(src), cfg, home=tmp_path / "h1")
    prepare(str(src), cfg, home=tmp_path / "h2")
    r1, r2 = tmp_path / "h1" / "data" / "ev", tmp_path / "h2" / "data" / "ev"
    assert {k: v for k, v in _files(r1).items() if k != "manifest.json"} == \
        {k: v for k, v in _files(r2).items() if k != "manifest.json"}  # same bytes, run after run
    ds = load_prepared("ev", home=tmp_path / "h1")

    # expected sequences, computed apart: (timestamp, file line) per user, the first meeting of an item kept
    exp = df.assign(line=np.arange(len(df)) + 2).sort_values(["user_id", "timestamp", "line"])
    exp = exp.drop_duplicates(["user_id", "item_id"], keep="first")
    exp = exp[exp["user_id"].map(exp["user_id"].value_counts()) >= 3]
    assert ds.interactions.groupby("user_id")["item_id"].agg(list).to_dict() == \
        exp.groupby("user_id")["item_id"].agg(list).to_dict()
    for _u, g in ds.interactions.groupby("user_id"):
        assert list(g["pos"]) == list(range(len(g)))
        assert list(g["split"]) == ["train"] * (len(g) - 2) + ["valid", "test"]
        assert g["timestamp"].is_monotonic_increasing

    y, cut = ds.yesno, ds.manifest["yesno_cutoffs"]
    t = y["timestamp"]
    assert (t[y["split"] == "train"] < cut["t_valid"]).all()
    assert ((t[y["split"] == "valid"] >= cut["t_valid"]) & (t[y["split"] == "valid"] < cut["t_test"])).all()
    assert (t[y["split"] == "test"] >= cut["t_test"]).all()
    limit = {"train": cut["t_valid"], "valid": cut["t_test"], "test": np.inf}
    seqs = ds.interactions.groupby("user_id")["item_id"].agg(list).to_dict()
    events = ds.interactions.set_index(["user_id", "item_id"])
    for row in y.itertuples():
        # the history is exactly the <= 4 events before the row's own event in the user's sequence
        anchor = row.item_id if row.label == 1 or rule != "implicit" else None
        hist = list(row.hist_items)
        if anchor is not None:
            k = seqs[row.user_id].index(anchor)
            assert hist == seqs[row.user_id][max(0, k - 4):k]
        assert all(ts <= row.timestamp for ts in row.hist_timestamps)
        assert all(ts < limit[row.split] for ts in row.hist_timestamps)  # nothing from a later split period
        if rule == "implicit" and row.label == 0:  # a sampled No: an item the user had not met by then
            met = events.loc[row.user_id]
            assert row.item_id not in set(met.index[met["timestamp"] < limit[row.split]])
    # no test-period event is a training row's observed target or one of its history items (a sampled No may be an
    # item the user meets only later: the documented rule, a label against the test row, not a hint of it)
    inter = ds.interactions
    test_ev = set(zip(inter["user_id"][inter["timestamp"] >= cut["t_test"]],
                      inter["item_id"][inter["timestamp"] >= cut["t_test"]], strict=True))
    assert test_ev, "the fixture should have test-period events"
    tr = y[y["split"] == "train"]
    assert not test_ev & {(u, i) for u, h in zip(tr["user_id"], tr["hist_items"], strict=True) for i in h}
    observed = tr if rule != "implicit" else tr[tr["label"] == 1]
    assert not test_ev & set(zip(observed["user_id"], observed["item_id"], strict=True))
    # leave-one-out histories: a valid target sees train events only, a test target train + valid
    for u in list(seqs)[:10]:
        assert set(ds.history(u, "valid")["split"]) <= {"train"}
        assert set(ds.history(u, "test")["split"]) <= {"train", "valid"}
    # item features (other users' feedback): events at or after a row's split cut-off change nothing, ties included
    later = inter.assign(timestamp=np.maximum(inter["timestamp"], cut["t_valid"]), label=1 - inter["label"])
    later = later[later["timestamp"] >= cut["t_valid"]]

    class Shadow:
        manifest = ds.manifest
        interactions = pd.concat([inter[inter["timestamp"] < cut["t_valid"]], later], ignore_index=True)

    assert yesno_row_feedback(Shadow(), tr) == yesno_row_feedback(ds, tr)


def test_reprepare_is_idempotent_and_independent_of_name_and_folder(tmp_path):
    _prepare_file(tmp_path, EVENTS, name="a")
    root = tmp_path / "home" / "data" / "a"
    first = _files(root)
    _prepare_file(tmp_path, EVENTS, name="a")
    again = _files(root)
    assert {k: v for k, v in first.items() if k != "manifest.json"} == \
        {k: v for k, v in again.items() if k != "manifest.json"}
    h = [json.loads(x)["content_hash"] for x in (first["manifest.json"], again["manifest.json"])]
    other = tmp_path / "elsewhere"
    other.mkdir()
    _prepare_file(other, EVENTS, name="b")
    h.append(json.loads((other / "home" / "data" / "b" / "manifest.json").read_text())["content_hash"])
    assert len(set(h)) == 1


# ---------------------------------------------------------------------------------------------------------------
# bad input: one error line naming file, line and field; the folder prepared before is untouched
GOOD = "user_id,item_id,timestamp,rating\n" + "".join(
    f"u{u},i{j},{1000 * u + j},{1 + (u + j) % 5}\n" for u in range(1, 4) for j in range(1, 5))
ROWS = "u1,i1,1,5\nu1,i2,2,4\nu1,i3,3,4\n"
BAD = {
    "missing column": ("user_id,item_id,rating\nu1,i1,5\n", None,
                       ["events.csv: line 1: missing column(s) ['timestamp']"]),
    "non-numeric rating": ("user_id,item_id,timestamp,rating\nu1,i1,1,5\nu1,i2,2,great\n", None,
                           ["events.csv: line 3: field 'rating': 'great' is not a number"]),
    "empty file": ("", None, ["events.csv: file is empty"]),
    "header only": ("user_id,item_id,timestamp\n", None, ["events.csv: file has a header but no rows"]),
    "column named twice": ("user_id,item_id,timestamp,item_id\nu1,i1,1,i2\n", None,
                           ["events.csv: line 1: duplicate column name(s) ['item_id']"]),
    "header line repeated": ("user_id,item_id,timestamp,rating\nu1,i1,1,5\nuser_id,item_id,timestamp,rating\n"
                             + ROWS, None, ["events.csv: line 3: field 'timestamp': 'timestamp' is not a number",
                                            "header line repeated"]),
    "semicolons": ("user_id;item_id;timestamp;rating\nu1;i1;1;5\n", None,
                   ["events.csv: line 1: missing column(s)", "holding ';'"]),
    "a tab-separated row in a CSV": ("user_id,item_id,timestamp,rating\nu1,i1,1,5\nu1\ti2\t2\t4\n", None,
                                     ["events.csv: line 3: field 'item_id' is empty", "another delimiter"]),
    "trailing comma on every row": ("user_id,item_id,timestamp,rating\nu1,i1,1,5,\nu1,i2,2,4,\nu1,i3,3,4,\n", None,
                                    ["events.csv: cannot parse: line 2: 5 fields, the header has 4"]),
    "one row too long": ("user_id,item_id,timestamp,rating\nu1,i1,1,5\nu1,i2,2,4\nu1,i3,3,4,9\n", None,
                         ["events.csv: cannot parse: line 4: 5 fields, the header has 4"]),
    "tsv with a trailing tab": ("user_id\titem_id\ttimestamp\nu1\ti1\t1\t\nu1\ti2\t2\t\n", None,
                                ["events.csv: cannot parse: line 2: 4 fields, the header has 3"]),
    "NaN timestamp": ("user_id,item_id,timestamp,rating\nu1,i1,1,5\nu1,i2,NaN,4\nu1,i3,3,4\n", None,
                      ["events.csv: line 3: field 'timestamp': 'NaN' is not a number"]),
    "empty timestamp": ("user_id,item_id,timestamp,rating\nu1,i1,1,5\nu1,i2,,4\nu1,i3,3,4\n", None,
                        ["events.csv: line 3: field 'timestamp': '' is not a number"]),
    "Rating, capitalised": ("user_id,item_id,timestamp,Rating\n" + ROWS, None,
                            ["events.csv: line 1: column 'Rating': rename it 'rating'"]),
    "Title, capitalised": ("user_id,item_id,timestamp,rating\n" + ROWS, "item_id,Title\ni1,A\ni2,B\ni3,C\n",
                           ["items.csv: line 1: column 'Title': rename it 'title'"]),
    "item missing from the item file": ("user_id,item_id,timestamp,rating\nu1,i1,1,5\nu1,i9,2,4\nu1,i3,3,4\n", None,
                                        ["events.csv: line 3: field 'item_id': 'i9' is not in the item file"]),
    "every user has one event": ("user_id,item_id,timestamp,rating\nu1,i1,1,5\nu2,i2,2,4\n", None,
                                 ["events.csv: no interactions left", "min_user_events=3"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_naming_file_line_field_and_keeps_the_old_folder(home, capsys, case):
    Path("events.csv").write_text(GOOD)
    Path("items.csv").write_text(ITEMS)
    argv = ["data", "prepare", "--dataset", "events.csv", "--items", "items.csv", "--set", "name=mine"]
    assert main(argv) == 0
    capsys.readouterr()
    before, listing = _files(home / "data" / "mine"), sorted(os.listdir(home / "data"))
    events, items, needles = BAD[case]
    Path("events.csv").write_text(events)
    if items is not None:
        Path("items.csv").write_text(items)
    assert main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("llmrec: error: "), err
    for n in needles:
        assert n in err[0], err[0]
    assert _files(home / "data" / "mine") == before  # byte for byte
    assert sorted(os.listdir(home / "data")) == listing  # and no temporary folder left behind


@pytest.mark.parametrize("how", ["--set", "--config"])
def test_unknown_config_key_is_refused_before_anything_is_read(home, capsys, how):
    Path("events.csv").write_text(GOOD)
    Path("prep.yaml").write_text("kcore: 0\nlike_treshold: 4\n")
    extra = ["--set", "like_treshold=4"] if how == "--set" else ["--config", "prep.yaml"]
    assert main(["data", "prepare", "--dataset", "events.csv", *extra]) == 1
    err = capsys.readouterr().err
    assert "like_treshold" in err and "did you mean 'like_threshold'" in err
    assert ("--set like_treshold" if how == "--set" else "prep.yaml") in err
    assert not (home / "data").exists()


def test_duplicate_user_item_time_rows_and_single_event_users_are_dropped_and_counted(tmp_path):
    ev = GOOD + "u1,i1,1001,2\nu1,i1,1001,2\nu9,i1,5,5\n"  # (u1, i1, 1001) three times; u9 has one event
    _prepare_file(tmp_path, ev)
    st = load_prepared("mine", home=tmp_path / "home").manifest["stats"]
    assert st["dropped"] == {"duplicate": 2, "user_below_min_events": 1}
    assert st["interactions"] == 12


def test_rows_without_an_id_are_dropped_counted_and_logged_with_their_line(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llmrec.data.loaders"):
        _prepare_file(tmp_path, GOOD + ",i1,7,5\nu2,,8,5\n")
    st = load_prepared("mine", home=tmp_path / "home").manifest["stats"]
    assert st["dropped"] == {"missing_id": 2}
    assert "2 rows with an empty user_id or item_id dropped (first: line 14)" in caplog.text


def test_millisecond_timestamps_prepare_with_a_warning_and_show_runs(home, capsys, caplog):
    ms = "user_id,item_id,timestamp,rating\n" + "".join(
        f"u{u},i{j},{1_700_000_000_000 + 1000 * (10 * u + j)},{1 + (u + j) % 5}\n"
        for u in range(3) for j in range(1, 5))
    Path("events.csv").write_text(ms)
    Path("items.csv").write_text(ITEMS)
    with caplog.at_level(logging.WARNING, logger="llmrec.data.loaders"):
        assert main(["data", "prepare", "--dataset", "events.csv", "--items", "items.csv", "--set", "name=ms"]) == 0
    out = capsys.readouterr().out
    assert "time span        1700000001000 .. 1700000024000" in out  # was: `year 55840 is out of range`
    assert "events.csv: line 2: field 'timestamp': 12 timestamps of 1e+11 or more" in caplog.text
    ds = load_prepared("ms")
    assert list(ds.interactions.query("user_id == 'u0'")["split"]) == ["train", "train", "valid", "test"]
    assert main(["data", "show", "--dataset", "ms", "--user", "u1"]) == 0
    assert "1700000011000" in capsys.readouterr().out
    # nanoseconds (pandas' datetime64 as integers): a traceback from the date formatting before
    ns = ms.replace(",17000", ",17000000000")
    Path("events.csv").write_text(ns)
    assert main(["data", "prepare", "--dataset", "events.csv", "--items", "items.csv", "--set", "name=ns"]) == 0


def test_file_suffix_in_capitals_is_read(home, capsys):
    Path("EVENTS.CSV").write_text(GOOD)
    assert main(["data", "prepare", "--dataset", "EVENTS.CSV"]) == 0
    assert load_prepared("EVENTS").manifest["stats"]["interactions"] == 12


def test_crlf_and_blank_lines_read_as_lf(tmp_path):
    _prepare_file(tmp_path, GOOD, name="lf")
    crlf = "\r\n".join(GOOD.splitlines()[:3] + [""] + GOOD.splitlines()[3:]) + "\r\n"
    _prepare_file(tmp_path, crlf, name="crlf")
    # (the manifests read as written: load_prepared would refuse "lf", whose source file changed since)
    h = [json.loads((tmp_path / "home" / "data" / n / "manifest.json").read_text())["content_hash"]
         for n in ("lf", "crlf")]
    assert h[0] == h[1]


def test_amazon_reader_names_an_unreadable_gzip(tmp_path):
    from llmrec.data.loaders import load_amazon

    rev = tmp_path / "reviews.json.gz"
    row = b'{"reviewerID": "a", "asin": "x", "overall": 5.0, "unixReviewTime": 1}\n'
    rev.write_bytes(gzip.compress(row * 50)[:-20])  # cut off before its end
    meta = tmp_path / "meta.json.gz"
    meta.write_bytes(gzip.compress(b'{"asin": "x", "title": "X"}\n'))
    with pytest.raises(DataError, match=r"reviews.json.gz: cannot read the gzip file after line \d+"):
        load_amazon(rev, meta)
    rev.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"reviews.json.gz: cannot read the gzip file after line 0: Not a gzipped"):
        load_amazon(rev, meta)
    rev.write_bytes(gzip.compress(row * 3000 + b'{"reviewerID": "\xff"}\n' + row))  # past the first decoded block
    with pytest.raises(DataError, match=r"reviews.json.gz: line 3001: not UTF-8 text"):
        load_amazon(rev, meta)


def test_a_stale_swap_folder_of_the_same_pid_does_not_block_a_reprepare(tmp_path):
    final = tmp_path / "data" / "x"

    def write(content):
        def w(tmp: Path) -> None:
            (tmp / "f").write_text(content)
        return w

    _write_atomic(final, write("one"))
    stale = final.with_name(f".x.old.{os.getpid()}")  # left by a run killed mid-swap, same pid (a container's)
    stale.mkdir()
    (stale / "junk").write_text("junk")
    _write_atomic(final, write("two"))
    assert (final / "f").read_text() == "two"


# ---------------------------------------------------------------------------------------------------------------
# the command's help and the README's example
def test_prepare_help_lists_every_config_key_with_its_default(capsys):
    from llmrec.cli.data import PREPARE_KEYS

    listed = dict(ln.split()[0].split("=", 1) for ln in PREPARE_KEYS.splitlines())
    want = {f.name: "" if f.default is None else str(f.default) for f in dataclasses.fields(PrepareConfig)}
    assert listed == want
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    out = capsys.readouterr().out
    for flag in ("--dataset", "--items", "--config", "--set", ".parquet", "like_threshold=3.0"):
        assert flag in out
    assert main(["data"]) == 2  # the group alone: its own help
    out = capsys.readouterr().out
    assert "prepare" in out and "show" in out and "COMMAND" not in out


def test_readme_own_data_example_prepares_and_shows(home, capsys):
    """README 'Your own data': the two files' format, with enough events per user, and its two data commands."""
    ev = "user_id,item_id,timestamp,rating\n" + "".join(
        f"u{u},b{j},{1700000000 + 310 * (4 * u + j)},{1 + (u * j) % 5}\n" for u in range(1, 4) for j in range(1, 5))
    Path("events.csv").write_text(ev)
    Path("books.csv").write_text("item_id,title,genres,author\n" + "".join(
        f"b{j},Book {j},Science Fiction,Frank Herbert\n" for j in range(1, 5)))
    assert main(["data", "prepare", "--dataset", "events.csv", "--items", "books.csv", "--set", "name=books",
                 "domain=book", "like_threshold=3"]) == 0
    assert "written to" in capsys.readouterr().out
    ds = load_prepared("books")
    assert ds.domain == "book" and ds.manifest["like_threshold"] == 3.0 and ds.text_fields == ["genres", "author"]
    assert main(["data", "show", "--dataset", "books", "--user", "u1"]) == 0
    assert "user u1: 4 events in books (books)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# the built-in datasets: what they prepare to, pinned library-independently (the Parquet bytes also carry the
# pyarrow version): every event's user, item, time, rating, label, split and position; every Yes/No row
def _fingerprint(ds) -> str:
    h = hashlib.sha256()
    h.update(ds.interactions[["user_id", "item_id", "timestamp", "rating", "label", "split", "pos"]]
             .to_csv(index=False).encode())
    y = ds.yesno
    h.update(y[["user_id", "item_id", "timestamp", "label", "split"]].to_csv(index=False).encode())
    h.update("|".join(",".join(map(str, h_)) for h_ in y["hist_items"]).encode())
    h.update(json.dumps(ds.manifest["yesno_cutoffs"], sort_keys=True).encode())
    return h.hexdigest()[:16]


BUILTIN_PRINTS = {  # content_hash then (pyarrow 2x, pandas 3): e70fb06d..., 33f9e16c..., 9e1d8739...
    "ml-100k": "a2d43e69976e61c8",
    "amazon-gift-cards": "3fc6832473180437",
    "lastfm": "aff49646e9cab518",
}


@pytest.mark.parametrize("name", sorted(BUILTIN_PRINTS))
def test_builtin_datasets_prepare_to_what_they_did(tmp_path, name):
    from llmrec.config import shared_data_dir

    if name != "ml-100k" and not (shared_data_dir() / {"lastfm": "hetrec2011-lastfm-2k",
                                                       "amazon-gift-cards": "amazon2018-gift-cards"}[name]).is_dir():
        pytest.skip(f"shared datasets not found under {shared_data_dir()} (LLMREC_SHARED_DATA)")
    prepare(name, home=tmp_path)
    assert _fingerprint(load_prepared(name, home=tmp_path)) == BUILTIN_PRINTS[name]
