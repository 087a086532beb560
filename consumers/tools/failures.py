"""A backtest's configurations fail alone: what one does on its own (its build, its step, its metrics and series,
its learner process's answers) is guarded, and a failure drops that configuration there while the others go on
(``Failures``); ``failure_of`` describes it for summary.json's ``failed`` and ``describe_failure`` in a line.
``FiniteLoss`` makes a training loss that is NaN or infinite such a failure (``NonFiniteLoss``). The replay
itself is ``consumers.tools.backtest``'s; docs/backtest.md, "A configuration that fails".
"""

from __future__ import annotations

import contextlib
import math
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from consumers.core.pipeline import sample_column

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigRun(Protocol):
    """What a failure reads and changes of a backtest's configuration (``consumers.tools.backtest.ConfigRun``)."""

    name: str
    pipeline: Any  # None: it could not be built
    batch_sizes: list[int]
    event_ts_ms: list[int]
    failure: dict[str, Any] | None
    failure_traceback: str | None

    def drop(self) -> None: ...


class NonFiniteLoss(ArithmeticError):
    """A configuration's training loss is NaN or infinite (its weights or gradients are): a backtest drops it there
    rather than score the rest of the replay with predictions that are no longer numbers."""


class FiniteLoss:
    """The learner port of each configuration of a backtest: ``port``'s (in this process, a learner process, the
    intake's encoded batches), with every answer's total loss checked: one that is NaN or infinite raises
    ``NonFiniteLoss`` as the answer is collected, in the configuration's own ``Pipeline.train_batch``, so the
    replay drops that configuration there (``Failures``). A live trainer has no such check; a backtest's numbers
    from predictions that are no longer numbers would be meaningless (an AUC of NaN scores is whatever their sort
    order gives)."""

    def __init__(self, port: Any) -> None:
        self.port = port

    @property
    def steps(self) -> int:
        return self.port.steps

    @property
    def in_flight(self) -> int:
        return self.port.in_flight

    def submit(self, samples: list, context: Any) -> None:
        self.port.submit(samples, context)

    def answers(self, wait: bool = False) -> Iterator[tuple[Any, Any]]:
        for context, answer in self.port.answers(wait):
            total = answer.losses.get("total")
            if total is not None and not math.isfinite(total):
                raise NonFiniteLoss(f"the training loss is {total} at step {answer.steps:,}: the model's weights or "
                                    "gradients are no longer finite (a learning rate too high, or inputs too large?)")
            yield context, answer

    def check_alive(self) -> None:
        self.port.check_alive()

    def close(self) -> None:
        self.port.close()


class Dropped:
    """The learner port of a configuration that failed: nothing trains any more; ``steps`` as it was."""

    in_flight = 0

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def submit(self, samples: list, context: Any) -> None:
        raise RuntimeError("a configuration that failed trains nothing more")

    def answers(self, wait: bool = False) -> Iterator[tuple[Any, Any]]:
        return iter(())

    def check_alive(self) -> None:
        pass

    def close(self) -> None:
        pass


