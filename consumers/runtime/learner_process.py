"""The learner in a process of its own (``model.separate_process = true``): training overlaps with intake.

The trainer's loop is Python from the Kafka poll to the optimizer step, so one process uses one core, and
while it trains it does not poll, decode or join (``docs/performance.md``). With a separate learner process
the trainer (Kafka, decoding, the join, the mini-batcher, metrics, checkpoints' orchestration) hands each
full batch to a child that encodes it and runs ``Learner.step``, and goes on ingesting while the child
trains; the child's answers (labels, the prequential predictions and the step's losses, trust-gate report
included) come back in order and feed the metrics, the ledger and freshness exactly as an in-process step does.

Both ways of holding the learner are ``consumers.core.pipeline.LearnerPort``s with the same checkpoint verbs
(``load_checkpoint``, ``write_checkpoint``): :class:`LocalLearner` (in this process) and :class:`RemoteLearner`
(the child). The trainer and the backtest never ask which one they have; :func:`learner_port` picks it from
``model.separate_process``.

Nothing about the results changes: the child builds the same seeded learner and sees the same batches in the
same order, so a replay gives bit-identical predictions either way
(``tests/unit/consumers/runtime/test_learner_process.py``).

Exactly once: batches are answered in the order they were sent. A checkpoint first waits for every answer
(``RemoteLearner.drain``), so the model the child then writes holds exactly the batches the trainer counted,
and the join, batcher and positions it hands over describe the same cut. The child writes the checkpoint
file itself (the model's tensors never cross the pipe) and returns the publication messages, which the
trainer produces.

Protocol: two pipes carrying length-framed msgpack maps (``multiprocessing.connection.Connection`` byte
frames; nothing is pickled). Requests ``{"op": ...}``: ``step`` (rows), ``step_columns`` (a batch encoded
already, ``models.features.encode_columns``' arrays as bytes with their shapes: a dense replay's intake
process encodes each batch once for every configuration, ``consumers.tools.backtest``), ``load`` (a checkpoint path),
``warm_start`` (a checkpoint path: a new model from its weights, ``warm_start_learner``), ``checkpoint`` (directory,
metadata, publication parameters), ``stop``. Every request gets one reply, in order;
a failure is a reply ``{"op": "error", "error": traceback}`` that the trainer raises as ``LearnerProcessError``,
with two exceptions. An ``OSError`` of a checkpoint's write (a full disk, a file size limit, a folder made read-only)
or read is ``{"op": "os_error", ...}`` (``os_error_reply``), raised in the trainer as the same ``OSError`` (class,
errno, message and file names; the child's traceback as a note), as a learner in process raises it; and a checkpoint
that does not load (``load``, ``warm_start``: damaged, another model) is ``{"op": "value_error", ...}``, raised as
the ``ValueError`` it is in process. A trainer that cannot read or load its checkpoint says so in one line and
exits 2 either way (``consumers.trainer.checkpointing``), not 6. The failed write changed no
state of the learner, so the learner process goes on training, and the trainer handles the failure as it does in
process: logged, tried again later (``consumers.trainer.daemon``), exit 9 only for a last checkpoint.

The child ignores SIGINT and SIGTERM (the trainer decides when to stop and checkpoints first) and is killed by
the kernel when the trainer dies, even by SIGKILL (``PR_SET_PDEATHSIG``). Models never see Kafka here: the
child imports ``models``, torch, the pipeline's training call and the checkpoint and wire modules only.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from consumers.core.pipeline import Answer, InProcessLearner, sample_row, train_encoded, train_rows
from consumers.runtime.config import Config, config_from_dict
from consumers.runtime.processes import (
    ForkedProcess,
    can_fork,
    describe_exit,
    die_with_parent,
    fork_child,
    grow_pipe,
    tune_gc,
)
from consumers.state.checkpoints import CheckpointStore
from consumers.state.learner_state import (
    ModelDiverged,
    load_learner_checkpoint,
    warm_start_learner,
    write_learner_checkpoint,
)
from models.features import COLUMN_DTYPES, batch_from_columns, columns_from_bytes, columns_to_bytes
from models.zoo import learner_config, make_learner

log = logging.getLogger("crossdistil.learner")

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_IN_FLIGHT = 8  # batches sent and not yet answered: absorbs the bursts of batches a watermark advance releases


class LearnerProcessError(RuntimeError):
    """The learner process failed (its traceback is in the message) or died."""


def _pack(message: Mapping[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _unpack(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def stream_model_config(cfg: Config) -> Any:
    """The ``[model]`` section's learner configuration (``models.zoo.learner_config``), refused with the reason where
    a stream cannot feed it: a privileged teacher reads outcomes that no event carries yet."""
    config = learner_config(cfg.model.tasks, cfg.model.options, seed=cfg.model.seed)
    if getattr(config, "privileged", ()):
        raise ValueError(f"model.options.privileged = {list(config.privileged)}: a privileged teacher reads outcomes "
                         "known only after the impression, which the event stream does not carry yet; it trains in "
                         "`crossdistil evaluate` from a data set's columns (models/privileged.py). Remove it here.")
    return config


def build_learner(cfg: Config) -> Any:
    """The learner of the ``[model]`` section (``models.zoo``): a rung of the ladder or a river peer; with
    ``model.cuda_graphs`` its full-size steps replay as CUDA graphs (``ValueError`` saying why where they cannot)."""
    learner = make_learner(stream_model_config(cfg), cfg.model.device)
    if cfg.model.cuda_graphs:
        if not hasattr(learner, "use_cuda_graphs"):
            raise ValueError(f"model.cuda_graphs: {type(learner).__name__} learns one event at a time on the CPU; "
                             "set it to false")
        try:
            learner.use_cuda_graphs(size=cfg.batching.batch_size)  # a live trainer's first batch may be partial
        except ValueError as exc:
            raise ValueError(f"model.cuda_graphs: {exc}; or set it to false") from None
    return learner


def learner_port(cfg: Config) -> LocalLearner | RemoteLearner:
    """Where the ``[model]`` section's learner trains: a learner process with ``model.separate_process``, else here."""
    if cfg.model.separate_process:
        return RemoteLearner(cfg)
    return LocalLearner(build_learner(cfg), cfg.model.tasks)


