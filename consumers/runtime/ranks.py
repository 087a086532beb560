"""Several trainer ranks, one model: the process group, each rank's share of the partitions, and the learner port
that keeps the replicas one model.

``torchrun --nproc-per-node N -m consumers.cli train ...`` (or ``crossdistil train --world-size N``, which hands
over to it) starts N ranks; torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``, and :func:`rank_from_env` reads them. One rank (no torchrun, or ``WORLD_SIZE=1``) is today's
trainer, unchanged.

* :class:`Ranks`: the process group (gloo on CPU, NCCL for a CUDA model; ``distributed.timeout_s`` bounds every
  collective, so a rank that lost the others exits with a clear error, status 8, instead of hanging) and the few
  collectives the trainer needs: ``agree`` (an elementwise max over small integer vectors: the ranks meet once per
  poll and decide together whether to step, checkpoint, stop or finish), ``broadcast_bytes`` and
  ``gather_bytes`` (msgpack bytes, never pickle).
* :func:`owned_partitions`: static ownership, partition p belongs to rank p mod N, on both topics (co-partitioned
  by user, so the join stays local to a rank).
* :class:`RankedLearner`: the pipeline's ``LearnerPort`` for a rank. ``sync``: batches wait in a queue until the
  ranks step together (:meth:`RankedLearner.step_together`: as many steps as the rank with the most batches, a
  rank without one contributes zero weight); ``average``: every rank steps at once, alone, and
  :meth:`RankedLearner.average` makes the replicas one model again. See ``models.distributed`` for the math.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch
import torch.distributed as dist

from consumers.core.pipeline import Answer, train_rows, training_rows
from consumers.runtime.config import DistributedSection
from consumers.runtime.learner_process import LocalLearner
from consumers.state.checkpoints import LockHeld, take_lock
from models.distributed import Collective

log = logging.getLogger("crossdistil.ranks")


class RankError(RuntimeError):
    """A collective failed: another rank died, or could not be reached within ``distributed.timeout_s``."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the group torchrun started."""

    rank: int
    world_size: int
    local_rank: int = 0

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world_size}"


def rank_from_env(env: Mapping[str, str] | None = None) -> RankInfo | None:
    """This process's rank from torchrun's variables; None for one rank (no torchrun, or ``WORLD_SIZE`` 1).

    >>> rank_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    RankInfo(rank=1, world_size=2, local_rank=1)
    >>> rank_from_env({}) is None, rank_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    (True, True)
    """
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (torchrun sets them): {exc}") from exc
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return RankInfo(rank, world, local)


