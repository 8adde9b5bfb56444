"""Data-layer audit 4: bad metadata in the RecBole, Last.fm and Amazon readers and a damaged prepared folder's
manifest. Each is refused with a DataError (one `llmrec: error:` line at the CLI) naming the file, the line and the
field, and a previously prepared folder stays as it was. Tiny files in tmp dirs only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_refused, files_under

from llmrec.cli import main
from llmrec.data import DataError, PrepareConfig, load_prepared, prepare

INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"{u}\t{i}\t{(u + i) % 5 + 1}\t{100 + 10 * u + i}\n" for u in (1, 2, 3) for i in (1, 2, 3, 4))
ITEM = "item_id:token\tmovie_title:token_seq\tgenre:token_seq\n1\tOne\tA\n2\tTwo\tB\n3\tThree\tA\n4\tFour\tB\n"
USER = "user_id:token\tage:float\n1\t20\n2\t30\n3\t40\n"


_files = files_under


_refused = cli_refused


def _recbole(folder: Path, item: str = ITEM, user: str | None = USER) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "rb.inter").write_text(INTER)
    (folder / "rb.item").write_text(item)
    if user is not None:
        (folder / "rb.user").write_text(user)
    return folder


@pytest.mark.parametrize("item, user, needle", [
    (ITEM + "2\tTwo (director's cut)\tB\n", USER, "rb.item: line 6: field 'item_id': '2' already has a different "
                                                  "row at line 3"),
    (ITEM.replace("\tThree\t", "\t \t"), USER, "rb.item: line 4: field 'movie_title' is empty (item '3'"),
    (ITEM, USER + "2\t31\n", "rb.user: line 5: field 'user_id': '2' already has a different row at line 3"),
    (ITEM, "uid:token\tage:float\n1\t20\n", "rb.user: line 1: missing column(s) ['user_id']"),
])
def test_recbole_item_and_user_files_with_clashing_or_empty_rows_are_refused(home, capsys, tmp_path, item, user,
                                                                              needle):
    """An item id on two different rows (which title holds?), an empty title (a prompt would read `""`), a user on
    two rows or a user file without `user_id`: a CSV item file refuses the same; the RecBole reader silently kept the
    first row, the empty title, or saved the user file as it was."""
    folder = _recbole(tmp_path / "rb")
    assert main(["data", "prepare", "--dataset", str(folder)]) == 0
    capsys.readouterr()
    before = _files(home / "data" / "rb")
    _recbole(folder, item, user)
    assert needle in _refused(capsys, ["data", "prepare", "--dataset", str(folder)])
    assert _files(home / "data" / "rb") == before


@pytest.mark.parametrize("sep", [" ", ","])
def test_recbole_header_not_separated_by_tabs_is_named(home, capsys, tmp_path, sep):
    """`user_id:token item_id:token ...` read as one column named `user_id` (the text before the first ':'): the error
    said only `item_id` and `timestamp` were missing, found ['user_id']."""
    folder = _recbole(tmp_path / "rb", user=None)
    (folder / "rb.inter").write_text(INTER.replace("\t", sep))
    line = _refused(capsys, ["data", "prepare", "--dataset", str(folder)])
    assert f"rb.inter: line 1: the header 'user_id:token{sep}item_id:token" in line, line
    assert "separates its fields by a tab" in line
    assert not (home / "data").exists() or not any((home / "data").iterdir())


def test_recbole_repeated_identical_rows_and_padded_ids_are_read(tmp_path):
    """The same item row twice is one item; ids are stripped in the item file as in the events (a padded id in the
    item file matched no event: every event of that item was refused as unknown)."""
    folder = _recbole(tmp_path / "rb", ITEM.replace("\n2\tTwo", "\n 2 \tTwo") + "1\tOne\tA\n", None)
    rep = prepare(str(folder), PrepareConfig(), home=tmp_path / "home")
    assert rep.stats["items"] == 4 and rep.stats["interactions"] == 12
    ds = load_prepared("rb", home=tmp_path / "home")
    assert ds.items["item_id"].tolist() == ["1", "2", "3", "4"] and ds.items["title"].tolist()[:2] == ["One", "Two"]


# ---------------------------------------------------------------------------------------------------------------
# Amazon-2018 JSON lines: the metadata file
def _amazon(tmp_path: Path, metas: list[dict | str]) -> tuple[Path, Path]:
    rev = tmp_path / "reviews.json"
    rev.write_text("".join(json.dumps({"reviewerID": f"u{u}", "asin": f"a{i}", "overall": 5.0,
                                       "unixReviewTime": 1000 + 10 * u + i}) + "\n"
                           for u in range(3) for i in range(3)))
    meta = tmp_path / "meta.json"
    meta.write_text("".join((m if isinstance(m, str) else json.dumps(m)) + "\n" for m in metas))
    return rev, meta


META = [{"asin": f"a{i}", "title": f"Card {i}", "category": ["Gift Cards", "Restaurants"]} for i in range(3)]


@pytest.mark.parametrize("bad, needle", [
    ({"asin": "a1", "title": "Card 1", "category": "Gift Cards"},
     "line 2: field 'category': 'Gift Cards' is not a list of strings"),
    ({"asin": "a1", "title": "Card 1", "category": [["Gift Cards"]]}, "line 2: field 'category': [['Gift Cards']]"),
    ({"title": "Card 1"}, "line 2: missing field 'asin'"),
    ({"asin": None, "title": "Card 1"}, "line 2: field 'asin': None is not an id"),
])
def test_amazon_metadata_rows_of_the_wrong_shape_are_refused(tmp_path, bad, needle):
    """A category string was read letter by letter ("G, i, f, t, ..."), a nested list broke the reader with a
    TypeError, a row without an asin became the item `""` (or `"None"`)."""
    from llmrec.data.loaders import load_amazon

    rev, meta = _amazon(tmp_path, [META[0], bad, META[2]])
    with pytest.raises(DataError) as e:
        load_amazon(rev, meta)
    assert str(meta) in str(e.value) and needle in str(e.value), str(e.value)


def test_amazon_metadata_asin_on_two_different_rows_is_refused_and_a_null_category_is_none(tmp_path):
    from llmrec.data.loaders import load_amazon

    rev, meta = _amazon(tmp_path, [META[0], "", META[1], META[2], {**META[1], "title": "Another card"}])
    with pytest.raises(DataError, match=r"meta.json: line 5: field 'asin': 'a1' already has a different row at "
                                        r"line 3"):
        load_amazon(rev, meta)
    rev, meta = _amazon(tmp_path, [META[0], {**META[1], "category": None}, META[2], META[2]])
    raw = load_amazon(rev, meta)
    assert raw.items["item_id"].tolist() == ["a0", "a1", "a2"]
    assert raw.items["categories"].tolist() == ["Gift Cards, Restaurants", "", "Gift Cards, Restaurants"]


# ---------------------------------------------------------------------------------------------------------------
# Last.fm HetRec-2011
LASTFM = {
    "user_taggedartists.dat": "userID\tartistID\ttagID\tday\tmonth\tyear\n" + "".join(
        f"{u}\t{a}\t{t}\t1\t{a - 50}\t2009\n" for u in (2, 3, 4) for a in (51, 52, 53) for t in (13, 15)),
    "user_artists.dat": "userID\tartistID\tweight\n" + "".join(
        f"{u}\t{a}\t{100 * u + a}\n" for u in (2, 3, 4) for a in (51, 52, 53)),
    "artists.dat": "id\tname\turl\tpictureURL\n51\tDuran Duran\t\t\n52\tMorcheeba\t\t\n53\tAir\t\t\n",
    "tags.dat": "tagID\ttagValue\n13\tchillout\n15\tdownt\xe9mpo\n",
}


def _lastfm(folder: Path, **change: str) -> Path:
    folder.mkdir(exist_ok=True)
    for name, text in {**LASTFM, **{k.replace("_dat", ".dat"): v for k, v in change.items()}}.items():
        (folder / name).write_bytes(text.encode("latin-1" if name == "tags.dat" else "utf-8"))
    return folder


def test_lastfm_reads_the_latin1_tag_file(tmp_path):
    from llmrec.data.loaders import load_lastfm

    raw = load_lastfm(_lastfm(tmp_path / "lf"))
    assert len(raw.interactions) == 9 and raw.interactions["rating"].tolist()[:2] == [251.0, 252.0]
    assert raw.items["genres"].tolist() == ["chillout, downt\xe9mpo"] * 3


@pytest.mark.parametrize("change, needle", [
    ({"tags_dat": "id\tvalue\n13\tchillout\n"}, "tags.dat: line 1: missing column(s) ['tagID', 'tagValue']"),
    ({"tags_dat": ""}, "tags.dat: file is empty"),
    ({"tags_dat": LASTFM["tags.dat"] + "13\tlounge\n"},
     "tags.dat: line 4: field 'tagID': '13' already has a different row at line 2"),
    ({"artists_dat": LASTFM["artists.dat"] + "52\tMorcheeba (UK)\t\t\n"},
     "artists.dat: line 5: field 'id': '52' already has a different row at line 3"),
    ({"artists_dat": LASTFM["artists.dat"].replace("Air", " ")}, "artists.dat: line 4: field 'name' is empty"),
    ({"user_artists_dat": LASTFM["user_artists.dat"] + "3\t52\t7\n"},
     "user_artists.dat: line 11: fields 'userID', 'artistID': '3', '52' already has a different row at line 6"),
])
def test_lastfm_bad_metadata_is_refused_naming_file_line_and_field(tmp_path, change, needle):
    """tags.dat was read by pandas directly: a wrong header raised a bare KeyError('tagID'), an empty file pandas'
    EmptyDataError without the file's name; an artist id or a tag id on two rows silently kept the first name, and a
    (user, artist) pair listed twice in user_artists.dat doubled that event (the merge), whatever the weights said."""
    from llmrec.data.loaders import load_lastfm

    folder = _lastfm(tmp_path / "lf", **change)
    with pytest.raises(DataError) as e:
        load_lastfm(folder)
    assert str(folder) in str(e.value) and needle in str(e.value), str(e.value)


def test_lastfm_missing_tag_file_is_named(tmp_path):
    from llmrec.data.loaders import load_lastfm

    folder = _lastfm(tmp_path / "lf")
    (folder / "tags.dat").unlink()
    with pytest.raises(DataError, match=r"lf/tags.dat: file not found"):
        load_lastfm(folder)


# ---------------------------------------------------------------------------------------------------------------
# a damaged prepared folder
@pytest.mark.parametrize("text, needle", [
    (b'{"name": "rb",', "manifest.json: line 1: not valid JSON"),
    (b"[]", "manifest.json: not a JSON object but list"),
    (b'{"format_version": 1, "name": "rb"}', "manifest.json: missing key(s) ['config', 'content_hash'"),
    (b'{"name": "\xff"}', "manifest.json: not UTF-8 text"),
])
def test_damaged_manifest_is_refused_naming_the_file(home, capsys, tmp_path, text, needle):
    """A cut-off or hand-edited manifest.json gave json's bare message ("Expecting value: line 1 column 1") without
    the file, a raw AttributeError traceback (a JSON list) or "files_sha256 (KeyError ...)"; a re-prepare mends it."""
    folder = _recbole(tmp_path / "rb")
    assert main(["data", "prepare", "--dataset", str(folder)]) == 0
    mpath = home / "data" / "rb" / "manifest.json"
    good = mpath.read_bytes()
    mpath.write_bytes(text)
    capsys.readouterr()
    line = _refused(capsys, ["data", "show", "--dataset", "rb", "--user", "1"])
    assert str(mpath) in line and needle in line and "run `llmrec data prepare` again" in line, line
    with pytest.raises(DataError, match="manifest.json"):
        load_prepared("rb")
    assert main(["data", "prepare", "--dataset", str(folder)]) == 0
    assert load_prepared("rb").manifest["name"] == "rb" and len(good) > 100
