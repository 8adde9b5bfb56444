"""Event store: bulk load, history order, versions, idempotency, durability settings."""

from __future__ import annotations

import threading

import pytest

from llmrec.store import EventStore, IdempotencyConflict, StoreError


@pytest.fixture()
def store(tiny_dataset, tmp_path):
    return EventStore.from_dataset(tiny_dataset, url=f"sqlite:///{tmp_path / 'ev.db'}")


def test_from_dataset_loads_all_interactions(store, tiny_dataset):
    assert store.count() == len(tiny_dataset.interactions)
    u = tiny_dataset.interactions["user_id"].iloc[0]
    hist = store.history(u)
    expected = tiny_dataset.history(u, before="all")
    assert [e.item_id for e in hist] == list(expected["item_id"])
    assert [e.liked for e in hist] == [bool(x) for x in expected["label"]]
    assert hist[0].type == "rating" and hist[0].rating == float(expected["rating"].iloc[0])
    assert store.version(u) == len(expected)
    assert store.get_meta("dataset") == "tiny"


def test_reopen_does_not_reload_and_rejects_other_dataset(store, tiny_dataset):
    again = EventStore.from_dataset(tiny_dataset, url=store.url)
    assert again.count() == len(tiny_dataset.interactions)

    class Other:
        name = "other"
        interactions = tiny_dataset.interactions

    with pytest.raises(StoreError, match="initialised from dataset 'tiny'"):
        EventStore.from_dataset(Other(), url=store.url)


def test_sqlite_durability_pragmas(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_add_event_bumps_version_and_history(store):
    v0 = store.version("u1")
    ev, created = store.add_event("u1", "i3", "rating", value=5, timestamp=9_999_999_999)
    assert created and ev.id is not None and ev.liked is True
    assert store.version("u1") == v0 + 1
    hist, ver = store.history_with_version("u1", limit=3)
    assert len(hist) == 3 and hist[-1].id == ev.id and ver == v0 + 1
    low, _ = store.add_event("u1", "i4", "rating", value=2, timestamp=9_999_999_999)
    assert low.liked is False


def test_new_user_created_by_event(store):
    assert store.version("newbie") is None and store.history("newbie") == []
    store.add_event("newbie", "i0", "click")
    assert store.version("newbie") == 1
    assert [e.item_id for e in store.history("newbie")] == ["i0"]


def test_idempotency_key_replay_and_conflict(store):
    a, created_a = store.add_event("u2", "i5", "purchase", timestamp=123, idempotency_key="k-1")
    b, created_b = store.add_event("u2", "i5", "purchase", timestamp=123, idempotency_key="k-1")
    assert created_a and not created_b and a.id == b.id
    assert len([e for e in store.history("u2") if e.idempotency_key == "k-1"]) == 1
    with pytest.raises(IdempotencyConflict, match="idempotency_key"):
        store.add_event("u2", "i6", "purchase", timestamp=123, idempotency_key="k-1")


def test_concurrent_same_key_stored_once(store):
    results = []

    def post():
        results.append(store.add_event("u3", "i7", "view", timestamp=5, idempotency_key="race"))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(created for _, created in results) == 1
    assert len({ev.id for ev, _ in results}) == 1
    assert len([e for e in store.events_with_keys() if e.idempotency_key == "race"]) == 1


def test_bad_event_fields(store):
    with pytest.raises(StoreError, match="type"):
        store.add_event("u1", "i1", "like")
    with pytest.raises(StoreError, match="value"):
        store.add_event("u1", "i1", "rating")
    with pytest.raises(StoreError, match="item_id"):
        store.add_event("u1", "", "view")
