"""Preprocessing, splits and the prepared-dataset folder.

A prepared dataset lives in `$LLMREC_HOME/data/<name>/`:

| file | content |
|---|---|
| `interactions.parquet` | user_id, item_id, timestamp, rating, label, split (leave-one-out: train/valid/test), pos |
| `items.parquet` | item_id, title, text fields (genres, year, description, ...) |
| `users.parquet` | optional user attributes |
| `yesno.parquet` | Yes/No examples: user_id, item_id, timestamp, label, split (global time cut-off), hist_* lists |
| `negatives.parquet` | fixed sampled negatives (for *sampled* metrics only), per user and split |
| `manifest.json` | config, seed, counts, dropped rows by reason, rules, content hashes |

Rules, all recorded in the manifest:
- **order**: each user's events are sorted by timestamp; equal timestamps keep the source file order (stable sort).
- **next item (leave-one-out)**: a user's last event is `test`, the one before `valid`, the rest `train`; users with
  fewer than 3 events stay all-`train` and have no target.
- **Yes/No (TALLRec)**: every event with at least `min_history` earlier events is an example whose history is the
  `history_len` events before it (with like/dislike). Global time cut-offs `t_valid < t_test` are taken at the
  `1 - valid_frac - test_frac` and `1 - test_frac` quantiles of all timestamps; an example is `train` if its time is
  before `t_valid`, `test` if at or after `t_test`, else `valid`. So every test example lies strictly after every
  training example, and no training history can hold a test event.
- **labels**: `rating_threshold` (like = rating > threshold; events without a rating are dropped, `missing_rating`),
  `implicit` (observed = like; for Yes/No each positive gets `neg_per_pos` sampled items with the same history,
  label No, saved: items the user had not interacted with by the end of the row's split period - before `t_valid`
  for a train row, before `t_test` for a valid row, ever for a test row - so no later event decides a training row's
  label), `weight_above_user_median` (like = weight/rating above the user's median over their events before
  `t_valid`, so no later weight decides a training label; a user with none: before `t_test`, else all their events;
  e.g. Last.fm listen counts, which are all-time totals anyway).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmrec import __version__
from llmrec.config import llmrec_home, to_dict
from llmrec.data.loaders import BUILTIN, DataError, RawData, load_raw

log = logging.getLogger(__name__)

# the prepared-folder layout `PreparedDataset` reads; bump when files or manifest keys change meaning. A manifest
# without the key is version 1 if it has every key version 1 reads (folders written before the key existed).
FORMAT_VERSION = 1
_V1_KEYS = {"name", "config", "seed", "label_rule", "yesno_cutoffs", "files_sha256", "content_hash"}


@dataclass
class PrepareConfig:
    """How a dataset is prepared. Every key has a default; `llmrec data prepare --set key=value` overrides."""

    kcore: int = 0  # keep users and items with >= kcore events (iterated to a fixed point); 0 = off
    min_user_events: int = 3  # users with fewer events are dropped (they can have no leave-one-out target)
    label_rule: Literal["auto", "rating_threshold", "implicit", "weight_above_user_median"] = "auto"
    like_threshold: float = 3.0  # rating_threshold: like = rating > like_threshold (TALLRec: > 3)
    history_len: int = 10  # Yes/No examples: the preceding <= history_len events
    min_history: int = 1  # Yes/No examples need at least this many earlier events
    valid_frac: float = 0.1  # share of events (by time) after the validation cut-off ...
    test_frac: float = 0.1  # ... and after the test cut-off
    neg_per_pos: int = 1  # implicit label rule: sampled No examples per observed event
    n_sampled_negatives: int = 99  # fixed negatives per user for *sampled* ranking metrics
    seed: int = 42
    items_file: str | None = None  # item metadata file for a CSV/Parquet interaction file
    name: str | None = None  # name of the prepared folder (default: the dataset's name)
    # the noun prompts use for one item ("book", "song", "board game"; plural formed by llmrec.prompts.text.plural);
    # default: the loader's (movie, artist, gift card; "item" for a CSV/Parquet file or a RecBole folder)
    domain: str | None = None


@dataclass
class PrepareReport:
    name: str
    stats: dict
    seconds: float
    path: Path
    peak_rss_mb: float = 0.0
    extra: dict = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _kcore(df: pd.DataFrame, k: int, k_user: int | None = None) -> pd.DataFrame:
    """Users with >= k_user (default k) and items with >= k events, iterated until both hold at once."""
    k_user = k if k_user is None else k_user
    while True:
        uc = df["user_id"].map(df["user_id"].value_counts())
        ic = df["item_id"].map(df["item_id"].value_counts())
        keep = (uc >= k_user) & (ic >= k)
        if keep.all():
            return df
        df = df[keep]


def preprocess(raw: RawData, cfg: PrepareConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int], str]:
    """Clean interactions: unknown items, unrated events (rating_threshold), duplicates, k-core, short users; sort;
    label. Returns (interactions, items, dropped-by-reason, label rule used)."""
    df = raw.interactions
    dropped = dict(raw.dropped)
    items = raw.items.copy()
    items["item_id"] = items["item_id"].astype(str)
    items = items.drop_duplicates("item_id")
    for c in items.columns:
        items[c] = items[c].fillna("").astype(str)
    unknown = ~df["item_id"].isin(set(items["item_id"]))
    if unknown.any():
        if raw.unknown_items == "error":
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            src = raw.sources[0] if raw.sources else raw.name
            raise DataError(
                f"{src}: line {int(df['order'].iloc[i]) + 2}: field 'item_id': {df['item_id'].iloc[i]!r} has "
                f"no row in the item file ({int(unknown.sum())} interactions reference unknown items)"
            )
        dropped["no_item_metadata"] = int(unknown.sum())
        df = df[~unknown.to_numpy()]
    rule = raw.label_rule if cfg.label_rule == "auto" else cfg.label_rule
    if rule == "rating_threshold":
        if df["rating"].isna().all():
            raise DataError(f"{raw.name}: label_rule 'rating_threshold' needs ratings; this dataset has none")
        unrated = df["rating"].isna()  # an empty rating is no verdict: not a dislike (NaN > threshold is False)
        if unrated.any():
            dropped["missing_rating"] = int(unrated.sum())
            df = df[~unrated.to_numpy()]
    # order: time, then file order; duplicates of (user, item) keep the earliest event
    df = df.sort_values(["user_id", "timestamp", "order"], kind="stable")
    dup = df.duplicated(["user_id", "item_id"], keep="first")
    dropped["duplicate"] = int(dup.sum())
    df = df[~dup.to_numpy()]
    if cfg.kcore > 0:
        n = len(df)
        # the users' minimum inside the fixed point: dropping short users afterwards could leave items below k
        df = _kcore(df, cfg.kcore, max(cfg.kcore, cfg.min_user_events))
        dropped["kcore"] = n - len(df)
    ucount = df["user_id"].map(df["user_id"].value_counts())
    short = ucount < cfg.min_user_events
    dropped["user_below_min_events"] = int(short.sum())
    df = df[~short.to_numpy()].reset_index(drop=True)
    if df.empty:
        src = raw.sources[0] if raw.sources else raw.name
        hint = (f"; every user needs at least min_user_events={cfg.min_user_events} events (users with fewer have no "
                "leave-one-out target)" if dropped.get("user_below_min_events") else
                f"; kcore={cfg.kcore} keeps only users and items with at least that many events"
                if dropped.get("kcore") else "")
        shown = {k: v for k, v in dropped.items() if v}
        raise DataError(f"{src}: no interactions left after preprocessing (dropped: {shown}){hint}")

    if rule == "rating_threshold":
        label = (df["rating"] > cfg.like_threshold).astype("int8")
    elif rule == "implicit":
        label = pd.Series(1, index=df.index, dtype="int8")
    elif rule == "weight_above_user_median":
        # the user's median over what was known at the Yes/No cut-off t_valid, so no valid/test-period weight decides
        # a training row's label; a user with no event before t_valid: before t_test; none before that: all events
        t_valid, t_test = time_cutoffs(df["timestamp"].to_numpy(), cfg)
        ts, by = df["timestamp"], df["user_id"]

        def median_before(bound: int | None) -> pd.Series:
            w = df["rating"] if bound is None else df["rating"].where(ts < bound)
            return w.groupby(by).transform("median")

        med = median_before(t_valid).fillna(median_before(t_test)).fillna(median_before(None))
        label = (df["rating"] > med).astype("int8")  # NaN weight -> not a like
    else:
        raise DataError(f"unknown label_rule {rule!r}")
    df = df.assign(label=label)
    used = set(df["item_id"])
    items = items[items["item_id"].isin(used)].sort_values("item_id", kind="stable").reset_index(drop=True)
    return df, items, {k: v for k, v in dropped.items() if v}, rule


def loo_split(df: pd.DataFrame) -> pd.DataFrame:
    """Add `pos` (0-based position in the user's time-ordered sequence) and the leave-one-out `split` column.
    `df` must be sorted by user, time, file order."""
    pos = df.groupby("user_id", sort=False).cumcount().to_numpy()
    n = df["user_id"].map(df["user_id"].value_counts()).to_numpy()
    split = np.full(len(df), "train", dtype=object)
    has_target = n >= 3
    split[(pos == n - 1) & has_target] = "test"
    split[(pos == n - 2) & has_target] = "valid"
    return df.assign(pos=pos.astype(np.int32), split=split)


def time_cutoffs(ts: np.ndarray, cfg: PrepareConfig) -> tuple[int, int]:
    """The Yes/No split's global cut-offs (t_valid, t_test): the `1 - valid_frac - test_frac` and `1 - test_frac`
    quantiles of all timestamps, rounded up; t_test > t_valid."""
    t_valid, t_test = np.quantile(ts, [1 - cfg.valid_frac - cfg.test_frac, 1 - cfg.test_frac])
    t_valid, t_test = int(np.ceil(t_valid)), int(np.ceil(t_test))
    if not t_valid < t_test:
        t_test = t_valid + 1
    return t_valid, t_test


def yesno_examples(df: pd.DataFrame, cfg: PrepareConfig, rule: str, n_items_all: np.ndarray) -> pa.Table:
    """TALLRec Yes/No examples with a global time cut-off (see module docstring). Vectorised with list offsets."""
    rng = np.random.default_rng(cfg.seed)
    ts = df["timestamp"].to_numpy()
    t_valid, t_test = time_cutoffs(ts, cfg)
    pos = df["pos"].to_numpy()
    idx = np.flatnonzero(pos >= cfg.min_history)
    start = idx - np.minimum(pos[idx], cfg.history_len)
    user = df["user_id"].to_numpy()
    item = df["item_id"].to_numpy()
    label = df["label"].to_numpy()
    rating = df["rating"].to_numpy()
    t_idx = ts[idx]
    split = np.where(t_idx < t_valid, "train", np.where(t_idx >= t_test, "test", "valid"))
    target_item = item[idx]
    target_label = label[idx].astype(np.int8)
    if rule == "implicit" and cfg.neg_per_pos > 0:
        # each positive gets neg_per_pos items the user had not interacted with by the end of the row's split period
        # (train: before t_valid, valid: before t_test, test: ever), same history and time (saved, seeded). Items the
        # user meets only later are fair negatives of an earlier split: excluding them would let the valid/test period
        # decide which items a training row may label No (never the user's later targets)
        catalogue = n_items_all
        seen_ever = df.groupby("user_id", sort=False)["item_id"].agg(set).to_dict()
        seen_by = {s: df[ts < bound].groupby("user_id", sort=False)["item_id"].agg(set).to_dict()
                   for s, bound in (("train", t_valid), ("valid", t_test))}
        row_seen = [seen_ever[u] if s == "test" else seen_by[s].get(u, set()) for u, s in zip(user[idx], split)]
        # users who have met the whole catalogue (by then) get no negatives
        can = np.array([len(s) < len(catalogue) for s in row_seen], dtype=bool)
        reps = np.repeat(np.flatnonzero(can), cfg.neg_per_pos)
        neg_items = catalogue[rng.integers(0, len(catalogue), size=len(reps))]
        for j in range(len(reps)):  # resample the (few) collisions with the user's own items
            seen_u = row_seen[reps[j]]
            tries = 0
            while neg_items[j] in seen_u:
                tries += 1
                if tries > 50:  # dense user: draw from the explicit complement
                    neg_items[j] = rng.choice(np.array(sorted(set(catalogue) - seen_u), dtype=object))
                    break
                neg_items[j] = catalogue[rng.integers(0, len(catalogue))]
        idx = np.concatenate([idx, idx[reps]])
        start = np.concatenate([start, start[reps]])
        split = np.concatenate([split, split[reps]])
        target_item = np.concatenate([target_item, neg_items])
        target_label = np.concatenate([target_label, np.zeros(len(reps), dtype=np.int8)])
        order = np.lexsort((target_label == 0, idx))  # keep examples grouped by event, positive first
        idx, start, split, target_item, target_label = (
            a[order] for a in (idx, start, split, target_item, target_label)
        )
    lengths = idx - start
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    gather = np.concatenate([np.arange(s, e) for s, e in zip(start, idx)]) if len(idx) else np.zeros(0, dtype=int)

    def lists(values: np.ndarray, typ: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[gather], type=typ))

    return pa.table(
        {
            "user_id": pa.array(user[idx], pa.string()),
            "item_id": pa.array(target_item, pa.string()),
            "timestamp": pa.array(ts[idx], pa.int64()),
            "label": pa.array(target_label, pa.int8()),
            "split": pa.array(split, pa.string()),
            "hist_items": lists(item, pa.string()),
            "hist_labels": lists(label.astype(np.int8), pa.int8()),
            "hist_ratings": lists(rating.astype(np.float64), pa.float64()),
            "hist_timestamps": lists(ts, pa.int64()),
        }
    ), {"t_valid": t_valid, "t_test": t_test}


def sampled_negatives(df: pd.DataFrame, item_ids: np.ndarray, n: int, seed: int) -> pd.DataFrame:
    """`n` fixed negatives per user with a target (items the user never interacted with), for sampled metrics."""
    rng = np.random.default_rng(seed + 1)
    seen = df.groupby("user_id", sort=False)["item_id"].agg(set)
    rows = []
    targets = df[df["split"] == "test"]
    n = min(n, len(item_ids) - 1)
    for u in targets["user_id"]:
        s = seen[u]
        pool = rng.choice(item_ids, size=min(len(item_ids), n + len(s) + 8), replace=False)
        negs = [i for i in pool if i not in s][:n]
        if len(negs) < n:  # tiny catalogue: exhaustive
            negs = [i for i in item_ids if i not in s][:n]
        rows.append((u, negs))
    return pd.DataFrame(rows, columns=["user_id", "negatives"])


def replace_atomic(final: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temporary file of `final`'s folder under a name no other writer uses (thread or process),
    then rename it onto `final`; on any failure the temporary file is removed and `final` is left as it was."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(final: Path, write) -> None:
    """Write into a temporary sibling folder, then swap it in: a failure leaves the old folder untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    old = None
    try:
        write(tmp)
        if final.exists():  # a unique name: one left by a killed run (same pid in a container) must not block this
            old = final.with_name(f".{final.name}.old.{os.getpid()}.{os.urandom(4).hex()}")
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        if old is not None and old.exists() and not final.exists():
            old.rename(final)  # the swap failed half-way: put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_name(name: str) -> str:
    """A prepared folder's name is one plain path component under `$LLMREC_HOME/data/`: no separators, not `.`/`..`,
    not hidden (`.`-prefixed names are prepare's temporary folders). Anything else would make the atomic replace
    swap out (and delete) a folder outside the data directory."""
    n = str(name)
    if not n or n.startswith(".") or "/" in n or "\\" in n:
        raise DataError(
            f"PrepareConfig.name: {name!r} is not a plain folder name (no '/' or '\\', not empty, not starting with "
            "'.'); the prepared folder is $LLMREC_HOME/data/<name>"
        )
    return n


def _source_hashes(sources: Sequence[str]) -> dict[str, str]:
    """sha256 of each source file, keyed by its absolute path (a relative one would name another file elsewhere)."""
    return {str(Path(s).resolve()): file_sha256(Path(s)) for s in sources if Path(s).is_file()}


def title_key(title: object) -> str:
    """What makes two catalogue titles the same for `title_twins`: whitespace-collapsed, case-folded text."""
    return " ".join(str(title).split()).casefold()


def title_twins(item_ids: Sequence[object], titles: Sequence[object]) -> dict[str, tuple[str, ...]]:
    """For each item whose title (`title_key`) another item shares, the other items' ids. Catalogues list one work
    under several ids (ML-100K: 18 films twice, e.g. "Chasing Amy (1997)" as 246 and 268); a recommender that
    excludes seen items by id alone would offer a user the film they rated under its other id."""
    groups: dict[str, list[str]] = {}
    for i, t in zip(item_ids, titles):
        groups.setdefault(title_key(t), []).append(str(i))
    return {i: tuple(j for j in g if j != i) for g in groups.values() if len(g) > 1 for i in g}


def with_title_twins(ids: Iterable[str], twins: dict[str, tuple[str, ...]]) -> set[str]:
    """`ids` and every id listed under the same title as one of them (`twins`: a `title_twins` map)."""
    ids = set(ids)
    return ids | {t for i in ids for t in twins.get(i, ())}


def format_day(ts: int) -> str:
    """`YYYY-MM-DD` (UTC) of Unix seconds `ts`; the number itself where no calendar date is (milliseconds or any
    other large count: timestamps need only order the events)."""
    try:
        return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%d")
    except (ValueError, OverflowError, OSError):
        return str(int(ts))


def compute_stats(df: pd.DataFrame, items: pd.DataFrame, yesno: pa.Table, dropped: dict[str, int]) -> dict:
    n_u, n_i, n = df["user_id"].nunique(), len(items), len(df)
    twins = title_twins(items["item_id"].tolist(), items["title"].tolist())
    ys = pd.Series(yesno.column("split").to_numpy(zero_copy_only=False)).value_counts().to_dict()
    lab = yesno.column("label").to_numpy()
    spl = yesno.column("split").to_numpy(zero_copy_only=False)
    return {
        "users": int(n_u),
        "items": int(n_i),
        "interactions": int(n),
        "density": float(n / (n_u * n_i)),
        "time_start": format_day(int(df["timestamp"].min())),
        "time_end": format_day(int(df["timestamp"].max())),
        "like_rate": float(df["label"].mean()),
        # items whose title another item shares (kept apart: ids are the data's; recommendations skip a seen
        # title's twins, RankingConfig.exclude_seen_titles)
        "items_sharing_a_title": len(twins),
        "dropped": dropped,
        "loo_split": {k: int(v) for k, v in df["split"].value_counts().to_dict().items()},
        "yesno_split": {k: int(v) for k, v in ys.items()},
        "yesno_positive_rate": {
            s: float(lab[spl == s].mean()) for s in ("train", "valid", "test") if (spl == s).any()
        },
    }


_DOMAIN_RE = re.compile(r"[A-Za-z][A-Za-z -]{0,39}")


def check_domain(domain: str) -> str:
    """The `domain` key: 1-40 letters, spaces or hyphens, starting with a letter. It is written into every prompt
    unquoted, so nothing else (quotes, newlines, digits, punctuation) is accepted."""
    d = str(domain).strip()
    if not _DOMAIN_RE.fullmatch(d) or "  " in d:
        raise DataError(
            f"PrepareConfig.domain: {domain!r} is not a noun of 1-40 letters, spaces or hyphens (e.g. 'book', "
            "'board game'); it is written unquoted into every prompt"
        )
    return d


def check_config(cfg: PrepareConfig) -> None:
    """Values of the right type that still cannot mean anything (a negative count, a split share outside (0, 1), a
    NaN threshold that would label every event a dislike): refused, naming the key, before any data is read."""
    for key, low in (("kcore", 0), ("min_user_events", 0), ("history_len", 1), ("min_history", 0),
                     ("neg_per_pos", 0), ("n_sampled_negatives", 0)):
        if getattr(cfg, key) < low:
            raise DataError(f"PrepareConfig.{key}: must be >= {low}, got {getattr(cfg, key)}")
    for key in ("valid_frac", "test_frac"):
        if not 0 < getattr(cfg, key) < 1:
            raise DataError(f"PrepareConfig.{key}: must be between 0 and 1 (exclusive), got {getattr(cfg, key)}")
    if not cfg.valid_frac + cfg.test_frac < 1:
        raise DataError(f"PrepareConfig.valid_frac + test_frac: must be below 1 (some events must be before the "
                        f"cut-offs for training), got {cfg.valid_frac} + {cfg.test_frac}")
    if not math.isfinite(cfg.like_threshold):
        raise DataError(f"PrepareConfig.like_threshold: must be a finite number, got {cfg.like_threshold}")


def prepare(dataset: str, cfg: PrepareConfig | None = None, home: Path | None = None) -> PrepareReport:
    """Load `dataset` (built-in name, RecBole folder or file path), preprocess, split, write the prepared folder."""
    cfg = cfg or PrepareConfig()
    t0 = time.perf_counter()
    check_config(cfg)  # before any work: a bad key changes nothing
    domain = check_domain(cfg.domain) if cfg.domain is not None else None
    if cfg.name is not None:  # "" too: refused, not taken as "no name given"
        check_name(cfg.name)
    raw = load_raw(dataset, cfg.items_file)
    if domain:
        raw.domain = domain
    name = check_name(cfg.name or raw.name)
    df, items, dropped, rule = preprocess(raw, cfg)
    df = loo_split(df)
    yesno, cutoffs = yesno_examples(df, cfg, rule, items["item_id"].to_numpy())
    negs = sampled_negatives(df, items["item_id"].to_numpy(), cfg.n_sampled_negatives, cfg.seed)
    stats = compute_stats(df, items, yesno, dropped)
    inter = df[["user_id", "item_id", "timestamp", "rating", "label", "split", "pos"]].reset_index(drop=True)
    root = (home or llmrec_home()) / "data" / name

    def write(tmp: Path) -> None:
        inter.to_parquet(tmp / "interactions.parquet", index=False)
        items.to_parquet(tmp / "items.parquet", index=False)
        if raw.users is not None:
            raw.users.to_parquet(tmp / "users.parquet", index=False)
        pq.write_table(yesno, tmp / "yesno.parquet")
        negs.to_parquet(tmp / "negatives.parquet", index=False)
        hashes = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.parquet"))}
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "source": dataset,
            "sources": raw.sources,
            "sources_sha256": _source_hashes(raw.sources),
            "domain": raw.domain,
            "text_fields": raw.text_fields,
            "config": to_dict(cfg),
            "seed": cfg.seed,
            "label_rule": rule,
            "like_threshold": cfg.like_threshold if rule == "rating_threshold" else None,
            "tie_break": raw.tie_break,
            "yesno_cutoffs": cutoffs,
            "stats": stats,
            "files_sha256": hashes,
            "content_hash": hashlib.sha256("".join(hashes[k] for k in sorted(hashes)).encode()).hexdigest(),
            "llmrec_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

    _write_atomic(root, write)
    secs = time.perf_counter() - t0
    log.info("prepared %s in %.1fs -> %s", name, secs, root)
    return PrepareReport(name=name, stats=stats, seconds=secs, path=root)


# ---------------------------------------------------------------------------------------------------------------
class PreparedDataset:
    """Read-only view of a prepared folder. Items are indexed 0..n_items-1 in `items` order (sorted by item_id)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.is_file():
            raise DataError(f"{self.root}: not a prepared dataset (no manifest.json); run `llmrec data prepare` first")
        self.manifest: dict = self._read_manifest(mpath)
        self._check_manifest()
        self.name: str = self.manifest["name"]
        self.domain: str = self.manifest.get("domain", "item")
        self.text_fields: list[str] = list(self.manifest.get("text_fields", []))
        self.interactions: pd.DataFrame = pd.read_parquet(self.root / "interactions.parquet")
        self.items: pd.DataFrame = pd.read_parquet(self.root / "items.parquet")
        self.item_ids: np.ndarray = self.items["item_id"].to_numpy()
        self.item_index: dict[str, int] = {i: n for n, i in enumerate(self.item_ids)}
        self.titles: np.ndarray = self.items["title"].to_numpy()

    def _read_manifest(self, mpath: Path) -> dict:
        """manifest.json as a dict; a damaged one (not JSON, not an object) is refused naming the file (and line)."""
        again = f"; run `llmrec data prepare` again for {self.root.name!r}"
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{mpath}: line {e.lineno}: not valid JSON ({e.msg}){again}") from None
        except UnicodeDecodeError:
            raise DataError(f"{mpath}: not UTF-8 text{again}") from None
        if not isinstance(m, dict):
            raise DataError(f"{mpath}: not a JSON object but {type(m).__name__}{again}")
        return m

    def _check_manifest(self) -> None:
        """Refuse a folder of another format, one whose source files changed since it was prepared, or one whose own
        files no longer match the hashes its manifest recorded."""
        m = self.manifest
        again = f"; run `llmrec data prepare` again for {m.get('source', self.root.name)!r}"
        fmt = m.get("format_version", 1 if _V1_KEYS <= m.keys() else 0)
        if fmt != FORMAT_VERSION:
            raise DataError(f"{self.root}: prepared folder of format {fmt}, this llmrec reads {FORMAT_VERSION}{again}")
        lacking = sorted(_V1_KEYS - m.keys())
        if lacking or not isinstance(m["files_sha256"], dict):
            raise DataError(f"{self.root / 'manifest.json'}: " + (f"missing key(s) {lacking}" if lacking else
                                                                   "key 'files_sha256' is not an object") + again)
        for src, digest in (m.get("sources_sha256") or {}).items():
            if Path(src).is_file() and file_sha256(Path(src)) != digest:
                raise DataError(f"{self.root}: source {src} changed since this folder was prepared{again}")
        for fname, digest in m["files_sha256"].items():  # a file edited, truncated or lost after preparing
            f = self.root / fname
            if not f.is_file():
                raise DataError(f"{self.root}: {fname} is missing (the manifest lists it){again}")
            if file_sha256(f) != digest:
                raise DataError(f"{self.root}: {fname} changed since this folder was prepared{again}")

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @cached_property
    def users(self) -> pd.DataFrame | None:
        p = self.root / "users.parquet"
        return pd.read_parquet(p) if p.is_file() else None

    @cached_property
    def yesno(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / "yesno.parquet")

    @cached_property
    def negatives(self) -> pd.DataFrame:
        """Fixed sampled negatives per test user: for metrics labelled *sampled* only."""
        return pd.read_parquet(self.root / "negatives.parquet")

    @cached_property
    def user_ids(self) -> np.ndarray:
        return self.interactions["user_id"].unique()

    @cached_property
    def _by_user(self) -> dict[str, pd.DataFrame]:
        return {u: g for u, g in self.interactions.groupby("user_id", sort=False)}

    def has_user(self, user_id: str) -> bool:
        return str(user_id) in self._by_user

    def history(self, user_id: str, before: Literal["train", "valid", "test", "all"] = "test") -> pd.DataFrame:
        """The user's time-ordered events available *before* predicting a leave-one-out target of split `before`:
        `test` -> train+valid events, `valid` -> train events, `train`/`all` -> every event."""
        g = self._by_user.get(str(user_id))
        if g is None:
            raise KeyError(f"unknown user {user_id!r} in dataset {self.name}")
        if before == "test":
            return g[g["split"] != "test"]
        if before == "valid":
            return g[g["split"] == "train"]
        return g

    def targets(self, split: Literal["valid", "test"] = "test") -> pd.DataFrame:
        """Leave-one-out targets: one row (user_id, item_id, timestamp, ...) per user with a target in `split`."""
        return self.interactions[self.interactions["split"] == split].reset_index(drop=True)

    def sequences(self, splits: tuple[str, ...] = ("train",)) -> dict[str, list[str]]:
        """Time-ordered item ids per user, restricted to the given leave-one-out splits."""
        df = self.interactions[self.interactions["split"].isin(splits)]
        return df.groupby("user_id", sort=False)["item_id"].agg(list).to_dict()

    def item_text(self, item_id: str, fields: list[str] | None = None) -> str:
        """`Title (genres: ..., year: ...)`: the text retrieval and BERT encoders read."""
        row = self.items.iloc[self.item_index[item_id]]
        parts = [f"{f}: {row[f]}" for f in (fields if fields is not None else self.text_fields) if str(row.get(f, ""))]
        return f"{row['title']} ({'; '.join(parts)})" if parts else str(row["title"])

    def item_texts(self, fields: list[str] | None = None) -> list[str]:
        return [self.item_text(i, fields) for i in self.item_ids]


def dataset_dir(name: str, home: Path | None = None) -> Path:
    return (home or llmrec_home()) / "data" / name


def check_dataset(name: str, home: Path | None = None, prepare_if_missing: bool | None = None) -> Path:
    """The prepared folder `load_prepared` would open (it may not exist yet for a built-in dataset, which is prepared
    on first use); DataError, touching nothing, for a name that is neither prepared nor preparable."""
    p = Path(name)
    root = p if (p / "manifest.json").is_file() else dataset_dir(name, home)
    if not (root / "manifest.json").is_file() and not (
            name in BUILTIN if prepare_if_missing is None else prepare_if_missing):
        raise DataError(f"dataset {name!r} is not prepared under {root.parent}; run `llmrec data prepare --dataset "
                        f"{name}`")
    return root


def load_prepared(name: str, home: Path | None = None, prepare_if_missing: bool | None = None) -> PreparedDataset:
    """Open a prepared dataset by name (or folder path). When it is not prepared yet: `prepare_if_missing=None`
    (default) prepares a built-in dataset (`BUILTIN`: ml-100k, ml-1m, lastfm, amazon-gift-cards) with its defaults, as
    `llmrec data prepare --dataset NAME` would, and refuses any other name; True prepares any name; False never."""
    root = check_dataset(name, home, prepare_if_missing)
    if not (root / "manifest.json").is_file():
        log.info("dataset %r is not prepared under %s: preparing it with the defaults (first use)", name, root.parent)
        prepare(name, home=home)
    return PreparedDataset(root)
