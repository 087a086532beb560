"""Micro-batching of ``POST /score``: requests that arrive together are scored in one forward pass.

The HTTP event loop reads a request's body and hands it to :meth:`ScoringBatcher.submit`; one scoring thread
takes every request waiting, parses and validates each (a bad one gets its own 4xx, the others go on), scores
all their impressions in one forward pass of one model (``holder.current`` read once per batch), and answers
each request separately with its own slice of the probabilities. The event loop writes the answers: no write
happens in the scoring thread, so a client that does not read its answer delays nobody.

Why one thread: under the GIL, threads scoring side by side pass the GIL back and forth at every torch op and
wait up to the 5 ms switch interval to get it back; one scorer that takes whatever has queued up meanwhile
does the same work in fewer, larger forward passes. The wait for companions is bounded by ``window_s``
(counted from the first request's arrival) and happens only while other requests are still being read
(:meth:`arriving`): a lone request is scored at once. The queue is bounded (``max_queued``): beyond it a
request is refused with 503 before its body is read.

>>> from consumers.serving.follower import ModelHolder
>>> batcher = ScoringBatcher(ModelHolder(), max_items=10)
>>> status, body, headers, items = batcher.submit(b"[]").result(timeout=5)
>>> status, headers
(503, {'Retry-After': '1'})
>>> batcher.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson
import torch

from consumers.runtime.httpd import RateLimitFilter
from consumers.serving.follower import ModelHolder, ServedModel
from consumers.serving.scoring import RequestError, check_numeric_features, parse_score_request

log = logging.getLogger("crossdistil.serving.requests")
log.addFilter(RateLimitFilter())  # a request that breaks scoring may come again and again

# (status, JSON body, extra headers, impressions scored)
Answer = tuple[int, bytes, dict[str, str], int]


class Busy(Exception):
    """The scoring queue is full: answer 503 with Retry-After."""


@dataclass
class _Job:
    body: bytes
    # concurrent.futures.Future (submit) or asyncio.Future of ``loop`` (submit_async)
    future: concurrent.futures.Future | asyncio.Future = field(default_factory=concurrent.futures.Future)
    loop: asyncio.AbstractEventLoop | None = None
    arrived: float = field(default_factory=time.monotonic)

    def start(self) -> bool:
        """False if the request was cancelled (its client went away): it is not scored."""
        if self.loop is None:
            return self.future.set_running_or_notify_cancel()  # type: ignore[union-attr]
        return not self.future.cancelled()  # read from the scoring thread: at worst one wasted score


def _resolve(pairs: list[tuple[asyncio.Future, Answer]]) -> None:
    """In the event loop: the answers of one batch, set together (one wake-up of the loop per batch)."""
    for future, answer in pairs:
        if not future.done():
            future.set_result(answer)


def _deliver(batch: list[_Job], answers: list[Answer]) -> None:
    """Each job's answer to its future: asyncio futures with ONE call_soon_threadsafe per loop and batch (one
    wake-up write and one GIL hand-over, not one per request), concurrent futures directly."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Answer]]] = {}
    for job, answer in zip(batch, answers):
        if job.loop is None:
            if not job.future.done():
                job.future.set_result(answer)  # type: ignore[arg-type]
        else:
            by_loop.setdefault(job.loop, []).append((job.future, answer))  # type: ignore[arg-type]
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, pairs)
        except RuntimeError:  # the loop is closed: the server stopped, nobody waits for these answers
            pass


def _error(exc: RequestError) -> Answer:
    headers = {"Retry-After": "1"} if exc.status == 503 else {}
    return exc.status, orjson.dumps(exc.body(), option=orjson.OPT_APPEND_NEWLINE), headers, 0


