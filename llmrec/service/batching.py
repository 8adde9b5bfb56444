"""Service-side micro-batching: concurrent requests' backend calls are grouped into one batched call.

`MicroBatchingBackend(backend)` has the backend interface (`score_choices`, `generate`, `generate_quoted` for
explanations, `generate_from` for constrained titles, `tokenizer`, `name`); calls
from many request threads wait up to `max_wait_ms` (or until `max_batch` prompts are queued), then one worker thread
runs a single batched call on the wrapped backend and hands each caller its rows. Calls are only grouped with calls
of the same kind and parameters (same number of choices; same generation settings). The alternative, used with vLLM,
is to let each request call the backend directly: vLLM's continuous batching merges concurrent HTTP requests itself.
`serve/bench_serving.py` measures both.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from llmrec.llm.base import check_first_tokens, normalize_choices

log = logging.getLogger(__name__)


MAX_WAIT_MS = 60_000.0  # longest a call may wait for others to join its batch (ServiceConfig.batch_max_wait_ms)
# errors a batch can get from one caller's input (a prompt or option list the backend refuses): such a batch is run
# again one caller at a time, so only that caller fails; any other error (backend down, timeout) reaches every caller
INPUT_ERRORS = (ValueError, TypeError, KeyError, IndexError)


class _Job:
    __slots__ = ("key", "prompts", "payload", "future")

    def __init__(self, key: tuple, prompts: list[str], payload: Any):
        self.key, self.prompts, self.payload, self.future = key, prompts, payload, Future()


class MicroBatchingBackend:
    def __init__(self, backend: Any, max_batch: int = 16, max_wait_ms: float = 10.0, metrics: Any | None = None):
        # checked here, not in the worker: an infinite or huge wait overflowed queue.get's timeout there, killed the
        # worker thread and left every later call waiting for ever
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"max_batch: must be an integer >= 1 (got {max_batch!r})")
        if not (math.isfinite(max_wait_ms) and 0 <= max_wait_ms <= MAX_WAIT_MS):
            raise ValueError(f"max_wait_ms: must be within 0..{MAX_WAIT_MS:g} (got {max_wait_ms!r})")
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._pending: list[_Job] = []
        self._stop = False
        self._closing = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="llmrec-microbatch", daemon=True)
        self._worker.start()

    def __getattr__(self, name: str) -> Any:  # tokenizer, name, model, ... of the wrapped backend
        return getattr(self.backend, name)

    # ------------------------------------------------------------------------------------------------ interface
    def score_choices(self, prompts: list[str], choices: list[list[str]] | list[str]) -> np.ndarray:
        """Grouped with other callers' calls of the same number of choices. Checked here (the backends' own check), so
        a caller's malformed lists fail that caller, not a shared batch."""
        if not prompts:
            return np.zeros((0, len(choices) if choices and isinstance(choices[0], str) else 0))
        per = normalize_choices(prompts, choices)
        if hasattr(self.backend, "first_token_id"):
            check_first_tokens(per, [[self.backend.first_token_id(c) for c in cs] for cs in per])
        job = _Job(("score", len(per[0])), list(prompts), per)
        return self._submit(job)

    def score_continuations(self, prompts: list[str], continuations: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Title likelihood: grouped with other callers' calls of the same number of continuations per prompt.
        Checked here (the backends' own check), so a caller's malformed lists fail that caller, not a shared batch."""
        per = normalize_choices(prompts, continuations)
        if not per:
            return np.zeros((0, 0)), np.zeros((0, 0))
        job = _Job(("cont", len(per[0])), list(prompts), per)
        return self._submit(job)

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None, **kw: Any) -> list[str]:
        key = ("gen", max_new_tokens, temperature, tuple(stop or ()), tuple(sorted(kw.items())))
        job = _Job(key, list(prompts), {"max_new_tokens": max_new_tokens, "temperature": temperature, "stop": stop,
                                        **kw})
        return self._submit(job)

    def generate_quoted(self, prompts: list[str], quotable: list[list[str]], max_new_tokens: int = 64,
                        stop: list[str] | None = None, frequency_penalty: float = 0.0,
                        lead_quote: bool = False) -> list[str]:
        """Explanations: grouped with other callers' `generate_quoted` calls of the same settings; each prompt keeps
        its own quotable titles."""
        if len(quotable) != len(prompts):
            raise ValueError(f"generate_quoted: {len(quotable)} quotable lists for {len(prompts)} prompts")
        job = _Job(("quoted", max_new_tokens, tuple(stop or ()), frequency_penalty, lead_quote), list(prompts),
                   {"rows": [list(q) for q in quotable], "max_new_tokens": max_new_tokens, "stop": stop,
                    "frequency_penalty": frequency_penalty, "lead_quote": lead_quote})
        return self._submit(job)

    def generate_from(self, prompts: list[str], options: list[list[str]], n: int, sep: str = "\n") -> list[list[int]]:
        """Constrained title generation: grouped with other callers' calls of the same `n` and `sep`."""
        if len(options) != len(prompts):
            raise ValueError(f"generate_from: {len(options)} option lists for {len(prompts)} prompts")
        job = _Job(("from", n, sep), list(prompts), {"rows": [list(o) for o in options], "n": n, "sep": sep})
        return self._submit(job)

    def _submit(self, job: _Job) -> Any:
        with self._closing:  # a job is queued before close()'s None (answered) or refused here, never left waiting
            if self._stop:
                raise RuntimeError("micro-batcher closed")
            self._q.put(job)
        return job.future.result()

    def close(self) -> None:
        with self._closing:
            self._stop = True
            self._q.put(None)

    # ------------------------------------------------------------------------------------------------ worker
    def _run(self) -> None:
        while not self._stop:
            first = self._pending.pop(0) if self._pending else self._q.get()
            if first is None:
                break
            batch, n = [first], len(first.prompts)
            # calls of this kind set aside during an earlier round (they came while another kind was gathering) join
            # this batch first, in arrival order: left in `_pending`, each would have waited for a round of its own
            keep: list[_Job] = []
            for job in self._pending:
                if job.key == first.key and n < self.max_batch:
                    batch.append(job)
                    n += len(job.prompts)
                else:
                    keep.append(job)
            self._pending = keep
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self._q.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:
                    self._stop = True
                    break
                if job.key != first.key:
                    self._pending.append(job)  # other kind: next round
                    continue
                batch.append(job)
                n += len(job.prompts)
            self._execute(batch)
        left = list(self._pending)  # calls queued before close() are answered, not left waiting
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                left.append(job)
        for job in left:
            job.future.set_exception(RuntimeError("micro-batcher closed"))

    def _execute(self, batch: list[_Job]) -> None:
        prompts = [p for j in batch for p in j.prompts]
        kind = batch[0].key[0]
        if self.metrics is not None:
            self.metrics.batch_size.labels(op=kind).observe(len(prompts))
        try:
            out = self._call(kind, batch, prompts)
        except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
            if len(batch) > 1 and isinstance(e, INPUT_ERRORS):
                # one caller's input may have failed the whole batch: each caller alone, so only that one fails
                log.warning("micro-batch of %d calls failed (%s: %s); running them one by one", len(batch),
                            type(e).__name__, str(e)[:200])
                for j in batch:
                    self._execute([j])
                return
            for j in batch:
                j.future.set_exception(e)
            return
        start = 0
        for j in batch:
            rows = slice(start, start + len(j.prompts))
            try:
                j.future.set_result(tuple(a[rows] for a in out) if kind == "cont" else out[rows])
            except Exception as e:  # noqa: BLE001 - a malformed backend answer fails its callers, not the worker
                j.future.set_exception(e)
            start += len(j.prompts)

    def _call(self, kind: str, batch: list[_Job], prompts: list[str]) -> Any:
        """One backend call for the whole batch; its answer is checked to hold one row per prompt (a short answer would
        hand the later callers the wrong rows, or none, without an error)."""
        if kind == "score":
            choices = [c for j in batch for c in j.payload]
            same = all(c == choices[0] for c in choices)
            out: Any = self.backend.score_choices(prompts, choices[0] if same else choices)
        elif kind == "cont":  # (sums, counts): each caller gets its rows of both arrays
            out = self.backend.score_continuations(prompts, [c for j in batch for c in j.payload])
        elif kind in ("quoted", "from"):  # per-prompt lists travel with their prompts; the settings are shared
            rows = [r for j in batch for r in j.payload["rows"]]
            kw = {k: v for k, v in batch[0].payload.items() if k != "rows"}
            fn = self.backend.generate_quoted if kind == "quoted" else self.backend.generate_from
            out = fn(prompts, rows, **kw)
        else:
            out = self.backend.generate(prompts, **batch[0].payload)
        parts = out if kind == "cont" and isinstance(out, tuple) else (out,)
        for part in parts:
            n = len(part) if hasattr(part, "__len__") else None
            if n is not None and n != len(prompts):
                raise RuntimeError(f"backend {kind} answered {n} rows for {len(prompts)} prompts")
        return out


class LockedBackend:
    """Serialises calls to an in-process backend that is not safe to call from several threads at once (the
    transformers backend: one model, one fast tokenizer). Used when service micro-batching is off."""

    def __init__(self, backend: Any):
        self.backend = backend
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def score_choices(self, prompts: list[str], choices: list[list[str]] | list[str]) -> np.ndarray:
        with self._lock:
            return self.backend.score_choices(prompts, choices)

    def score_continuations(self, prompts: list[str], continuations: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self.backend.score_continuations(prompts, continuations)

    def generate(self, prompts: list[str], *args: Any, **kw: Any) -> list[str]:
        with self._lock:
            return self.backend.generate(prompts, *args, **kw)

    def generate_quoted(self, prompts: list[str], *args: Any, **kw: Any) -> list[str]:
        with self._lock:
            return self.backend.generate_quoted(prompts, *args, **kw)

    def generate_from(self, prompts: list[str], *args: Any, **kw: Any) -> list[list[int]]:
        with self._lock:
            return self.backend.generate_from(prompts, *args, **kw)