def owned_partitions(count: int, rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` of ``world_size`` owns on each topic: p with p mod world_size == rank.

    >>> owned_partitions(4, 1, 2), owned_partitions(5, 0, 2)
    ([1, 3], [0, 2, 4])
    """
    return [p for p in range(count) if p % world_size == rank]


def attempt_store(timeout: datetime.timedelta, env: Mapping[str, str] | None = None) -> dist.Store | None:
    """The rendezvous store of this attempt of the group: torchrun's own store (``MASTER_ADDR:MASTER_PORT``), its
    keys prefixed by the restart count; None outside torchrun (``init_process_group``'s env:// rendezvous then).

    Without the prefix, a group restarted by torchrun reads the previous attempt's addresses from the store it
    keeps across restarts whenever a rank looks before its peer has overwritten them: seen here as gloo's
    "connectFullMesh ... Connection refused" on every restart after the second kill, until --max-restarts ran out.
    """
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    run = env.get("TORCHELASTIC_RUN_ID", "run")
    return dist.PrefixStore(f"crossdistil/{run}/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class Ranks:
    """The trainer's process group and its collectives (see the module docstring)."""

    def __init__(self, info: RankInfo, section: DistributedSection, device: str = "cpu") -> None:
        self.info = info
        self.section = section
        backend = section.backend
        if backend == "auto":
            backend = "nccl" if str(device).startswith("cuda") else "gloo"
        self.backend = backend
        self.device = torch.device(device if backend == "nccl" else "cpu")
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=section.timeout_s)
            dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=timeout,
                                    store=attempt_store(timeout))

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def guard(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()``, a collective with the other ranks; its failure raised as ``RankError`` saying ``what`` failed."""
        try:
            return call()
        except (RuntimeError, dist.DistBackendError) as exc:
            raise RankError(f"{self.info.label}: {what} with the other ranks failed ({exc}); another rank died or "
                            f"could not be reached within distributed.timeout_s = {self.section.timeout_s:g} s"
                            ) from exc

    def agree(self, values: Sequence[int]) -> list[int]:
        """The elementwise maximum of ``values`` over every rank (every rank must call it, with as many values)."""
        tensor = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        self.guard("agreeing", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MAX))
        return [int(v) for v in tensor.cpu().tolist()]

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """``data`` of rank ``src`` on every rank (the others pass None)."""
        size = torch.tensor([len(data) if self.rank == src and data is not None else 0], dtype=torch.int64,
                            device=self.device)
        self.guard("broadcasting", lambda: dist.broadcast(size, src=src))
        if self.rank == src:
            buffer = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8) if size.item() else \
                torch.zeros(0, dtype=torch.uint8)
            buffer = buffer.to(self.device)
        else:
            buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if int(size.item()):
            self.guard("broadcasting", lambda: dist.broadcast(buffer, src=src))
        return bytes(buffer.cpu().numpy().tobytes())

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank."""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        self.guard("gathering", lambda: dist.all_gather(sizes, size))
        longest = max(int(s.item()) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        mine = mine.to(self.device)
        gathered = [torch.zeros(longest, dtype=torch.uint8, device=self.device) for _ in range(self.world_size)]
        self.guard("gathering", lambda: dist.all_gather(gathered, mine))
        return [bytes(g.cpu().numpy()[: int(s.item())].tobytes()) for g, s in zip(gathered, sizes)]

    def gather_plain(self, value: Any) -> list[Any]:
        """Every rank's plain ``value`` (msgpack-able), in rank order."""
        packed = self.gather_bytes(msgpack.packb(value, use_bin_type=True))
        return [msgpack.unpackb(p, raw=False, strict_map_key=False) for p in packed]

    def close(self, together: bool = False) -> None:
        """Leave the process group: :func:`leave_group`."""
        leave_group(together)


def leave_group(together: bool = False) -> None:
    """Leave this process's group, if it has one (a failed group is left as it is: the process is about to exit).
    Every exit path of a rank calls it, an error's too: a group left alive keeps gloo's threads running into the
    interpreter's exit.

    ``together``: every rank is leaving on its normal path, so first wait for all of them (a barrier, bounded
    by ``distributed.timeout_s``), so that none tears its connections down while another is still finishing
    the last collective. Not on an error path, where the others may never come.

    Destroying the group stops gloo's threads only if nothing else holds the group: one that outlived this call
    kept them into the interpreter's exit, where the rank could abort (SIGABRT, "terminate called without an
    active exception"); ``models.distributed`` imports the module that held it before any group exists."""
    if not dist.is_initialized():
        return
    if together:
        try:
            dist.barrier()
        except Exception as exc:  # a rank already gone: leave anyway
            log.warning("waiting for the other ranks before leaving: %s", exc)
    try:
        dist.destroy_process_group()
    except Exception as exc:  # a broken group: nothing to tidy up
        log.debug("destroying the process group: %s", exc)


class RankedLearner(LocalLearner):
    """The ``LearnerPort`` of one rank (module docstring): a local learner whose steps are taken with the other
    ranks (``sync``) or averaged with them (``average``)."""

    def __init__(self, learner: Any, tasks: Sequence[str], ranks: Ranks, mode: str) -> None:
        super().__init__(learner, tasks)
        self.ranks = ranks
        self.mode = mode
        if not hasattr(learner, "step_empty"):
            raise ValueError("several ranks train the deep model only (models.learner.Learner); the river and VW peers "
                             "learn in one process")
        self.collective = Collective(mode)
        learner.collective = self.collective
        self._queue: deque[tuple[Any, list[dict[str, Any]]]] = deque()
        self.steps_since_average = 0

    @property
    def in_flight(self) -> int:
        return len(self._queue) + len(self._answered)

    def submit(self, samples: list, context: Any) -> None:
        rows = training_rows(samples)
        if self.mode == "sync":
            self._queue.append((context, rows))
            return
        self._answered.append((context, self._step(rows)))
        self.steps_since_average += 1

    def answers(self, wait: bool = False) -> Iterator[tuple[Any, Answer]]:
        """Answers so far; ``wait=True`` (a checkpoint, the end of a stream: every rank calls it at the same point)
        first steps the queued batches together with the other ranks."""
        if wait:
            self.step_together()
        yield from super().answers(wait)

    def step_together(self, top_up: Callable[[], None] | None = None) -> int:
        """sync: as many steps as the rank with the most queued batches has, every rank at once; returns the steps
        taken. Every rank must call it at the same point.

        ``top_up`` (``Pipeline.cut_partial``): called when this rank has fewer batches than the steps to take, so
        its partial batch joins them; a rank with nothing at all contributes zero weight."""
        if self.mode != "sync":
            return 0
        steps = self.ranks.agree([len(self._queue)])[0]
        if top_up is not None and len(self._queue) < steps:
            top_up()
        for _ in range(steps):
            if self._queue:
                context, rows = self._queue.popleft()
                self._answered.append((context, self._step(rows)))
            else:
                self.ranks.guard("a training step", self.learner.step_empty)
        return steps

    def average(self) -> None:
        """average: the replicas become their mean (every rank calls it at the same point)."""
        self.ranks.guard("averaging the model", lambda: self.collective.average(self.learner.model))
        self.steps_since_average = 0

    def broadcast_model(self) -> None:
        """Rank 0's parameters and buffers on every rank (after a fresh start; a restore loads one file everywhere)."""
        self.ranks.guard("broadcasting the model", lambda: self.collective.broadcast(self.learner.model))

    def _step(self, rows: list[dict[str, Any]]) -> Answer:
        if self.mode == "average":
            return train_rows(self.learner, rows, self.tasks)  # no collective inside
        return self.ranks.guard("a training step", lambda: train_rows(self.learner, rows, self.tasks))


# Where ``crossdistil train --world-size N`` asks its ranks to write their exit status (a folder of this attempt):
# torch's agent, stopping the ranks after a SIGTERM of the command, keeps no exit code of theirs.
STATUS_DIR_ENV = "CROSSDISTIL_RANK_STATUS_DIR"


def record_exit_status(rank: int, status: int, env: Mapping[str, str] | None = None) -> None:
    """Write rank ``rank``'s exit status into the folder ``CROSSDISTIL_RANK_STATUS_DIR`` names, if it names one
    (:func:`recorded_exit_statuses` reads it); a folder that cannot be written is logged, never fatal."""
    folder = (os.environ if env is None else env).get(STATUS_DIR_ENV)
    if not folder:
        return
    try:
        Path(folder, f"rank-{rank}").write_text(f"{status}\n")
    except OSError as exc:
        log.warning("rank %d: its exit status %d could not be recorded in %s: %s", rank, status, folder, exc)


def recorded_exit_statuses(folder: Path) -> dict[int, tuple[float, int]]:
    """``{rank: (time written, status)}`` of the statuses the ranks recorded in ``folder``.

    >>> import tempfile; folder = Path(tempfile.mkdtemp()); record_exit_status(1, 9, {STATUS_DIR_ENV: str(folder)})
    >>> {rank: status for rank, (_, status) in recorded_exit_statuses(folder).items()}
    {1: 9}
    """
    statuses = {}
    for path in sorted(folder.glob("rank-*")):
        try:
            statuses[int(path.name[len("rank-"):])] = (path.stat().st_mtime, int(path.read_text()))
        except (OSError, ValueError):  # a rank killed while writing it: no status of its own
            continue
    return statuses


class LauncherFolderInUse(Exception):
    """Another ``crossdistil train --world-size`` command runs the same node of the same ``checkpoint.dir``."""


@contextlib.contextmanager
def launcher_folder(path: Path | None) -> Iterator[Path]:
    """The folder of one node's ``crossdistil train --world-size`` command for as long as it runs: its ranks'
    recorded statuses and torchrun's logs (each rank's ``error.json``), removed when the command ends.

    ``path``: a known place, ``checkpoint.dir/launcher/node-<K>``, so that what a command killed with SIGKILL left
    there is removed by the next command of that node, which clears the folder at start. The command holds a
    lock on ``.lock`` in it while it runs (a POSIX record lock, as a checkpoint store's: released however the
    process ends), so a second command of the same node is refused (``LauncherFolderInUse``) instead of clearing
    the first one's folder; nodes sharing a volume have folders of their own. None: a fresh temporary folder.

    >>> base = Path(tempfile.mkdtemp()); left = base / "launcher" / "node-1" / "attempt-0"; left.mkdir(parents=True)
    >>> with launcher_folder(base / "launcher" / "node-1") as folder:
    ...     sorted(p.name for p in folder.iterdir())
    ['.lock']
    >>> list(base.iterdir())
    []
    """
    if path is None:
        with tempfile.TemporaryDirectory(prefix="crossdistil-ranks-") as folder:
            yield Path(folder)
        return
    path.mkdir(parents=True, exist_ok=True)
    try:
        lock = take_lock(path / ".lock")
    except LockHeld as held:
        raise LauncherFolderInUse(
            f"{path} is in use by another crossdistil train --world-size command (pid {held.holder}) running the "
            "same node of this checkpoint.dir: stop that one, or give this one its own --node-rank or checkpoint.dir"
            ) from None
    try:
        _clear(path)  # what a command killed before it could clear it left
        yield path
    finally:
        _clear(path)
        (path / ".lock").unlink(missing_ok=True)
        os.close(lock)
        for folder in (path, path.parent):  # the parent too once no node's folder is left in it
            with contextlib.suppress(OSError):
                folder.rmdir()


def _clear(folder: Path) -> None:
    """Remove everything in ``folder`` but its ``.lock``."""
    for entry in folder.iterdir():
        if entry.name == ".lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


class NodeGroup:
    """The launchers of one group of ranks on several machines (``crossdistil train --world-size N --nnodes M``),
    meeting through a TCP store that node 0's command serves on ``--master-port`` for as long as it runs.

    torchrun's static rendezvous serves that store only during one launcher attempt, so a node that restarts first
    would meet the other's previous attempt, or no store at all. Here node 0's command holds the store across its
    attempts (torch's rendezvous shares the server: ``multi_tenant``), each attempt is a generation with a
    rendezvous id of its own (``crossdistil-<g>``, so no attempt reads another's keys), and after each attempt every
    node reports its outcome; node 0 decides for the group (``decide``, from every node's outcome) and every node
    follows: all restart as generation g + 1, or all end with the same status. A node started while generation g
    runs without it (a replaced machine) waits for g + 1."""

    PREFIX = "crossdistil/launch"

    def __init__(self, master_addr: str, master_port: int, nnodes: int, node_rank: int, timeout_s: float) -> None:
        self.nnodes, self.node_rank, self.timeout_s = nnodes, node_rank, timeout_s
        self.is_host = node_rank == 0
        store = dist.TCPStore(master_addr, master_port, nnodes if self.is_host else None, self.is_host,
                              datetime.timedelta(seconds=timeout_s), wait_for_workers=False, multi_tenant=True)
        self.store = dist.PrefixStore(self.PREFIX, store)
        self.root = store  # node 0: keeps the server up between attempts; torch's rendezvous keys live in it too

    def begin(self, generation: int | None) -> int:
        """The generation this node's next attempt joins (None: the first of this command) and note it joined."""
        if self.is_host:
            generation = 0 if generation is None else generation
            self.store.set("generation", str(generation))
        elif generation is None:
            generation = int(self.store.get("generation"))
            if self.store.check([f"{generation}/joined/{self.node_rank}"]):  # run by this node's former command
                generation += 1
        self.store.set(f"{generation}/joined/{self.node_rank}", "1")
        return generation

    def settle(self, generation: int, outcome: dict[str, Any],
               decide: Callable[[list[dict[str, Any] | None]], dict[str, Any]]) -> dict[str, Any]:
        """Report this node's ``outcome`` of ``generation`` and return the group's decision: node 0 waits up to
        ``timeout_s`` for every node's outcome (a node that does not report counts as None), decides and waits
        for every node to read the decision before it may exit; the others wait for node 0's decision."""
        self.store.set(f"{generation}/outcome/{self.node_rank}", json.dumps(outcome))
        if not self.is_host:
            self.store.wait([f"{generation}/decision"], datetime.timedelta(seconds=2 * self.timeout_s))
            decision = json.loads(self.store.get(f"{generation}/decision"))
            self.store.set(f"{generation}/read/{self.node_rank}", "1")
            return decision
        outcomes = [outcome] + [self._wait_json(f"{generation}/outcome/{node}") for node in range(1, self.nnodes)]
        decision = decide(outcomes)
        self.store.set(f"{generation}/decision", json.dumps(decision))
        if not decision["restart"]:  # the store goes when node 0 exits: every node that reported reads it first
            for node in range(1, self.nnodes):
                if outcomes[node] is not None:
                    self._wait_json(f"{generation}/read/{node}")
        return decision

    def _wait_json(self, key: str) -> Any:
        try:
            self.store.wait([key], datetime.timedelta(seconds=self.timeout_s))
        except (RuntimeError, dist.DistError):  # not there in time: a node that died or never came
            return None
        return json.loads(self.store.get(key))
