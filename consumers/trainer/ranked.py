"""One rank of several trainers of one model (``torchrun``; ``docs/scaling.md``).

What a rank changes, and nothing else (one rank is ``consumers.trainer.daemon.Trainer`` unchanged):

* **Data**: static ownership, no group rebalances: rank r reads partitions p with p mod N == r of both topics
  (``KafkaIO.assign_static``: the topics must have the same partition count, at least N). Offsets are still
  committed to ``kafka.group_id``, so lag dashboards keep working; the consumer never joins the group.
* **One model**: the learner is the rank's ``consumers.runtime.ranks.RankedLearner``. The ranks meet once per poll
  (``Ranks.agree``, a max over a few integers) and decide together: step the queued batches (sync), average the
  replicas (average), checkpoint, stop, or finish a finite stream. Polls are short
  (``distributed.poll_timeout_ms``), because a rank waiting for records holds the others back.
* **Exactly once**: a checkpoint is a *round*. Every rank writes its positions, join and batcher state as round R
  in its own store, ``<checkpoint.dir>/rank-<r>``; rank 0's file also holds the model (identical on every rank
  after the step or the average that precedes it), written once. After a barrier that every rank passes only
  once its file is durable, rank 0 records R in ``round.json``. Restore: rank 0 reads the newest complete round,
  every rank restores its own part of it, and the model comes from rank 0's file (its bytes are broadcast, so
  ranks on other hosts need no shared disk). Each rank's ledger (``--ledger DIR`` -> ``DIR/rank-<r>``) is cut back
  to that round.
* **Failures**: a rank killed at any moment makes the others' next collective fail (or time out after
  ``distributed.timeout_s``); they exit with status 8 without a checkpoint, and the group is restarted
  (``--max-restarts``: by ``crossdistil train --world-size N``, which restarts it only after a status a restart can
  help, ``consumers.trainer.command.launch_ranks``, on several machines every node together; by torchrun's agent,
  after any status, when torchrun is started by hand), and restores the newest complete round.
* **A round that cannot be written** (a full disk, a file size limit, a read-only folder, on any rank): each rank
  catches its own write's error, and the ranks agree on whether every part landed, then on whether rank 0's
  ``round.json`` did (:func:`write_round`: the same collectives on every rank, whatever failed, so no rank can take
  the round for complete while another does not). If not, the round stays incomplete on every rank: no round
  record, no offsets committed, nothing published; every rank logs it (the one that failed naming its error), and
  they try again together, as one trainer does (``consumers.trainer.daemon``: after 10 s doubling to 300 s,
  /healthz saying since when), under the next round number: a failed round's number is not used again, so that its
  ledger segments stay its own, and each store keeps the last complete round's part however many incomplete ones
  follow it. A restart resumes from the last complete round. A last round (a stop, the end of a stream) that cannot
  be written ends every rank with status 9.
* **Publication and metrics**: rank 0 publishes, in today's wire format (its manifest's ``offsets`` are every
  rank's); each rank serves /metrics on ``metrics.port + rank``.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from consumers.runtime.assembly import model_config
from consumers.runtime.config import Config
from consumers.runtime.ranks import RankError, Ranks
from consumers.state.checkpoints import CheckpointError, CheckpointStore, positions_to_plain
from consumers.state.learner_state import (
    CHECKPOINT_FORMAT,
    ModelDiverged,
    check_format,
    divergence,
    load_learner_checkpoint,
    write_learner_checkpoint,
)
from consumers.trainer.checkpointing import Checkpointer, check_model
from consumers.trainer.daemon import Trainer
from consumers.trainer.exits import EXIT_CHECKPOINT_FAILED, EXIT_MODEL_DIVERGED, EXIT_RANKS
from consumers.trainer.kafka_io import KafkaClients, connect

log = logging.getLogger("crossdistil.trainer")

# Statuses every rank reaches together: they leave the group together.
AGREED_EXITS = (0, 7, EXIT_CHECKPOINT_FAILED, EXIT_MODEL_DIVERGED)

Written = TypeVar("Written")


class RoundIncomplete(OSError):
    """A checkpoint round that not every rank could write (a full disk, a file size limit, a read-only folder on one
    of them): raised on every rank alike (:func:`write_round`), so that none records, commits or publishes it.
    ``Trainer.checkpoint`` logs it and tries again later, as it does a one-rank trainer's failed write.

    ``failed``: the ranks that could not write their part (or rank 0 its round record: ``what``); ``error``: this
    rank's own error, None when only others failed."""

    def __init__(self, info: Any, round_: int, failed: list[int], error: OSError | None, what: str = "part") -> None:
        self.round, self.failed, self.error = round_, failed, error
        others = [f"rank {r}/{info.world_size}" for r in failed if r != info.rank]
        if error is not None:
            text = (f"{info.label}: its {what} of checkpoint round {round_} could not be written ({error})"
                    + (f"; nor could {', '.join(others)} write {'its' if len(others) == 1 else 'theirs'}"
                       if others else ""))
        else:
            theirs = f"its {what} (see its log)" if len(others) == 1 else f"their {what}s (see their logs)"
            text = (f"{info.label}: checkpoint round {round_} is incomplete: {', '.join(others)} could not write "
                    f"{theirs}")
        super().__init__(error.errno if error is not None else None, text)

    def __str__(self) -> str:
        return str(self.strerror)


