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