class LocalLearner(InProcessLearner):
    """The learner in this process, with the checkpoint verbs of :class:`RemoteLearner`."""

    @property
    def device(self) -> str:
        return str(getattr(self.learner, "device", "cpu"))

    def load_checkpoint(self, path: str) -> int:
        """Load the learner state of the checkpoint file at ``path``; its step count."""
        return load_learner_checkpoint(self.learner, path)

    def warm_start(self, path: str) -> dict[str, Any]:
        """Start the (new) learner from the model in the checkpoint file at ``path`` (``warm_start_learner``)."""
        return warm_start_learner(self.learner, path)

    def write_checkpoint(self, directory: str, keep_last: int, metadata: Mapping[str, Any],
                         publication: Mapping[str, Any] | None) -> dict[str, Any]:
        """``consumers.state.learner_state.write_learner_checkpoint`` on the learner."""
        return write_learner_checkpoint(self.learner, CheckpointStore(directory, keep_last=keep_last), metadata,
                                        publication)


def step_rows(learner: Any, rows: Sequence[Sequence[Any]], tasks: tuple[str, ...]) -> dict[str, Any]:
    """``consumers.core.pipeline.train_rows`` on ``rows``: the reply the trainer turns back into an ``Answer``."""
    answer = train_rows(learner, [{"user_id": r[0], "item_id": r[1], "features": r[2], "labels": r[3]} for r in rows],
                        tasks)
    return _stepped(answer)


def step_columns(learner: Any, request: Mapping[str, Any], tasks: tuple[str, ...]) -> dict[str, Any]:
    """One step on a batch sent as ``encode_columns``' arrays (``RemoteLearner.submit_columns``)."""
    started = time.perf_counter()
    columns = columns_from_bytes(request["columns"], request["shapes"])
    return _stepped(train_encoded(learner, batch_from_columns(columns, tasks), tasks, started))


def _stepped(answer: Answer) -> dict[str, Any]:
    """A step's ``Answer`` as the reply the trainer turns back into one (``_answer``)."""
    return {"op": "stepped", "n": len(answer.labels), "seconds": answer.seconds, "steps": answer.steps,
            "losses": dict(answer.losses), "labels": answer.labels.tobytes(), "scores": answer.scores.tobytes()}