def write_round(ranks: Any, round_: int, write_part: Callable[[], Written],
                write_record: Callable[[], None]) -> Written:
    """Checkpoint round ``round_`` on every rank or on none: ``write_part()`` on every rank, then, once every rank's
    part landed, ``write_record()`` on rank 0 (the record that makes the round the one a restart restores); the
    part's result. When a part or the record cannot be written (an ``OSError``), every rank raises
    ``RoundIncomplete`` alike, naming the ranks that failed, and the round stays incomplete.

    Every rank must call it at the same point: it holds two collectives (only the first when a part failed), the same
    on every rank whatever failed, so that no rank can take the round for complete while another does not. A rank
    that dies in between makes the others' collective fail (``RankError``, exit 8): the record then says which
    round a restart resumes from, whichever it is."""
    rank, world = ranks.rank, ranks.world_size
    result: Any = None
    error: OSError | None = None
    try:
        result = write_part()
    except OSError as exc:
        error = exc
    mine = [0] * world
    mine[rank] = int(error is not None)
    failed = [r for r, flag in enumerate(ranks.agree(mine)) if flag]  # a barrier: every part is durable past it
    if failed:
        raise RoundIncomplete(ranks.info, round_, failed, error) from error
    if rank == 0:
        try:
            write_record()
        except OSError as exc:  # round.json as it was (written atomically), or it names round_ if only the fsync of
            error = exc         # its folder failed: either way every part of round_ and of the round before is kept
    if ranks.agree([int(error is not None)])[0]:
        raise RoundIncomplete(ranks.info, round_, [0], error, what="round record") from error
    return result


def rank_config(cfg: Config, rank: int) -> Config:
    """The configuration rank ``rank`` runs with: its own checkpoint store and metrics port; only rank 0 publishes;
    at least two checkpoints kept (the round being written and the last complete one)."""
    mine = copy.deepcopy(cfg)
    mine.checkpoint.dir = str(Path(cfg.checkpoint.dir) / f"rank-{rank}")
    mine.checkpoint.keep_last = max(2, cfg.checkpoint.keep_last)
    if cfg.metrics.port:
        mine.metrics.port = cfg.metrics.port + rank
    mine.publish.enabled = cfg.publish.enabled and rank == 0
    return mine


