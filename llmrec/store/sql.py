"""Event store on SQLAlchemy Core: SQLite (WAL, synchronous=FULL) by default, any SQL URL otherwise.

Tables:
- `events(id, user_id, item_id, type, value, liked, timestamp, idempotency_key UNIQUE, request_hash, created_at)`
- `user_versions(user_id PRIMARY KEY, version)`: bumped in the same transaction as each new event, so a cached
  recommendation keyed by (user, version) is never served after that user's history changed.
- `meta(key PRIMARY KEY, value)`: which prepared dataset initialised the store.

`add_event` returns only after the transaction committed; with SQLite in WAL mode and `synchronous=FULL` the commit
is on disk (fsync'd WAL) when it returns, so an acknowledged event survives a SIGKILL or power loss.
Postgres works with a URL such as `postgresql+psycopg://user:pw@host/db` (install `psycopg[binary]`); the same schema
is created there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from llmrec.config import llmrec_home
from llmrec.store.events import EVENT_TYPES, Event, derive_liked

log = logging.getLogger(__name__)

metadata = sa.MetaData()
events_t = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("item_id", sa.String(256), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("value", sa.Float, nullable=True),
    sa.Column("liked", sa.Boolean, nullable=True),
    sa.Column("timestamp", sa.BigInteger, nullable=False),
    sa.Column("idempotency_key", sa.String(128), nullable=True, unique=True),
    sa.Column("request_hash", sa.String(64), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_events_user_time", "user_id", "timestamp", "id"),
)
versions_t = sa.Table(
    "user_versions",
    metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)
meta_t = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


_WRITE_TRIES = 3  # add_event transactions retried after a concurrent insert of the user's version row
_CONSISTENT_READ_TRIES = 5  # history_with_version reads retried while concurrent events change the version


class StoreError(ValueError):
    """Bad input to the store (the message names the field)."""


class IdempotencyConflict(StoreError):
    """The idempotency key was already used for a different event."""


def default_url(dataset: str) -> str:
    path = (llmrec_home() / "store" / f"{dataset}.db").resolve()
    return f"sqlite:///{path}"


SQLITE_BUSY_TIMEOUT_MS = 10_000  # a write waits this long for another connection's write to end
INIT_WAIT_S = 900.0  # a replica waits this long for another process's first bulk load of the store


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_MS)}")
    cur.close()


def _row_to_event(r: Any) -> Event:
    return Event(
        user_id=r.user_id,
        item_id=r.item_id,
        type=r.type,
        timestamp=int(r.timestamp),
        value=None if r.value is None else float(r.value),
        liked=None if r.liked is None else bool(r.liked),
        id=int(r.id),
        idempotency_key=r.idempotency_key,
    )


def _check_value(value: Any) -> float | None:
    """A finite float (an int or numpy number is converted, so a retry sending 4 or 4.0 hashes the same); NaN / inf,
    booleans and strings are refused (SQLite would store NaN as NULL: a rating without a value)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise StoreError(f"value: must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise StoreError(f"value: must be a finite number, got {value!r}")
    return v


def _check_timestamp(timestamp: Any) -> int | None:
    """Integer epoch seconds >= 0 (numpy integers accepted); booleans, fractions and negatives are refused rather than
    truncated or stored as 1970."""
    if timestamp is None:
        return None
    if isinstance(timestamp, bool) or not isinstance(timestamp, numbers.Integral):
        raise StoreError(f"timestamp: must be integer epoch seconds, got {timestamp!r}")
    if int(timestamp) < 0:
        raise StoreError(f"timestamp: must be >= 0, got {timestamp!r}")
    return int(timestamp)


class EventStore:
    """Durable user-event history with per-user versions. Thread-safe; one instance per process."""

    def __init__(self, url: str, like_threshold: float = 3.0, echo: bool = False):
        self.url = url
        self.like_threshold = like_threshold
        self.is_sqlite = url.startswith("sqlite")
        kw: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            parsed = sa.engine.make_url(url)
            db = parsed.database
            if not db or db == ":memory:" or parsed.query.get("mode") == "memory":
                # SQLAlchemy gives each thread its own in-memory database (the service's reads and writes run in
                # worker threads: "no such table" on every request), and every event is gone at exit
                raise StoreError(f"store_url: {url!r} is an in-memory SQLite database, neither shared between threads "
                                 "nor durable; give a file (sqlite:////path/events.db) or a server URL")
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = sa.create_engine(url, **kw)
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        # SQLite allows one writer; serialising writes here avoids "database is locked" retries under load
        self._write_lock = threading.Lock() if self.is_sqlite else None
        metadata.create_all(self.engine)

    # ---------------------------------------------------------------------------------------------------- setup
    @classmethod
    def from_dataset(cls, ds: Any, url: str | None = None, like_threshold: float = 3.0) -> EventStore:
        """Open (creating if needed) the store for prepared dataset `ds` and bulk-load all its interactions once
        (train + valid + test: the store is the production history)."""
        store = cls(url or default_url(ds.name), like_threshold=like_threshold)
        loaded = store.get_meta("dataset")
        if loaded is None:
            try:
                store.load_interactions(ds.interactions, dataset=ds.name)
            except IntegrityError:
                # another process (a replica started at the same time) loaded it first: its transaction committed,
                # ours rolled back whole (no duplicate rows); use what it loaded
                loaded = store.get_meta("dataset")
                if loaded is None:
                    raise
                log.info("event store %s: initialised concurrently by another process", store.url)
            except OperationalError as e:
                # SQLite: another process holds the write lock longer than the busy timeout, i.e. it is bulk-loading
                # a large dataset (ML-1M: a million rows); wait for its commit instead of failing start-up
                if not (store.is_sqlite and "locked" in str(e).lower()):
                    raise
                loaded = store._wait_for_meta("dataset", INIT_WAIT_S)
        if loaded is not None and loaded != ds.name:
            raise StoreError(f"{store.url}: store was initialised from dataset {loaded!r}, not {ds.name!r}")
        return store

    def load_interactions(self, df: Any, dataset: str, chunk: int = 50_000) -> int:
        """Bulk insert a prepared interactions frame (user_id, item_id, timestamp, rating, label), one transaction."""
        t0 = time.perf_counter()
        now = time.time()
        users = df["user_id"].astype(str).to_numpy()
        items = df["item_id"].astype(str).to_numpy()
        ts = df["timestamp"].astype("int64").to_numpy()
        ratings = df["rating"].to_numpy() if "rating" in df else None
        labels = df["label"].to_numpy() if "label" in df else None
        with self._lock(), self.engine.begin() as conn:
            for start in range(0, len(df), chunk):
                rows = []
                for i in range(start, min(start + chunk, len(df))):
                    r = None if ratings is None or ratings[i] != ratings[i] else float(ratings[i])
                    rows.append({
                        "user_id": users[i], "item_id": items[i], "type": "rating" if r is not None else "view",
                        "value": r, "liked": None if labels is None else bool(labels[i]), "timestamp": int(ts[i]),
                        "idempotency_key": None, "request_hash": None, "created_at": now,
                    })
                conn.execute(events_t.insert(), rows)
            counts = df.groupby("user_id", sort=False).size()
            conn.execute(versions_t.insert(), [{"user_id": str(u), "version": int(c)} for u, c in counts.items()])
            conn.execute(meta_t.insert(), [{"key": "dataset", "value": dataset},
                                           {"key": "loaded_rows", "value": str(len(df))}])
        log.info("event store %s: loaded %d interactions of %s in %.1fs", self.url, len(df), dataset,
                 time.perf_counter() - t0)
        return len(df)

    def _wait_for_meta(self, key: str, timeout_s: float) -> str:
        """Poll the meta row `key` until another process's load commits it; StoreError after `timeout_s`."""
        log.info("event store %s: another process is loading it; waiting (at most %.0f s)", self.url, timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = self.get_meta(key)
            except OperationalError:
                value = None
            if value is not None:
                log.info("event store %s: initialised by another process", self.url)
                return value
            if time.monotonic() > deadline:
                raise StoreError(f"{self.url}: another process has held the write lock for over {timeout_s:.0f} s "
                                 "without finishing the store's first load; is a stuck process holding it?")
            time.sleep(0.5)

    def _lock(self) -> Any:
        return self._write_lock if self._write_lock is not None else _NullLock()

    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(meta_t.c.value).where(meta_t.c.key == key)).scalar_one_or_none()

    # ---------------------------------------------------------------------------------------------------- reads
    def version(self, user_id: str) -> int | None:
        """History version of a user (changes with every new event); None for an unknown user."""
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(versions_t.c.version).where(versions_t.c.user_id == str(user_id))
            ).scalar_one_or_none()

    def has_user(self, user_id: str) -> bool:
        return self.version(user_id) is not None

    @staticmethod
    def _history_query(user_id: str, limit: int | None, before: tuple[int, int] | None = None) -> Any:
        """The user's events, most recent first (ties: the later insert), at most `limit`; with `before` = (timestamp,
        id) of an event, only the events that come before it in that order (keyset paging on the (user_id, timestamp,
        id) index: a page stays in place when newer events arrive)."""
        q = sa.select(events_t).where(events_t.c.user_id == str(user_id))
        if before is not None:
            ts, eid = (int(x) for x in before)
            q = q.where(sa.or_(events_t.c.timestamp < ts, sa.and_(events_t.c.timestamp == ts, events_t.c.id < eid)))
        q = q.order_by(events_t.c.timestamp.desc(), events_t.c.id.desc())
        return q if limit is None else q.limit(int(limit))

    def history(self, user_id: str, limit: int | None = None, *, before: tuple[int, int] | None = None) -> list[Event]:
        """The user's most recent `limit` events (all if None), oldest first; with `before` = (timestamp, id), the most
        recent ones older than that event (the store's order: timestamp, then insertion)."""
        q = self._history_query(user_id, limit, before)
        with self.engine.connect() as conn:
            rows = conn.execute(q).fetchall()
        return [_row_to_event(r) for r in reversed(rows)]

    def history_with_version(
        self, user_id: str, limit: int | None = None, *, before: tuple[int, int] | None = None
    ) -> tuple[list[Event], int | None]:
        """History (as `history`) and version, consistent with each other. Each statement reads its own snapshot
        (pysqlite runs SELECTs outside a transaction, Postgres' READ COMMITTED snapshots per statement), so the version
        is read again after the history and the read is retried when a concurrent event changed it in between
        (versions only grow, so an unchanged version means no event of this user was committed between the reads)."""
        q = self._history_query(user_id, limit, before)
        vq = sa.select(versions_t.c.version).where(versions_t.c.user_id == str(user_id))
        rows: list[Any] = []
        with self.engine.connect() as conn:
            for _ in range(_CONSISTENT_READ_TRIES):
                ver = conn.execute(vq).scalar_one_or_none()
                if ver is None:
                    return [], None
                rows = conn.execute(q).fetchall()
                if conn.execute(vq).scalar_one_or_none() == ver:
                    break
                conn.rollback()  # end the read transaction (a fresh snapshot where the database kept one)
        # after the last try the history may hold events newer than `ver` (never older): a cache keyed by `ver`
        # is then recomputed at the next version, never served stale
        return [_row_to_event(r) for r in reversed(rows)], ver

    def get_by_key(self, idempotency_key: str) -> Event | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(events_t).where(events_t.c.idempotency_key == idempotency_key)).fetchone()
        return None if r is None else _row_to_event(r)

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(events_t)).scalar_one())

    def events_with_keys(self) -> list[Event]:
        """Every event that carries an idempotency key (the kill test compares them with the acknowledged ones)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(events_t).where(events_t.c.idempotency_key.is_not(None)).order_by(events_t.c.id)
            ).fetchall()
        return [_row_to_event(r) for r in rows]

    # ---------------------------------------------------------------------------------------------------- writes
    def add_event(
        self,
        user_id: str,
        item_id: str,
        type: str,
        value: float | None = None,
        timestamp: int | None = None,
        idempotency_key: str | None = None,
        liked: bool | None = None,
    ) -> tuple[Event, bool]:
        """Append one event and bump the user's version in a single committed transaction.

        Returns (event, created). With an `idempotency_key` that was already used for the same event, the stored event
        is returned with created=False; for a different event, `IdempotencyConflict` is raised."""
        ev, created, _ = self.add_event_versioned(user_id, item_id, type, value, timestamp, idempotency_key, liked)
        return ev, created

    def add_event_versioned(
        self,
        user_id: str,
        item_id: str,
        type: str,
        value: float | None = None,
        timestamp: int | None = None,
        idempotency_key: str | None = None,
        liked: bool | None = None,
    ) -> tuple[Event, bool, int]:
        """`add_event`, and the user's history version this event produced, read inside its own transaction (so a
        concurrent event of the same user is never counted in it; each created event gets its own version). A
        replayed event (created=False) returns the user's current version, which includes it."""
        if type not in EVENT_TYPES:
            raise StoreError(f"type: {type!r} is not one of {list(EVENT_TYPES)}")
        if not user_id or not item_id:
            raise StoreError(f"{'user_id' if not user_id else 'item_id'}: must not be empty")
        if type == "rating" and value is None:
            raise StoreError("value: a rating event needs a value")
        value = _check_value(value)
        timestamp = _check_timestamp(timestamp)
        ts = int(time.time()) if timestamp is None else timestamp
        if liked is None:
            liked = derive_liked(type, value, self.like_threshold)
        req_hash = hashlib.sha256(
            json.dumps([str(user_id), str(item_id), type, value, timestamp], sort_keys=True).encode()
        ).hexdigest()
        if idempotency_key is not None:
            prev = self._replay(idempotency_key, req_hash)
            if prev is not None:
                return prev, False, self.version(user_id) or 0
        row = {
            "user_id": str(user_id), "item_id": str(item_id), "type": type, "value": value, "liked": liked,
            "timestamp": ts, "idempotency_key": idempotency_key, "request_hash": req_hash, "created_at": time.time(),
        }
        for attempt in range(_WRITE_TRIES):
            try:
                with self._lock(), self.engine.begin() as conn:
                    new_id = conn.execute(events_t.insert().values(**row)).inserted_primary_key[0]
                    upd = conn.execute(
                        versions_t.update().where(versions_t.c.user_id == str(user_id))
                        .values(version=versions_t.c.version + 1)
                    )
                    if upd.rowcount == 0:
                        conn.execute(versions_t.insert().values(user_id=str(user_id), version=1))
                    # the version row is this transaction's until it commits (SQLite's write lock; elsewhere the
                    # update's row lock), so this is the version the event produced
                    version = int(conn.execute(
                        sa.select(versions_t.c.version).where(versions_t.c.user_id == str(user_id))
                    ).scalar_one())
                break
            except IntegrityError:
                if idempotency_key is not None:
                    prev = self._replay(idempotency_key, req_hash)  # a concurrent request with this key won the race
                    if prev is not None:
                        return prev, False, self.version(user_id) or 0
                if attempt == _WRITE_TRIES - 1:
                    raise
                # a concurrent first event of this user created its version row (databases without the SQLite write
                # lock, e.g. Postgres): the transaction rolled back whole; retried, the update path applies
                log.debug("add_event: version row created concurrently, retrying (attempt %d)", attempt + 1)
        ev = Event(user_id=str(user_id), item_id=str(item_id), type=type, timestamp=ts, value=value, liked=liked,
                   id=int(new_id), idempotency_key=idempotency_key)
        return ev, True, version

    def _replay(self, key: str, req_hash: str) -> Event | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(events_t).where(events_t.c.idempotency_key == key)).fetchone()
        if r is None:
            return None
        if r.request_hash != req_hash:
            raise IdempotencyConflict(f"idempotency_key: {key!r} was already used for a different event")
        return _row_to_event(r)

    def close(self) -> None:
        self.engine.dispose()


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None