class ScoringBatcher:
    """One scoring thread over a bounded queue of request bodies; see the module docstring."""

    def __init__(self, holder: ModelHolder, *, max_items: int, window_s: float = 0.002,
                 max_batch_bytes: int = 1 << 20, max_queued: int = 64,
                 waiting_for: str = "the serving topic") -> None:
        self.holder = holder
        self.max_items = max_items
        self.window_s = window_s
        self.max_batch_bytes = max_batch_bytes
        self.max_queued = max_queued
        self.waiting_for = waiting_for
        self.batches = 0  # forward passes made (tests and benchmarks read these two)
        self.batched_requests = 0
        self._jobs: deque[_Job] = deque()
        self._arriving = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="serving-scorer", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for the scoring thread."""
        return len(self._jobs)

    @property
    def full(self) -> bool:
        """True when a new request would be refused (checked before reading its body)."""
        return len(self._jobs) + self._arriving >= self.max_queued

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around reading a request's body: the scorer waits (within the window) for requests being read."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify()

    def submit(self, body: bytes) -> concurrent.futures.Future:
        """Queue a /score body; the future's result is an :data:`Answer`. Raises :class:`Busy` when full."""
        return self._queue(_Job(body)).future  # type: ignore[return-value]

    def submit_async(self, body: bytes) -> asyncio.Future:
        """:meth:`submit` from a coroutine: an asyncio future of the running loop, resolved for a whole batch at
        once (see :func:`_deliver`). Raises :class:`Busy` when full."""
        loop = asyncio.get_running_loop()
        return self._queue(_Job(body, loop.create_future(), loop)).future  # type: ignore[return-value]

    def _queue(self, job: _Job) -> _Job:
        with self._cond:
            if self._closed or len(self._jobs) >= self.max_queued:
                raise Busy(f"{len(self._jobs)} requests are waiting to be scored")
            self._jobs.append(job)
            self._cond.notify()
        return job

    def close(self) -> None:
        """Stop the scoring thread; requests still queued are answered 503."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        left = [job for job in self._jobs if job.start()]
        _deliver(left, [_error(RequestError(503, "shutting_down", "the server is stopping"))] * len(left))

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                answers = self._score(batch)
            except Exception as exc:  # never lose the thread: a bug answers 500 to this batch
                log.error("scoring a batch failed: %r", exc, exc_info=exc)
                answers = [_error(RequestError(500, "internal", f"scoring failed: {exc!r}"))] * len(batch)
            _deliver(batch, answers)

    def _next_batch(self) -> list[_Job] | None:
        """Every queued request, waiting up to the window for those still being read; None once closed."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch: list[_Job] = []
            size = 0
            deadline = self._jobs[0].arrived + self.window_s
            while size < self.max_batch_bytes:
                if self._jobs:
                    job = self._jobs.popleft()
                    if job.start():  # False: its client went away
                        batch.append(job)
                        size += len(job.body)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._arriving == 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _score(self, batch: list[_Job]) -> list[Answer]:
        served = self.holder.current  # one model for the whole batch, whatever swaps meanwhile
        answers: list[Answer | None] = [None] * len(batch)
        accepted: list[tuple[int, list[dict]]] = []
        for i, job in enumerate(batch):
            try:
                if served is None:
                    raise RequestError(503, "no_model", f"no model loaded yet (waiting for a checkpoint on "
                                       f"{self.waiting_for}); retry later")
                impressions = parse_score_request(job.body, self.max_items)
                check_numeric_features(impressions, served.model.config.features.numeric)
                accepted.append((i, impressions))
            except RequestError as exc:
                answers[i] = _error(exc)
        if accepted:
            assert served is not None
            for i, answer in zip([i for i, _ in accepted], _answers(served, [imps for _, imps in accepted])):
                answers[i] = answer
            self.batches += 1
            self.batched_requests += len(accepted)
        return answers  # type: ignore[return-value]


def _answers(served: ServedModel, requests: list[list[dict]]) -> list[Answer]:
    """Score every impression of ``requests`` in one forward pass; one answer per request, in order."""
    rows = requests[0] if len(requests) == 1 else [row for impressions in requests for row in impressions]
    with torch.inference_mode():
        probabilities = served.model.score_rows(rows)
    columns = {task: probabilities[task].tolist() for task in served.tasks}
    answers: list[Answer] = []
    start = 0
    for impressions in requests:
        end = start + len(impressions)
        body = orjson.dumps({
            "model_version": served.version,
            "step": served.step,
            "tasks": list(served.tasks),
            "impression_ids": [event["impression_id"] for event in impressions],
            "probabilities": {task: values[start:end] for task, values in columns.items()},
        }, option=orjson.OPT_APPEND_NEWLINE)
        answers.append((200, body, {}, len(impressions)))
        start = end
    return answers