def _answer(reply: Mapping[str, Any], width: int) -> Answer:
    n = int(reply["n"])
    return Answer(np.frombuffer(reply["labels"], dtype=np.int8).reshape(n, width),
                  np.frombuffer(reply["scores"], dtype=np.float32).reshape(n, width), float(reply["seconds"]),
                  reply.get("losses") or {}, int(reply["steps"]))


# ----------------------------------------------------------------------------------- the child process


def _child_main(fd_in: int, fd_out: int, trainer_pid: int, forked: bool = False) -> int:
    """The learner process: serve requests until ``stop`` or until the trainer's end of the pipe closes
    (``forked``: a copy of the trainer's process, ``processes.fork_child``, rather than a new interpreter)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the trainer stops us, after its last checkpoint
    die_with_parent(signal.SIGKILL)
    if os.getppid() != trainer_pid:  # the trainer died before the line above took effect
        return 1
    if forked:  # the trainer's handlers write to its stderr's file object: dropped, not closed (nothing to flush)
        logging.root.handlers.clear()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(levelname)s %(message)s")
    requests, replies = Connection(fd_in, writable=False), Connection(fd_out, readable=False)
    try:
        hello = _unpack(requests.recv_bytes())
    except EOFError:
        return 0
    try:
        tune_gc()
        if hello.get("torch_threads"):
            torch.set_num_threads(int(hello["torch_threads"]))
        cfg = config_from_dict(hello["config"])
        learner = build_learner(cfg)
        tasks = tuple(cfg.model.tasks)
        device = str(getattr(learner, "device", "cpu"))
    except Exception:
        replies.send_bytes(_pack({"op": "error", "error": traceback.format_exc()}))
        return 1
    replies.send_bytes(_pack({"op": "ready", "device": device, "pid": os.getpid()}))
    # A thread drains the request pipe as requests arrive: a batch is bigger than a pipe's buffer (64 KiB), and
    # without it the trainer's send would wait for the step before it to finish (no overlap at all). The
    # trainer bounds what is queued here (MAX_IN_FLIGHT batches).
    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def read_requests() -> None:
        while True:
            try:
                inbox.put(requests.recv_bytes())
            except (EOFError, OSError):  # the trainer is gone
                inbox.put(None)
                return

    threading.Thread(target=read_requests, name="requests", daemon=True).start()
    while True:
        data = inbox.get()
        if data is None:
            return 0
        request = _unpack(data)
        op = request.get("op")
        try:
            if op == "step":
                reply = step_rows(learner, request["rows"], tasks)
            elif op == "step_columns":
                reply = step_columns(learner, request, tasks)
            elif op in ("load", "warm_start"):
                reply = _load_reply(learner, op, request["path"])
            elif op == "checkpoint":
                reply = _write_checkpoint(learner, request)
            elif op == "stop":
                replies.send_bytes(_pack({"op": "stopped", "steps": int(learner.steps)}))
                return 0
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception:
            reply = {"op": "error", "error": traceback.format_exc()}
        replies.send_bytes(_pack(reply))


def _write_checkpoint(learner: Any, request: Mapping[str, Any]) -> dict[str, Any]:
    """A ``checkpoint`` request: ``{"op": "written", ...}``, or ``os_error_reply`` where the file system refuses the
    write (the store removes its temporary file; the learner is unchanged, so this process goes on), or
    ``{"op": "diverged", "message"}`` for a model that is no longer numbers (``ModelDiverged``: nothing written)."""
    try:
        store = CheckpointStore(request["directory"], keep_last=int(request["keep_last"]))
        return {"op": "written", **write_learner_checkpoint(learner, store, request["metadata"],
                                                            request.get("publication"))}
    except OSError as exc:
        return os_error_reply(exc)
    except ModelDiverged as exc:
        return {"op": "diverged", "message": str(exc)}


def _load_reply(learner: Any, op: str, path: str) -> dict[str, Any]:
    """The reply of a request that reads the checkpoint at ``path`` (``op``: ``load`` or ``warm_start``), or its
    failure as the trainer would meet it in process: an ``OSError`` (a file that cannot be read) as
    ``os_error_reply``, a ``ValueError`` (a damaged file, another model) as ``value_error_reply``; the trainer maps
    both to exit status 2 (``consumers.trainer.checkpointing``), not to a failed learner process's 6."""
    try:
        if op == "load":
            return {"op": "loaded", "steps": load_learner_checkpoint(learner, path)}
        return {"op": "warm_started", "report": warm_start_learner(learner, path)}
    except OSError as exc:
        return os_error_reply(exc)
    except ValueError as exc:
        return value_error_reply(exc)