class RoundCheckpointer(Checkpointer):
    """Checkpoints of one rank as rounds (module docstring). Every method is called by every rank at the same
    point of its loop: each holds collectives."""

    def __init__(self, *args: Any, ranks: Ranks, base_dir: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ranks = ranks
        self.base_dir = Path(base_dir)
        self.round = 0  # the last complete round, restored or written
        self.attempted = 0  # the last round number written, complete or not
        self.keep_last = self.store.keep_last  # the configured count; more while incomplete rounds' parts are kept

    # --------------------------------------------------------------------------------------------- restore

    def restore(self) -> int | None:
        """Restore this rank's part of the newest complete round, and the model from rank 0's part; the round, or
        None when none completed (every rank then starts from its partitions' beginnings, with rank 0's weights)."""
        rank, world = self.ranks.rank, self.ranks.world_size
        record, problem = None, 0
        if rank == 0:
            if CheckpointStore(self.base_dir, keep_last=1).steps():
                problem = 1  # a one-rank trainer's checkpoints: not ours to resume
            else:
                record = self.store.round()
                if record is not None and int(record["world_size"]) != world:
                    problem = 2
        newest, problem = self.ranks.agree([int(record["round"]) if record else -1, problem])
        if problem == 1:
            raise CheckpointError(f"{self.base_dir} holds the checkpoints of a one-rank trainer: several ranks keep "
                                  "theirs in rank-<r> folders of a checkpoint.dir of their own; point checkpoint.dir "
                                  "at an empty directory (or run one rank to resume that model)")
        if problem == 2:
            raise CheckpointError(f"the checkpoint rounds in {self.base_dir} were written by "
                                  f"{record['world_size'] if record else 'another number of'} ranks, this group has "
                                  f"{world}: the partitions' join state belongs to the ranks that owned them; run "
                                  "that many ranks, or start from an empty checkpoint.dir")
        learner = self.pipeline.learner
        if newest < 0:
            if self.ledger is not None:
                self.ledger.discard_after(None)
            if self.cfg.checkpoint.warm_start:  # rank 0's learner from an old checkpoint, broadcast below
                self.warm_start_ranks(self.ranks)
            learner.broadcast_model()  # identical replicas from the first step
            log.info("%s: no complete checkpoint round in %s: starting from scratch", self.ranks.info.label,
                     self.base_dir)
            return None
        path = self.store.path_for(newest)
        try:
            own = self.store.load(path, with_tensors=False)
        except (CheckpointError, OSError) as exc:
            raise CheckpointError(f"{self.ranks.info.label}: its part of checkpoint round {newest} is unusable or "
                                  f"missing ({exc}); every rank must keep its checkpoint.dir/rank-<r> across restarts"
                                  ) from exc
        check_format(own)
        check_model(own.metadata, model_config(self.cfg), path)
        model = self.ranks.broadcast_bytes(path.read_bytes() if rank == 0 else None)
        load_learner_checkpoint(learner.learner, model)
        meta = own.metadata
        self._restore_stream(meta, learner.steps, path)  # only rank 0 publishes: the others' publisher stays idle
        self.round = newest
        if self.ledger is not None:
            dropped = self.ledger.discard_after(newest)
            if dropped:
                log.info("ledger: discarded segments %s newer than the restored round", dropped)
        log.info("%s restored round %d: step %d, %d pending impressions, positions %s", self.ranks.info.label,
                 newest, learner.steps, self.pipeline.join.pending_impressions, meta["positions"])
        return newest

    # ----------------------------------------------------------------------------------------------- write

    def write(self, reason: str) -> bool:
        """Checkpoint the next round on every rank (module docstring); False when skipped on every rank,
        ``RoundIncomplete`` (an ``OSError``) on every rank when a rank's part or the round record could not be
        written."""
        learner = self.pipeline.learner
        self.pipeline.collect(wait=True)  # sync: the queued batches are stepped together first
        if learner.mode == "average":
            learner.average()  # the replicas are one model before it is written
        self._warn_late()
        step = learner.steps
        changed = (step != self.last_step or self.kafka.positions != self.kafka.checkpointed
                   or self.publisher.pending)
        acknowledged = self.dead_letters.flush()
        any_changed, unacknowledged = self.ranks.agree([changed, not acknowledged])
        if unacknowledged:
            log.warning("checkpoint (%s) skipped: dead letters of a rank not yet acknowledged by Kafka", reason)
            return False
        if not any_changed:
            self.last_at = time.monotonic()
            return False
        # A model that diverged is written by no rank; every rank raises alike (the daemon's exit status 10).
        diverged = divergence(learner.learner)
        if self.ranks.agree([diverged is not None])[0]:
            raise ModelDiverged(diverged or f"the model of step {step:,} diverged on another rank (see its log)")
        started = time.perf_counter()
        round_ = max(self.round, self.attempted) + 1
        self.attempted = round_  # a failed round's number is not used again: its ledger segments stay its own
        publish = self.publishes(step)  # only rank 0's configuration publishes; never a new model's step 0
        version = self.publisher.version + 1 if publish else self.publisher.version
        offsets = [o for part in self.ranks.gather_plain(positions_to_plain(self.kafka.positions)) for o in part]
        metadata = {**self._metadata(step, version), "round": round_, "rank": self.ranks.rank,
                    "world_size": self.ranks.world_size}

        def write_part() -> dict[str, Any]:
            self._keep_complete_round()
            if self.ledger is not None:
                self.ledger.commit(round_)
            if self.ranks.rank != 0:
                self.store.write(round_, {}, {**metadata, "trainer_format": CHECKPOINT_FORMAT})
                return {}
            publication = None
            if publish:
                publication = self._publication(step, version)
                publication["manifest"]["offsets"] = sorted(offsets)
            return write_learner_checkpoint(learner.learner, self.store, metadata, publication, number=round_)

        written = write_round(self.ranks, round_, write_part, lambda: self.store.write_round({
            "round": round_, "world_size": self.ranks.world_size, "step": step, "mode": learner.mode}))
        self.round = round_
        seconds = time.perf_counter() - started
        log.info("%s: checkpoint round %d (%s) at step %d in %.2f s", self.ranks.info.label, round_, reason, step,
                 seconds)
        self._written(step, seconds, version if publish else None, written)
        return True

    def _keep_complete_round(self) -> None:
        """Keep the last complete round's part through the next write's pruning, whatever incomplete rounds' parts
        newer than it this store holds (a failed attempt, or one that a crash interrupted)."""
        incomplete = sum(1 for number in self.store.steps() if number > self.round)
        self.store.keep_last = self.keep_last + incomplete


class RankTrainer(Trainer):
    """The trainer daemon as one rank of several (module docstring)."""

    def __init__(self, cfg: Config, ranks: Ranks, exit_when_idle_s: float | None = None,
                 ledger_dir: str | None = None, start_ms: int | None = None) -> None:
        self.ranks = ranks
        self.section = cfg.distributed
        ledger = str(Path(ledger_dir) / f"rank-{ranks.rank}") if ledger_dir else None
        super().__init__(rank_config(cfg, ranks.rank), exit_when_idle_s, ledger, start_ms, ranks=ranks)
        self.checkpoints = RoundCheckpointer(self.cfg, self.store, self.pipeline, self.kafka, self.dead_letters,
                                             self.publisher, self.metrics, self.ledger, ranks=ranks,
                                             base_dir=cfg.checkpoint.dir)
        self.last_average_at = time.monotonic()

    def run(self) -> int:
        print(f"crossdistil train: {self.ranks.info.label} ({self.ranks.backend}, mode {self.section.mode}), "
              f"pid {os.getpid()}; checkpoints in {self.store.directory}", flush=True)
        status = None
        try:
            status = super().run()
            return status
        except RankError as exc:
            print(f"crossdistil train: {exc}\nexiting with status {EXIT_RANKS} without a checkpoint (the last complete "
                  "round is consistent: torchrun's restart resumes from it)", file=sys.stderr, flush=True)
            return EXIT_RANKS
        finally:
            self.ranks.close(together=status in AGREED_EXITS)  # agreed: together; any other error leaves alone

    def _connect(self) -> KafkaClients:
        return connect(self.cfg.kafka, group_member=False)

    def _consume(self) -> bool:
        """This rank's own partitions (``KafkaIO.assign_static``); every rank stops if one cannot start."""
        problem = None
        try:
            owned = self.kafka.assign_static(self.ranks.rank, self.ranks.world_size, self.start_ms)
        except ValueError as exc:
            problem = str(exc)
        if self.ranks.agree([problem is not None])[0]:
            print(f"crossdistil train: {problem or 'another rank cannot start (see its log)'}", file=sys.stderr)
            self.exit_status = 2
            return False
        log.info("%s owns %s", self.ranks.info.label, ", ".join(f"{t}-{p}" for t, p in owned))
        return True

    def _poll_timeout_ms(self, now: float) -> int:
        return min(super()._poll_timeout_ms(now), self.section.poll_timeout_ms)

    def _loop(self) -> None:
        """Poll -> ingest -> agree with the other ranks -> step / average -> checkpoint -> exit, until stopped."""
        learner = self.learner
        while True:
            polled = self.kafka.poll(self._poll_timeout_ms(time.monotonic()))
            now = self.last_poll_ok_at = time.monotonic()
            if polled:
                self._ingest(polled, now)  # sync: full batches wait in the learner's queue
                now = self.last_event_at = time.monotonic()
            self.kafka.align()
            if not polled and self.kafka.caught_up():
                self.pipeline.tick(now)
            self.pipeline.train_ready(now, self._train_lead_s())
            stop, due, busy, unreadable, average = self.ranks.agree([
                self.stop_requested, self._checkpoint_reason(now) is not None, not self._idle_at_end(now),
                self.kafka.unreadable is not None, self._average_due(now)])
            learner.step_together(self.pipeline.cut_partial)
            self.pipeline.collect()
            if average:
                learner.average()
                self.last_average_at = time.monotonic()
            if unreadable:
                log.error("%s; exiting with status 7 after a checkpoint of everything before it",
                          self.kafka.unreadable or "another rank cannot read a record batch")
                self.exit_status = 7
                break
            if not busy:
                self._finish_stream(now)
                return
            if stop:
                break
            if due:
                self.checkpoint("periodic")
        self._final_checkpoint("shutdown")

    def _average_due(self, now: float) -> bool:
        s = self.section
        if s.mode != "average":
            return False
        steps = self.learner.steps_since_average
        return bool((s.average_every_steps and steps >= s.average_every_steps)
                    or (s.average_every_s and steps and now - self.last_average_at >= s.average_every_s))
