"""Event store audit: values and timestamps are checked (not truncated, not stored as NULL), a retry hashes the same
whatever the number's type, and two processes initialising one store at once do not crash the second."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec.store import EventStore, StoreError


@pytest.fixture()
def store(tiny_dataset, tmp_path):
    s = EventStore.from_dataset(tiny_dataset, url=f"sqlite:///{tmp_path / 'audit.db'}")
    yield s
    s.close()


@pytest.mark.parametrize("kw,field", [
    ({"value": float("nan")}, "value"), ({"value": float("inf")}, "value"), ({"value": True}, "value"),
    ({"value": "4"}, "value"),
    ({"value": 4.0, "timestamp": True}, "timestamp"), ({"value": 4.0, "timestamp": 1.7}, "timestamp"),
    ({"value": 4.0, "timestamp": -5}, "timestamp"), ({"value": 4.0, "timestamp": "123"}, "timestamp"),
])
def test_bad_value_or_timestamp_is_refused_and_changes_nothing(store, kw, field):
    """NaN was stored as NULL (a rating without a value, while the returned event said nan), 1.7 was truncated to 1,
    True stored as 1970-01-01T00:00:01."""
    before, count = store.version("u1"), store.count()
    with pytest.raises(StoreError, match=f"^{field}:"):
        store.add_event("u1", "i1", "rating", **kw)
    assert store.version("u1") == before and store.count() == count


def test_numpy_timestamp_and_int_value_are_accepted_and_a_retry_of_either_form_replays(store):
    """A numpy integer timestamp raised TypeError (not JSON serializable) from the request hash; a retry sending the
    value 4.0 for an event stored with 4 got IdempotencyConflict."""
    ev, created = store.add_event("u1", "i2", "rating", value=4, timestamp=np.int64(10), idempotency_key="k-np")
    assert created and ev.value == 4.0 and ev.timestamp == 10 and isinstance(ev.timestamp, int)
    again, created2 = store.add_event("u1", "i2", "rating", value=4.0, timestamp=10, idempotency_key="k-np")
    assert not created2 and again.id == ev.id
    stored = [e for e in store.history("u1") if e.idempotency_key == "k-np"]
    assert len(stored) == 1 and stored[0].value == 4.0


def test_two_processes_initialising_one_store_at_once(tiny_dataset, tmp_path, monkeypatch):
    """Replicas started together on a fresh database: both see no `dataset` meta row and both load; the second's
    transaction fails on the unique rows and rolls back. It used to crash start-up with IntegrityError; now it uses
    the store the first one loaded, with no row twice."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    first = EventStore.from_dataset(tiny_dataset, url=url)
    n = first.count()
    real = EventStore.get_meta
    calls: list[str] = []

    def stale_first_read(self, key):  # the second process read the meta row before the first one committed
        calls.append(key)
        return None if len(calls) == 1 else real(self, key)

    monkeypatch.setattr(EventStore, "get_meta", stale_first_read)
    second = EventStore.from_dataset(tiny_dataset, url=url)
    assert second.count() == n and first.version("u1") == second.version("u1") == 14
    second.close()
    first.close()


def test_a_replica_waits_for_another_process_bulk_loading_the_store(tiny_dataset, tmp_path, monkeypatch):
    """A second replica started while the first is still bulk-loading a large dataset waited the busy timeout (10 s)
    for the write lock and then crashed start-up with 'database is locked'; it now waits for the first load's commit
    and uses that store."""
    import sqlite3
    import threading
    import time

    import llmrec.store.sql as sql

    monkeypatch.setattr(sql, "SQLITE_BUSY_TIMEOUT_MS", 50)
    db = tmp_path / "slow.db"
    url = f"sqlite:///{db}"
    first = EventStore(url)  # the tables exist; the first load is under way in another process (below)
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")

    def finish_load():
        time.sleep(0.6)
        first_df = tiny_dataset.interactions
        holder.execute("ROLLBACK")
        first.load_interactions(first_df, dataset=tiny_dataset.name)

    t = threading.Thread(target=finish_load)
    t.start()
    t0 = time.monotonic()
    second = EventStore.from_dataset(tiny_dataset, url=url)
    t.join()
    assert time.monotonic() - t0 >= 0.5
    assert second.get_meta("dataset") == tiny_dataset.name and second.count() == len(tiny_dataset.interactions)
    second.close()
    first.close()
    holder.close()


def test_a_store_never_loaded_gives_up_with_a_clear_error(tiny_dataset, tmp_path, monkeypatch):
    import sqlite3

    import llmrec.store.sql as sql

    monkeypatch.setattr(sql, "SQLITE_BUSY_TIMEOUT_MS", 50)
    monkeypatch.setattr(sql, "INIT_WAIT_S", 0.3)
    db = tmp_path / "stuck.db"
    EventStore(f"sqlite:///{db}").close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="write lock"):
        EventStore.from_dataset(tiny_dataset, url=f"sqlite:///{db}")
    holder.execute("ROLLBACK")
    holder.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///file:ev?mode=memory&uri=true"])
def test_an_in_memory_sqlite_store_is_refused(url):
    """`store_url: sqlite://` was accepted: SQLAlchemy gives each thread its own in-memory database, so the tables
    made at start existed only in the starting thread (every request, run in a worker thread, failed with 'no such
    table': a 500), and every acknowledged event would be lost at exit."""
    with pytest.raises(StoreError, match="^store_url: .*in-memory"):
        EventStore(url)