def value_error_reply(exc: ValueError) -> dict[str, Any]:
    """``exc`` as a reply that the trainer raises again as a ``ValueError`` with the same message (the learner
    process's traceback as a note)."""
    return {"op": "value_error", "message": str(exc), "traceback": "".join(traceback.format_exception(exc))}


def os_error_reply(exc: OSError) -> dict[str, Any]:
    """``exc`` as a reply that ``os_error_from_reply`` raises again in the trainer: its class (a builtin one), errno,
    message, file names and traceback."""
    return {"op": "os_error", "type": type(exc).__name__, "errno": exc.errno, "strerror": exc.strerror,
            "filename": _plain_path(exc.filename), "filename2": _plain_path(exc.filename2), "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc))}


def os_error_from_reply(reply: Mapping[str, Any]) -> OSError:
    """The ``OSError`` of an ``os_error_reply``: the same builtin class (else ``OSError``, which picks the errno's
    subclass), errno, ``str`` and file names, with the learner process's traceback as a note."""
    kind = getattr(builtins, str(reply.get("type")), None)
    if not (isinstance(kind, type) and issubclass(kind, OSError)):
        kind = OSError
    if reply.get("errno") is not None and reply.get("strerror") is not None:
        exc = kind(reply["errno"], reply["strerror"], reply.get("filename"), None, reply.get("filename2"))
    else:
        exc = kind(reply.get("message", ""))
    if reply.get("traceback"):
        exc.add_note(f"raised in the learner process:\n{reply['traceback']}")
    return exc


def _plain_path(name: Any) -> Any:
    """A file name of an ``OSError`` as msgpack carries it (``os`` functions keep the object they were given)."""
    if name is None or isinstance(name, (str, bytes, int)):
        return name
    return os.fsdecode(name) if isinstance(name, os.PathLike) else str(name)


# ---------------------------------------------------------------------------------- the trainer's side


def forks_learners(torch_threads: int | None = None) -> bool:
    """Whether ``RemoteLearner(fork=True)`` forks here (its child using ``torch_threads``, by default this process's
    number): on Linux (``processes.can_fork``), with one torch thread here and in the child, since torch's intra-op
    thread pool does not survive a fork."""
    here = torch.get_num_threads()
    return can_fork() and here == 1 and (here if torch_threads is None else torch_threads) == 1


class RemoteLearner:
    """The trainer's handle on the learner process: batches go out, answers come back in order.

    ``submit(rows, context)`` sends one batch (waiting first while ``MAX_IN_FLIGHT`` are unanswered);
    ``answers(wait)`` returns ``(context, reply)`` for every batch answered so far (``wait=True``: for every
    batch sent); ``steps`` counts the ones handed back.

    ``queue_bytes`` (a replay's batches, all at hand): a thread of this process writes the requests, so a submit
    never waits on the pipe, and up to that many bytes of batches may be unanswered instead of ``MAX_IN_FLIGHT``
    batches: the caller goes on with its own work while the learner process starts (imports: seconds) or trails.

    ``fork`` (a replay's learner processes): on Linux, with one torch thread here and there, the child is a fork of
    this process (``processes.fork_child``), ready in milliseconds, instead of a new interpreter that imports torch
    (~3.5 CPU s); the same learner either way (built from ``cfg`` in the child). The live trainer starts a new
    interpreter: its process runs Kafka clients' threads, and a fork copies all it holds.
    """

    def __init__(self, cfg: Config, torch_threads: int | None = None, start_timeout_s: float = 300.0,
                 wait_ready: bool = True, queue_bytes: int | None = None, fork: bool = False) -> None:
        self.steps = 0
        self._width = len(cfg.model.learnt_tasks)  # the answers' columns: the tasks the model predicts
        self._in_flight: deque[Any] = deque()
        self._sizes: deque[int] = deque()  # bytes of each request in flight
        self._queue_bytes = queue_bytes
        self._queued = 0  # their sum
        self._outbox: queue.SimpleQueue[bytes | None] | None = None
        self._writer: threading.Thread | None = None
        self._write_error: OSError | None = None
        self._answered: deque[tuple[Any, dict[str, Any]]] = deque()
        parent_in, child_out = os.pipe()
        child_in, parent_out = os.pipe()
        for fd in (parent_out, child_out):
            grow_pipe(fd)
        if torch_threads is None:
            torch_threads = torch.get_num_threads()
        self.forked = fork and forks_learners(torch_threads)
        self.process: subprocess.Popen | ForkedProcess
        trainer = os.getpid()
        if self.forked:  # torch, the models and this configuration's modules are imported already
            self.process = fork_child(lambda: _child_main(child_in, child_out, trainer, forked=True),
                                      keep_fds=(child_in, child_out))
        else:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consumers.runtime.learner_process", str(child_in), str(child_out),
                 str(trainer)],
                pass_fds=(child_in, child_out), env=env)
        os.close(child_in)
        os.close(child_out)
        self._requests = Connection(parent_out, readable=False)
        self._replies = Connection(parent_in, writable=False)
        self._send({"op": "hello", "config": cfg.to_dict(), "torch_threads": torch_threads})
        if queue_bytes is not None:
            self._outbox = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._write_requests, name="learner-requests", daemon=True)
            self._writer.start()
        self.device: str | None = None
        self._start_timeout_s = start_timeout_s
        if wait_ready:  # else on the first reply (the caller works meanwhile: a replay starts training at once)
            self._wait_ready()

    def _wait_ready(self) -> None:
        if not self._replies.poll(self._start_timeout_s):
            self.close()
            raise LearnerProcessError(f"the learner process did not start within {self._start_timeout_s:.0f} s")
        ready = self._receive(ready=True)
        self.device = ready["device"]
        log.info("learner process %d ready on %s", self.process.pid, self.device)

    # requests

    def submit(self, samples: list[Any], context: Any) -> None:
        """Send one batch of joined samples to train; ``context`` comes back with its answer."""
        self.submit_rows([sample_row(s) for s in samples], context)

    def submit_rows(self, rows: list[list[Any]], context: Any) -> None:
        """Send one batch of ``sample_row`` rows to train; ``context`` comes back with its answer."""
        self._submit(_pack({"op": "step", "rows": rows}), context)

    def submit_columns(self, columns: Mapping[str, np.ndarray], context: Any) -> None:
        """Send one batch encoded already (``models.features.encode_columns``' arrays) to train."""
        self._submit(_pack({"op": "step_columns", "columns": columns_to_bytes(columns),
                            "shapes": [list(columns[name].shape) for name in COLUMN_DTYPES]}), context)

    def _submit(self, data: bytes, context: Any) -> None:
        if self._queue_bytes is None:
            while len(self._in_flight) >= MAX_IN_FLIGHT:
                self._take_answer()
        else:
            while self._in_flight and self._queued + len(data) > self._queue_bytes:
                self._take_answer()
        self._send_bytes(data)
        self._in_flight.append(context)
        self._sizes.append(len(data))
        self._queued += len(data)

    def answers(self, wait: bool = False) -> Iterator[tuple[Any, Answer]]:
        """``(context, Answer)`` of the batches answered so far, in order (``wait``: of every batch sent).

        ``steps`` counts the batches handed back, so while the caller handles one it is that batch's step, as
        with a learner in process.
        """
        while True:
            if self._answered:
                context, reply = self._answered.popleft()
            elif self._in_flight and (wait or self._replies.poll()):
                self._take_answer()
                continue
            else:
                return
            self.steps = int(reply["steps"])
            yield context, _answer(reply, self._width)

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet handed back by ``answers``."""
        return len(self._in_flight) + len(self._answered)

    def check_alive(self) -> None:
        """Raise ``LearnerProcessError`` if the learner process has exited (noticed between batches too)."""
        if self.process.poll() is not None:
            raise LearnerProcessError(f"the learner process died ({self._exit_description()})")

    def load_checkpoint(self, path: str) -> int:
        """Load the learner state of the checkpoint file at ``path`` in the child; its step count. A file that
        cannot be read is that ``OSError`` here, one that does not load (damaged, another model) a ``ValueError``,
        as with a learner in process (``_load_reply``)."""
        self._require_idle("load")
        self._send({"op": "load", "path": str(path)})
        self.steps = int(self._receive()["steps"])
        return self.steps

    def warm_start(self, path: str) -> dict[str, Any]:
        """Start the child's (new) learner from the model in the checkpoint file at ``path`` (``warm_start_learner``,
        in the child); its report. Failures as ``load_checkpoint``'s."""
        self._require_idle("warm start")
        self._send({"op": "warm_start", "path": str(path)})
        return self._receive()["report"]

    def write_checkpoint(self, directory: str, keep_last: int, metadata: Mapping[str, Any],
                         publication: Mapping[str, Any] | None) -> dict[str, Any]:
        """``write_learner_checkpoint`` in the child, once every batch sent is answered and handed back; an
        ``OSError`` of its write is raised here as that ``OSError`` (``os_error_from_reply``), the child still ready."""
        self._require_idle("checkpoint")
        self._send({"op": "checkpoint", "directory": str(directory), "keep_last": keep_last,
                    "metadata": metadata, "publication": publication})
        reply = self._receive()
        reply["messages"] = [(key, value) for key, value in reply["messages"]]
        return reply

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the child (after its answers) and reap it; kill it if it does not stop in time."""
        if self.process.poll() is None:
            deadline = time.monotonic() + timeout_s
            if self._outbox is not None:  # batches not written yet are not trained: "stop" goes next
                with contextlib.suppress(queue.Empty):
                    while True:
                        self._outbox.get_nowait()
            try:
                self._send({"op": "stop"})
                while time.monotonic() < deadline:  # answers nobody waits for any more, then "stopped"
                    if self._replies.poll(0.1) and _unpack(self._replies.recv_bytes()).get("op") == "stopped":
                        break
            except (OSError, EOFError, LearnerProcessError):
                pass  # gone already
            try:
                self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if self.process.poll() is None:
                log.warning("learner process %d did not stop within %.0f s: killing it", self.process.pid, timeout_s)
                self.process.kill()
            self.process.wait()
        if self._writer is not None:  # the child is gone: a write in progress fails, and the thread ends
            self._outbox.put(None)
            self._writer.join(timeout=10.0)
        for connection in (self._requests, self._replies):
            connection.close()

    # plumbing

    def _require_idle(self, what: str) -> None:
        if self._in_flight or self._answered:
            raise RuntimeError(f"{what} with {self.in_flight} batches not handed back: call answers(wait=True) first")

    def _take_answer(self) -> None:
        reply = self._receive()
        if reply.get("op") != "stepped":
            raise LearnerProcessError(f"unexpected reply {reply.get('op')!r} to a training step")
        self._answered.append((self._in_flight.popleft(), reply))
        self._queued -= self._sizes.popleft()

    def _send(self, message: Mapping[str, Any]) -> None:
        self._send_bytes(_pack(message))

    def _send_bytes(self, data: bytes) -> None:
        if self._outbox is not None:  # the writer thread sends it, in order
            if self._write_error is not None:
                raise LearnerProcessError(f"the learner process is gone ({self._exit_description()}): "
                                          f"{self._write_error}")
            self._outbox.put(data)
            return
        try:
            self._requests.send_bytes(data)
        except OSError as exc:
            raise LearnerProcessError(f"the learner process is gone ({self._exit_description()}): {exc}") from None

    def _write_requests(self) -> None:
        """The writer thread (``queue_bytes``): each request in turn, until ``None`` or a write fails."""
        while (data := self._outbox.get()) is not None:
            try:
                self._requests.send_bytes(data)
            except OSError as exc:  # the child is gone: its replies' end says so to the reader
                self._write_error = exc
                return

    def _receive(self, ready: bool = False) -> dict[str, Any]:
        if self.device is None and not ready:
            self._wait_ready()
        try:
            reply = _unpack(self._replies.recv_bytes())
        except (EOFError, OSError):
            raise LearnerProcessError(f"the learner process died ({self._exit_description()})") from None
        if reply.get("op") == "error":
            raise LearnerProcessError(f"the learner process failed:\n{reply.get('error')}")
        if reply.get("op") == "os_error":  # a checkpoint the file system refused: the trainer retries it
            raise os_error_from_reply(reply)
        if reply.get("op") == "diverged":  # a model that is no longer numbers: as in process
            raise ModelDiverged(reply.get("message", ""))
        if reply.get("op") == "value_error":  # a checkpoint that does not load: as in process
            exc = ValueError(reply.get("message", ""))
            exc.add_note(f"raised in the learner process:\n{reply.get('traceback', '')}")
            raise exc
        return reply

    def _exit_description(self) -> str:
        return describe_exit(self.process)


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
