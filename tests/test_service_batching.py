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
    for i, out in results.items():
        expect = RecordingBackend().score_choices(["x" * i, "y" * (i + 100)], [" Yes", " No"])
        np.testing.assert_allclose(out, expect)
    assert sum(inner.calls) == 16 and max(inner.calls) > 2  # at least one call merged several requests
    assert mb.generate(["ab"], max_new_tokens=4) == ["AB"]
    assert mb.name == "rec"
    mb.close()


def test_errors_reach_every_caller():
    class Broken(RecordingBackend):
        def score_choices(self, prompts, choices):
            raise ConnectionError("down")

    mb = MicroBatchingBackend(Broken(), max_wait_ms=1)
    with pytest.raises(ConnectionError):
        mb.score_choices(["a"], [" Yes", " No"])
    mb.close()
