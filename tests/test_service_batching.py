"""Service-side micro-batching: rows go back to the right caller; concurrent calls are merged."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llmrec.service.batching import MicroBatchingBackend


class RecordingBackend:
    name = "rec"
    tokenizer = None

    def __init__(self):
        self.calls: list[int] = []

    def score_choices(self, prompts, choices):
        self.calls.append(len(prompts))
        time.sleep(0.05)
        n = len(choices) if isinstance(choices[0], str) else len(choices[0])
        # row i encodes its prompt: logits = [len(prompt), 0, ...] -> distinguishable per caller
        logits = np.zeros((len(prompts), n))
        logits[:, 0] = [float(len(p)) for p in prompts]
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, stop=None):
        self.calls.append(len(prompts))
        return [p.upper() for p in prompts]


def test_concurrent_calls_are_merged_and_rows_returned_in_order():
    inner = RecordingBackend()
    mb = MicroBatchingBackend(inner, max_batch=64, max_wait_ms=100)
    results: dict[int, np.ndarray] = {}

    def call(i):
        results[i] = mb.score_choices(["x" * i, "y" * (i + 100)], [" Yes", " No"])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 9))  # every caller got an answer (a thread that raised leaves no entry)
    for i, out in results.items():
        expect = RecordingBackend().score_choices(["x" * i, "y" * (i + 100)], [" Yes", " No"])
        np.testing.assert_allclose(out, expect)
    assert sum(inner.calls) == 16 and max(inner.calls) > 2  # at least one call merged several requests
    assert mb.generate(["ab"], max_new_tokens=4) == ["AB"]
    assert mb.name == "rec"
    mb.close()


def test_explanations_and_constrained_titles_are_batched_with_their_own_rows():
    """generate_quoted / generate_from calls from concurrent requests are merged into one backend call; each prompt
    keeps its own quotable titles / options and each caller gets its own rows back. LockedBackend forwards them
    under its lock."""
    from llmrec.service.batching import LockedBackend

    class Constrained(RecordingBackend):
        def generate_quoted(self, prompts, quotable, max_new_tokens=64, stop=None, frequency_penalty=0.0,
                            lead_quote=False):
            self.calls.append(("quoted", len(prompts), max_new_tokens))
            time.sleep(0.05)
            return [f"{p}:{'|'.join(q)}" for p, q in zip(prompts, quotable)]

        def generate_from(self, prompts, options, n, sep="\n"):
            self.calls.append(("from", len(prompts), n))
            return [list(range(len(o)))[::-1][:n] for o in options]

    inner = Constrained()
    mb = MicroBatchingBackend(inner, max_batch=64, max_wait_ms=150)
    got: dict[int, list] = {}

    def call(i):
        got[i] = mb.generate_quoted([f"p{i}", f"q{i}"], [[f"t{i}"], [f"a{i}", f"b{i}"]], max_new_tokens=8)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {i: [f"p{i}:t{i}", f"q{i}:a{i}|b{i}"] for i in range(6)}
    quoted = [c for c in inner.calls if c[0] == "quoted"]
    assert sum(c[1] for c in quoted) == 12 and max(c[1] for c in quoted) > 2 and {c[2] for c in quoted} == {8}
    assert mb.generate_from(["x", "y"], [["a", "b", "c"], ["d"]], n=2) == [[2, 1], [0]]
    with pytest.raises(ValueError, match="2 quotable lists for 1 prompts"):
        mb.generate_quoted(["x"], [["a"], ["b"]])
    mb.close()
    locked = LockedBackend(Constrained())
    assert locked.generate_quoted(["x"], [["a"]]) == ["x:a"] and locked.generate_from(["x"], [["a", "b"]], 1) == [[1]]


def test_title_likelihood_calls_are_merged_and_each_caller_gets_its_rows():
    from llmrec.service.batching import LockedBackend

    class Continuing(RecordingBackend):
        def score_continuations(self, prompts, continuations):
            self.calls.append(("cont", len(prompts)))
            time.sleep(0.05)
            sums = np.array([[len(p) * 100.0 + len(c) for c in cs] for p, cs in zip(prompts, continuations)])
            return sums, np.ones_like(sums) * 2

    inner = Continuing()
    mb = MicroBatchingBackend(inner, max_batch=64, max_wait_ms=150)
    got: dict[int, tuple] = {}

    def call(i):
        got[i] = mb.score_continuations(["x" * i, "y" * (i + 10)], [["a", "bb"], ["ccc", "d" * i]])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 7))  # every caller got an answer (a thread that raised leaves no entry)
    for i, (sums, counts) in got.items():
        np.testing.assert_array_equal(sums, [[i * 100 + 1, i * 100 + 2], [(i + 10) * 100 + 3, (i + 10) * 100 + i]])
        np.testing.assert_array_equal(counts, np.full((2, 2), 2.0))
    calls = [c for c in inner.calls if c[0] == "cont"]
    assert sum(c[1] for c in calls) == 12 and max(c[1] for c in calls) > 2  # merged across callers
    with pytest.raises(ValueError, match="2 lists for 1 prompts"):
        mb.score_continuations(["x"], [["a"], ["b"]])
    n_calls = len(inner.calls)
    with pytest.raises(ValueError, match="same .non-zero. number"):  # refused before it joins a shared batch
        mb.score_continuations(["x", "y"], [["a"], ["b", "c"]])
    assert len(inner.calls) == n_calls
    mb.close()
    sums, counts = LockedBackend(Continuing()).score_continuations(["ab"], [["c"]])
    assert sums.tolist() == [[201.0]] and counts.tolist() == [[2.0]]


def test_errors_reach_every_caller():
    class Broken(RecordingBackend):
        def score_choices(self, prompts, choices):
            self.calls.append(len(prompts))
            raise ConnectionError("down")

    inner = Broken()
    mb = MicroBatchingBackend(inner, max_batch=64, max_wait_ms=200)
    errors: dict[int, Exception] = {}

    def call(i):
        try:
            mb.score_choices([f"p{i}"], [" Yes", " No"])
        except Exception as e:  # noqa: BLE001
            errors[i] = e

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(4)]  # a caller left waiting
    for t in threads:  # fails the test instead of hanging it
        t.start()
    for t in threads:
        t.join(timeout=10)
    mb.close()
    assert sorted(errors) == [0, 1, 2, 3] and all(isinstance(e, ConnectionError) for e in errors.values()), errors
    assert sum(inner.calls) == 4 and max(inner.calls) > 1  # one failed batch answered several callers


def test_a_callers_malformed_choices_fail_that_caller_not_the_shared_batch():
    """score_choices checks each caller's lists before they join a batch (as score_continuations does): a concurrent
    well-formed call still gets its rows."""
    from llmrec.llm.base import normalize_choices

    class Strict(RecordingBackend):
        def score_choices(self, prompts, choices):
            per = normalize_choices(prompts, choices)  # as the real backends check
            self.calls.append(len(prompts))
            return np.zeros((len(prompts), len(per[0])))

    inner = Strict()
    mb = MicroBatchingBackend(inner, max_batch=64, max_wait_ms=300)
    got: dict[str, object] = {}

    def good():
        try:
            got["good"] = mb.score_choices(["a", "b"], [" Yes", " No"]).shape
        except Exception as e:  # noqa: BLE001
            got["good"] = e

    t = threading.Thread(target=good)
    t.start()
    time.sleep(0.02)  # the good call is queued first; the bad one would join its batch
    for bad in ([["A", "B"], ["A"]], [["A", "B"]]):  # ragged; one list for two prompts
        with pytest.raises(ValueError, match="choices"):
            mb.score_choices(["x", "y"], bad)
    t.join()
    mb.close()
    assert got["good"] == (2, 2) and inner.calls == [2]


def test_a_callers_choices_sharing_a_first_token_fail_that_caller_only():
    """The backends refuse choices whose first tokens collide; through the batcher that check runs per caller, so a
    concurrent well-formed call still gets its rows."""
    from llmrec.llm.base import BackendError

    class Tokens(RecordingBackend):
        def first_token_id(self, choice):
            return hash(choice.split()[0][:3])  # " Yes" and " Yesterday" collide, as on a small vocabulary

    inner = Tokens()
    mb = MicroBatchingBackend(inner, max_batch=64, max_wait_ms=300)
    got: dict[str, object] = {}
    t = threading.Thread(target=lambda: got.update(good=mb.score_choices(["a", "b"], [" Yes", " No"]).shape))
    t.start()
    time.sleep(0.02)
    with pytest.raises(BackendError, match="' Yes' and ' Yesterday' start with the same token"):
        mb.score_choices(["x"], [" Yes", " No", " Yesterday"])
    t.join()
    mb.close()
    assert got["good"] == (2, 2) and inner.calls == [2]


def test_calls_after_close_and_malformed_backend_answers_fail_instead_of_hanging():
    """A call after close() is refused at once, and a backend answer the batcher cannot split (here None) fails its
    callers while the worker keeps serving the next batch."""

    class Flaky(RecordingBackend):
        def __init__(self):
            super().__init__()
            self.bad = True

        def generate(self, prompts, max_new_tokens=64, temperature=0.0, stop=None):
            if self.bad:
                self.bad = False
                return None
            return super().generate(prompts, max_new_tokens, temperature, stop)

    from concurrent.futures import ThreadPoolExecutor

    mb = MicroBatchingBackend(Flaky(), max_batch=8, max_wait_ms=1)
    pool = ThreadPoolExecutor(1)  # each call bounded by a timeout: a hang fails the test instead of stalling it
    try:
        with pytest.raises(TypeError):
            pool.submit(mb.generate, ["a"]).result(timeout=10)
        assert pool.submit(mb.generate, ["b"]).result(timeout=10) == ["B"]  # the worker survived
        mb.close()
        mb._worker.join(timeout=5)
        with pytest.raises(RuntimeError, match="micro-batcher closed"):
            pool.submit(mb.generate, ["c"]).result(timeout=10)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_calls_set_aside_for_another_kind_are_merged_in_one_later_round():
    """Calls of kind B that arrive while a kind-A batch is gathering are set aside; the next round takes all of them
    together (they used to be answered one round each, so N set-aside calls cost N backend calls)."""
    inner = RecordingBackend()
    gate = threading.Event()
    first_call = threading.Event()
    seen: list[tuple[str, int]] = []
    real_score = inner.score_choices

    def score_choices(prompts, choices):
        seen.append(("score", len(prompts)))
        first_call.set()
        gate.wait(10)  # hold the worker so the calls below queue up behind this batch
        return real_score(prompts, choices)

    def generate(prompts, max_new_tokens=64, temperature=0.0, stop=None):
        seen.append(("gen", len(prompts)))
        return [p.upper() for p in prompts]

    inner.score_choices, inner.generate = score_choices, generate
    mb = MicroBatchingBackend(inner, max_batch=64, max_wait_ms=100)
    out: dict[str, object] = {}
    threads = [threading.Thread(target=lambda: out.__setitem__("a", mb.score_choices(["a"], [" Yes", " No"])))]
    threads[0].start()
    assert first_call.wait(10)
    # queued while the worker is busy: one score call, then three generate calls, which the next round (gathering
    # score calls behind "b") sets aside
    threads.append(threading.Thread(target=lambda: out.__setitem__("b", mb.score_choices(["b"], [" Yes", " No"]))))
    threads[-1].start()
    time.sleep(0.2)
    for i in range(3):
        t = threading.Thread(target=lambda i=i: out.__setitem__(f"g{i}", mb.generate([f"p{i}"], max_new_tokens=4)))
        threads.append(t)
        t.start()
        time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(10)
    assert out["g0"] == ["P0"] and out["g1"] == ["P1"] and out["g2"] == ["P2"]
    assert np.asarray(out["b"]).shape == (1, 2)
    gens = [n for kind, n in seen if kind == "gen"]
    assert gens == [3], f"the three set-aside generate calls took {len(gens)} backend calls: {seen}"
    mb.close()