class Failures:
    """The configurations of a replay and which of them failed. ``guard(run_)`` wraps what one configuration does
    on its own (its training step, metrics and series; its learner process's answers): an ``Exception`` raised there
    drops that configuration (``ConfigRun.failure``, its learner stopped, ``on_failure(name, failure)`` called) and
    is not raised further, so the replay goes on for the others. ``all_failed``: none is left to train."""

    def __init__(self, on_failure: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.runs: list[ConfigRun] = []
        self.on_failure = on_failure

    @property
    def all_failed(self) -> bool:
        return bool(self.runs) and all(run_.failure is not None for run_ in self.runs)

    @contextlib.contextmanager
    def guard(self, run_: ConfigRun, samples: Sequence[Any] | None = None, batch: int | None = None) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - any failure of one configuration's own work is that configuration's
            self.drop(run_, exc, samples, batch)

    def drop(self, run_: ConfigRun, exc: BaseException, samples: Sequence[Any] | None = None,
             batch: int | None = None) -> None:
        """``run_`` failed with ``exc`` (on the batch ``samples``, the group's ``batch``-th, if known)."""
        if run_.failure is not None:
            return
        run_.failure = failure_of(run_, exc, samples, batch)
        run_.failure_traceback = "".join(traceback.format_exception(exc))
        run_.drop()
        if self.on_failure is not None:
            self.on_failure(run_.name, run_.failure)


FAILURE_REASONS = ("non_finite_loss", "out_of_memory", "learner_process", "error", "build")


def failure_reason(exc: BaseException) -> str:
    """What kind of failure ``exc`` is, one of ``FAILURE_REASONS`` but ``build`` (which says when, not what): a loss
    that is not finite (``NonFiniteLoss``), memory (``MemoryError``, torch's out-of-memory errors, on a GPU or a CPU,
    in this process or a learner process), a learner process that failed or died, or any other error.

    >>> failure_reason(NonFiniteLoss("nan")), failure_reason(MemoryError()), failure_reason(ValueError("x"))
    ('non_finite_loss', 'out_of_memory', 'error')
    >>> failure_reason(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    'out_of_memory'
    """
    text = str(exc).lower()
    if isinstance(exc, NonFiniteLoss):
        return "non_finite_loss"
    if (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text
            or "can't allocate memory" in text or "cannot allocate memory" in text):
        return "out_of_memory"
    if type(exc).__name__ == "LearnerProcessError":  # consumers.runtime.learner_process (imports torch)
        return "learner_process"
    return "error"


def failure_of(run_: ConfigRun, exc: BaseException, samples: Sequence[Any] | None = None,
               batch: int | None = None) -> dict[str, Any]:
    """What summary.json's ``failed`` says of a configuration that raised ``exc``: ``reason`` (``failure_reason``),
    ``error`` (the exception's type), ``detail`` (its message: a learner process's traceback shortened to its first
    and last lines), ``where`` (the innermost line of this project's code it came from), ``batch`` (the group's
    batch, 1-based, being trained when it was noticed; None after the last one), ``event_time_ms`` and
    ``impression_id`` (that batch's newest event time and first impression; without a batch, the last trained
    impression's time), ``steps`` and ``trained_samples`` (the steps whose predictions the replay recorded before it,
    and their samples: those of a learner process may trail ``batch`` by the batches it had not answered).

    A configuration that could not be built (``run_.pipeline`` None) has reason ``build`` and ``cause``, what
    ``failure_reason`` says of ``exc`` (``out_of_memory``, ``learner_process``, ``error``); nothing trained."""
    times = sample_column(samples, "ts_ms") if samples else []
    ids = sample_column(samples, "impression_id") if samples else []
    built = run_.pipeline is not None
    return {"reason": failure_reason(exc) if built else "build", "error": type(exc).__name__,
            "detail": short_message(str(exc)), "where": raised_at(exc), "batch": batch,
            "event_time_ms": max(times) if times else (run_.event_ts_ms[-1] if run_.event_ts_ms else None),
            "impression_id": ids[0] if ids else None, "steps": len(run_.batch_sizes),
            "trained_samples": run_.pipeline.trained_samples if built else 0,
            **({} if built else {"cause": failure_reason(exc)})}


def describe_failure(failure: dict[str, Any]) -> str:
    """A failure (``failure_of``) in one line: where in the replay, after how much, and what.

    >>> said = describe_failure({"reason": "error", "error": "ValueError", "detail": "boom", "where": "m.py:3 in f",
    ...     "batch": 12, "event_time_ms": 0, "impression_id": "i9", "steps": 11, "trained_samples": 1408})
    >>> said[:66]
    "at batch 12 (event time 1970-01-01 00:00:00 UTC, impression 'i9') "
    >>> said[66:]
    'after 11 steps (1,408 samples): error: ValueError: boom (m.py:3 in f)'
    >>> describe_failure({"reason": "build", "cause": "out_of_memory", "error": "MemoryError", "detail": "no room",
    ...     "where": None, "batch": None, "event_time_ms": None, "impression_id": None, "steps": 0,
    ...     "trained_samples": 0})
    'when it was built, before the replay: build (out_of_memory): MemoryError: no room'
    """
    raised = f" ({failure['where']})" if failure.get("where") else ""
    if failure["reason"] == "build":
        return (f"when it was built, before the replay: build ({failure.get('cause', 'error')}): {failure['error']}: "
                f"{failure['detail']}{raised}")
    where = [f"batch {failure['batch']}" if failure.get("batch") is not None else "the end of the replay"]
    details = []
    if failure.get("event_time_ms") is not None:
        at = datetime.fromtimestamp(failure["event_time_ms"] / 1000, tz=timezone.utc)
        details.append(f"event time {at:%Y-%m-%d %H:%M:%S} UTC")
    if failure.get("impression_id") is not None:
        details.append(f"impression {failure['impression_id']!r}")
    at = where[0] + (f" ({', '.join(details)})" if details else "")
    steps = f"{failure['steps']:,} step{'' if failure['steps'] == 1 else 's'}"
    return (f"at {at} after {steps} ({failure['trained_samples']:,} samples): "
            f"{failure['reason']}: {failure['error']}: {failure['detail']}{raised}")


def short_message(text: str, limit: int = 1000) -> str:
    """An error message on one line: a multi-line one (a learner process's traceback) as its first and last lines."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or [""]
    short = lines[0]
    if len(lines) > 1:
        short += f" {lines[-1]}" if lines[0].endswith(":") else f" ... {lines[-1]}"
    return short if len(short) <= limit else short[:limit - 3] + "..."


def raised_at(exc: BaseException) -> str | None:
    """``path:line in function`` of the innermost frame of this project's code in ``exc``'s traceback (paths from
    the repository's root), or None."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename)
        if path.is_relative_to(REPO_ROOT) and ".venv" not in path.parts and "site-packages" not in path.parts:
            found = f"{path.relative_to(REPO_ROOT)}:{frame.lineno} in {frame.name}"
    return found
