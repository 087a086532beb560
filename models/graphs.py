"""CUDA graphs for the training step: a full-size batch's whole step captured once, then replayed.

A step of the default model issues a few hundred small kernels (forward, losses, backward, every optimizer, the
online counts, the normaliser, the trust gate); on a GPU each costs a launch from Python, far more than its
arithmetic at batch 4,096. ``Learner.use_cuda_graphs()`` captures the step of the first full-size batches as one
CUDA graph (``torch.cuda.CUDAGraph``) and replays it for every later batch of that size: one launch a step.

Why a replay is the step. On a device, a step reads nothing back to the host (``models.host``,
tests/unit/models/test_host_reads.py) and issues the same operations, with the same arguments, on the same state
tensors at every batch of one size: the trust gate's ring cursor and counters and the KD warm-up's sample count
are tensors on the device, advanced by the step's own operations (tests/unit/models/test_replayable.py checks it,
on a CPU, in every CI). The batch is copied into the captured step's input tensors before a replay; what the step
reports is copied out (``PendingStep``) before the next replay overwrites it; the pair sampler's generator is
registered with the graph, so each replay draws new pairs. The host's own counters (the learner's steps and
samples, the gate's) advance after each replay (``Learner._count``, ``TrustGate.advance``), as the step's Python
would have.

Batches of another size (a log's last) run as plain steps. ``Learner.load_state_dict`` drops the graph (the
optimizers' state tensors are new); the next full-size batches warm up and capture again. What cannot replay is
refused when asked for, with the reason (``not_replayable``). The GPU tests (tests/unit/models/test_graphs.py) hold
replayed steps to plain ones.
"""

from __future__ import annotations

from typing import Any

import torch

from models.features import Batch
from models.rowwise import RowAdagrad, RowAdam


def not_replayable(learner: Any) -> str | None:
    """Why ``learner``'s step cannot be captured and replayed, or None when it can."""
    if learner.device.type != "cuda":
        return f"they need a CUDA device; this learner is on {learner.device}"
    if learner.privileged_teacher is not None:
        return "a privileged teacher (models.privileged) trains as a second learner inside the step: not captured yet"
    if learner.collective is not None:
        return "synchronous ranks (models.distributed) exchange gradients between the step's parts"
    if not isinstance(learner.embedding_optimizer, (RowAdagrad, RowAdam)):
        return ("a dense embedding table (sparse_embeddings = false) with Adam keeps its step count on the host; "
                "use sparse embeddings (the default) or embedding_optimizer = 'adagrad'")
    return None


def _inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    return batch.categorical, batch.numeric, batch.labels, batch.user


class StepGraphs:
    """The captured step of one batch size and its replays, for one learner (``Learner.use_cuda_graphs``).

    The size is ``size`` where given (a live trainer's ``batching.batch_size``: its first batch may be a partial one,
    cut by the wall clock), else the first batch's. ``warmup`` plain steps of that size run first, on a side stream
    (the optimizers make their state, the learner its cached tensors, the caching allocator its blocks), then the
    next batch of that size is captured and replayed; every later one is replayed.
    """

    def __init__(self, learner: Any, warmup: int = 3, size: int | None = None) -> None:
        reason = not_replayable(learner)
        if reason is not None:
            raise ValueError(f"CUDA graphs for this learner's step: {reason}")
        if warmup < 1:
            raise ValueError(f"warmup must be at least one plain step (the optimizers' state), got {warmup}")
        if size is not None and size < 1:
            raise ValueError(f"size must be a batch size of at least 1 row, got {size}")
        self.learner, self.warmup, self.fixed_size = learner, int(warmup), size
        self.reset()

    def reset(self) -> None:
        """Drop the graph: the next batches of the captured size (``size``, else the first size seen) warm up and
        capture again."""
        self.size: int | None = self.fixed_size
        self.plain_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Batch | None = None
        self.outputs: tuple[list[str], torch.Tensor, torch.Tensor] | None = None
        self.replays = 0

    def train(self, batch: Batch) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """``Learner._train`` of ``batch``: replayed when its size is the captured one, else a plain step. The
        returned tensors of a replay are the graph's own: read them (``PendingStep`` copies them out) before the next
        step."""
        rows = len(batch)
        if self.size is None:
            self.size = rows
        if rows != self.size:
            return self.learner._train(batch)
        if self.graph is None:
            if self.plain_steps < self.warmup:
                self.plain_steps += 1
                return self._plain_on_side_stream(batch)
            return self._capture(batch)
        for static, values in zip(_inputs(self.static), _inputs(batch.to(self.learner.device))):
            static.copy_(values, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        self.learner._count(rows)
        if self.learner.trust_gate is not None:
            self.learner.trust_gate.advance(rows)
        return self.outputs

    def _plain_on_side_stream(self, batch: Batch) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        side = torch.cuda.Stream(device=self.learner.device)
        side.wait_stream(torch.cuda.current_stream(self.learner.device))
        with torch.cuda.stream(side):
            out = self.learner._train(batch)
        torch.cuda.current_stream(self.learner.device).wait_stream(side)
        return out

    def _capture(self, batch: Batch) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Capture this batch's step, then replay it once: the capture records the kernels and runs none, while
        the step's Python (the host's counters) ran once, for this batch."""
        learner = self.learner
        on_device = batch.to(learner.device)
        self.static = Batch(*(t.clone() for t in _inputs(on_device)), tasks=batch.tasks)
        learner._zero_grad()  # the captured backward makes the gradients, in the graph's own memory
        torch.cuda.synchronize(learner.device)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(learner.pair_generator)
        with torch.cuda.graph(graph):
            self.outputs = learner._train(self.static)
        self.graph = graph
        graph.replay()
        self.replays += 1
        return self.outputs
