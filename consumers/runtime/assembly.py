"""The trainer's core assembled from a configuration: the one place that reads ``[model]``, ``[join]`` and
``[batching]`` to build a ``consumers.core.pipeline.Pipeline``, for the trainer daemon and the backtest alike.

>>> from consumers.runtime.config import load_config
>>> cfg = load_config(None, env={}, overrides=["model.tasks=['click']", "join.attribution_window_s={click = 60}"])
>>> join_config(cfg, live=False).attribution_window_s, join_config(cfg, live=True).wait_for_all_partitions
({'click': 60.0}, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from consumers.core.batching import MiniBatcher
from consumers.core.join import AttributionJoin, JoinConfig
from consumers.core.pipeline import BatchHook, EventClock, LearnerPort, Pipeline, PipelineMetrics
from consumers.runtime.config import Config
from consumers.runtime.learner_process import build_learner, learner_port, stream_model_config
from consumers.runtime.ranks import RankedLearner, Ranks
from consumers.runtime.telemetry import TrainerMetrics
from models.config import ModelConfig
from models.learner import resolve_device
from models.river_baseline import RiverConfig

RANKS_WITHOUT_GRAPHS = ("model.cuda_graphs is for one trainer: several ranks exchange gradients or weights between "
                        "the parts of a step, which a captured step cannot (set it to false)")


def model_config(cfg: Config) -> ModelConfig | RiverConfig:
    """The learner's configuration described by the ``[model]`` section (``models.zoo.learner_config``); a
    ``ValueError`` where a stream cannot train it."""
    return stream_model_config(cfg)


def model_device(cfg: Config) -> Any:
    """The ``[model]`` section's torch device on this machine (``models.learner.resolve_device``: a GPU asked for
    where there is none is a ``ValueError``), with ``model.cuda_graphs`` checked against it."""
    device = resolve_device(cfg.model.device)
    if cfg.model.cuda_graphs and device.type != "cuda":
        raise ValueError(f"model.cuda_graphs: CUDA graphs need a CUDA device, and model.device = "
                         f"{cfg.model.device!r} is {device} here (on a machine with a GPU: model.device = 'cuda' or "
                         "'auto'; else model.cuda_graphs = false)")
    return device


def join_config(cfg: Config, *, live: bool = True) -> JoinConfig:
    """The ``consumers.core.join.JoinConfig`` of the ``[join]`` section.

    Live (``live=True``): ``wait_for_all_partitions``, because a partition the consumer has not fetched yet
    must hold the watermark back, or the first partition fetched would race ahead in event time and make every
    other partition's feedback late; idle partitions time out on the wall clock (``idle_timeout_s``).

    Replay (``live=False``): there is no wall clock, so no source is ever idle, and sources appear with their
    first event (an event log does not list its partitions up front). Windows, lateness and bounds are the same.
    """
    windows = {task: float(cfg.join.attribution_window_s.get(task, cfg.join.default_window_s))
               for task in cfg.model.tasks}
    # outcomes the windows' table names beside model.tasks: left out of the model on purpose (the config's help)
    ignored = tuple(task for task in cfg.join.attribution_window_s if task not in windows)
    return JoinConfig(
        attribution_window_s=windows,
        allowed_lateness_s=cfg.join.allowed_lateness_s,
        max_pending=cfg.join.max_pending,
        idle_timeout_s=(cfg.join.idle_timeout_s or None) if live else None,
        wait_for_all_partitions=live,
        ignored_tasks=ignored,
    )


def build_pipeline(cfg: Config, *, clock: Callable[[], float] | None = time.monotonic,
                   metrics: PipelineMetrics | None = None, ledger: Any = None, on_batch: BatchHook | None = None,
                   on_emitted: Callable[[int, float], None] | None = None, dense: bool = False,
                   ranks: Ranks | None = None, metrics_users: bool = True) -> Pipeline:
    """The pipeline of ``cfg``: live on the wall clock (``time.monotonic``), or a replay (``clock`` None or an
    ``EventClock``: the join's event-time clock; no source is ever idle). The learner trains here or in a
    learner process (``model.separate_process``). ``metrics``: the ``[metrics]`` section's ``TrainerMetrics`` on a
    registry of its own by default.

    ``dense=True`` (a replay's dense batching, ``crossdistil backtest --batching dense``): batches are cut by
    ``batching.batch_size`` only, ``max_batch_delay_s`` is not used; the join and its windows are unchanged.

    ``ranks`` (one rank of several, ``consumers.runtime.ranks``): the learner is that rank's ``RankedLearner``
    (``distributed.mode``), and with ``distributed.global_batch`` in sync mode each rank cuts
    ``ceil(batch_size / ranks)`` samples, so the ranks' step together is one trainer's batch.

    ``metrics_users=False``: the batches' users are not handed to the metrics (they feed per-user AUC and GAUC
    only; a backtest, which shows neither, saves the work)."""
    live = clock is not None and not isinstance(clock, EventClock)
    if dense and live:
        raise ValueError("dense batching is for replays: a live trainer cuts partial batches on the wall clock")
    batch_size = cfg.batching.batch_size
    if ranks is None:
        learner: LearnerPort = learner_port(cfg)
    else:
        if cfg.model.separate_process:
            raise ValueError("model.separate_process is for one trainer: each of several ranks is a process already "
                             "(set it to false)")
        if cfg.model.cuda_graphs:
            raise ValueError(RANKS_WITHOUT_GRAPHS)
        learner = RankedLearner(build_learner(cfg), cfg.model.tasks, ranks, cfg.distributed.mode)
        if cfg.distributed.mode == "sync" and cfg.distributed.global_batch:
            batch_size = -(-batch_size // ranks.world_size)
    return Pipeline(
        learner, AttributionJoin(join_config(cfg, live=live)),
        MiniBatcher(batch_size, None if dense else cfg.batching.max_batch_delay_s),
        tasks=cfg.model.tasks, scored_tasks=cfg.model.learnt_tasks, clock=clock,
        metrics=metrics if metrics is not None else TrainerMetrics.from_config(cfg),
        ledger=ledger, on_batch=on_batch, on_emitted=on_emitted, metrics_users=metrics_users,
    )
