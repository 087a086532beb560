"""The step API: ``Learner.step(batch)`` scores the batch, then updates every part of the model at once.

    learner = Learner(ModelConfig(tasks=("click", "long_view")))
    losses, predictions = learner.step(encode_rows(rows, learner.config.features, learner.config.tasks))

On a GPU nothing in a step waits for the host but its one read back of what it reports, and
``learner.step_async(batch)`` defers that read: issue step t + 1, then read step t's ``.result()``.

Embeddings use sparse gradients and per-row AdaGrad's update on the touched rows (``models.rowwise``: a step
touches only the rows the batch uses; ``embedding_optimizer``); the wide part uses AdaGrad the same way; everything
else uses Adam. ``state_dict`` holds tensors and plain types only (``torch.load(..., weights_only=True)`` reads
it, and ``flatten_state`` turns it into safetensors input); ``serving_state`` exports the students for
``ServingModel``, safetensors-ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from models.config import LEGACY_VALUES, ModelConfig, config_differences, split_differences
from models.crossdistil import CrossDistilModel, crossdistil_loss
from models.features import Batch, encode_for_scoring
from models.graphs import StepGraphs
from models.onnx_export import TENSOR_NAME as ONNX_TENSOR
from models.onnx_export import describe as describe_graph
from models.onnx_export import export_students
from models.optimizers import embedding_optimizer, wide_optimizer
from models.privileged import teacher_config
from models.trust_gate import TrustGate
from models.warm_start import carry_over

SERVING_FORMAT = "crossdistil-students"
SERVING_VERSION = "1"


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch understands it. A device string torch does
    not know (``gpu``), or a CUDA device that torch cannot see, is a ``ValueError`` that says so, here and at once
    (not torch's RuntimeError, or its driver error at the first tensor).

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("gpu")
    Traceback (most recent call last):
    ...
    ValueError: device 'gpu': expected auto, cpu, cuda, cuda:N (N the GPU's index) or mps
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):  # torch's "Expected one of cpu, cuda, ipu, xpu, ... device type at start of ..."
        expected = "auto, cpu, cuda, cuda:N (N the GPU's index) or mps"
        raise ValueError(f"device {str(device)!r}: expected {expected}") from None
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: torch sees no Apple GPU (MPS) on this machine; use 'cpu' or 'auto'")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: torch sees no CUDA device on this machine (no GPU or driver, "
                             f"or a CPU-only torch build); use 'cpu', or 'auto' to take a GPU where there is one")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    return resolved


class PendingStep:
    """A step queued by ``Learner.step_async``: its update is issued, its reported values are on their way to the
    host. ``result()`` gives ``step``'s (losses, predictions), waiting only for this step's copies; on a CPU they
    are there already. Reading step t's result after queueing step t + 1 keeps a GPU busy while the host reads."""

    def __init__(self, names: list[str], tasks: Sequence[str], gated: bool, reported: torch.Tensor,
                 probabilities: torch.Tensor) -> None:
        self.names, self.tasks, self.gated = names, tuple(tasks), gated
        # non_blocking copies into page-locked memory: the host goes on while the device finishes the step
        self._reported = reported.to("cpu", non_blocking=True)
        self._probabilities = probabilities.to("cpu", non_blocking=True)
        self._event = None
        if reported.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._result: tuple[dict[str, float], dict[str, torch.Tensor]] | None = None

    def done(self) -> bool:
        """Whether ``result()`` would not wait (the device has finished the step and its copies)."""
        return self._event is None or self._event.query()

    def result(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """(losses, predictions) as ``Learner.step`` returns them; the first call waits for this step's copies."""
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            values = self._reported.tolist()
            losses = dict(zip(self.names, values))
            if self.gated:
                k, n = len(self.tasks), len(self.names)
                gates, teacher, student = (values[n + i * k:n + (i + 1) * k] for i in range(3))
                for i, task in enumerate(self.tasks):
                    losses[f"gate/{task}"] = gates[i]
                    if math.isfinite(teacher[i]) and math.isfinite(student[i]):  # from the gate's first decision on
                        losses[f"teacher_auc/{task}"] = teacher[i]
                        losses[f"student_auc/{task}"] = student[i]
            probabilities = self._probabilities
            self._result = losses, {task: probabilities[:, k] for k, task in enumerate(self.tasks)}
        return self._result


class Learner:
    """A CrossDistil model with its optimizers, trained one mini-batch at a time (online, prequential).

    >>> from models.features import encode_rows
    >>> learner = Learner(ModelConfig(hidden_dims=(8,), tower_dims=(4,)))
    >>> rows = [{"user_id": "u", "item_id": str(i), "labels": {"click": i % 2}} for i in range(8)]
    >>> losses, predictions = learner.step(encode_rows(rows, learner.config.features, learner.config.tasks))
    >>> sorted(predictions), predictions["click"].shape
    (['click', 'long_view'], torch.Size([8]))
    """

    def __init__(self, config: ModelConfig, device: str | torch.device = "cpu") -> None:
        self.config = config
        self.device = resolve_device(device)
        torch.manual_seed(config.seed)  # parameter init is the only use of the global RNG
        self.model = CrossDistilModel(config).to(self.device)
        # Pair sampling has its own generator, on the model's device (no host round-trip), checkpointed exactly.
        self.pair_generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        dense = [p for name, p in self.model.named_parameters()
                 if not name.startswith(("embedding.", "calibrator_", "wide."))]
        groups: list[dict[str, Any]] = [{"params": dense}]
        calibrators = [p for name, p in self.model.named_parameters() if name.startswith("calibrator_")]
        if calibrators:  # Platt's two numbers per task may move faster than the network (calibrator_lr)
            groups.append({"params": calibrators, "lr": config.calibrator_lr or config.lr})
        # fused: one kernel for the whole update of all ~40 parameters (CPU and CUDA), the update of foreach's
        # multi-tensor kernels (up to a few elements' rounding) at ~1/3 of their time on a CPU (bench/step_parts.py)
        self.dense_optimizer = torch.optim.Adam(groups, lr=config.lr, **self._adam_kernels())
        # The table's rows and the wide part learn with per-row steps (models.optimizers: only touched rows move).
        self.embedding_optimizer = embedding_optimizer(self.model.embedding.weight, config.embedding_optimizer,
                                                       config.embedding_lr, config.sparse_embeddings)
        self.wide_optimizer = (wide_optimizer(self.model.wide.parameters(), config.wide, config.wide_lr,
                                              config.wide_decay) if self.model.wide is not None else None)
        self.steps = 0
        self.samples = 0  # training samples seen
        # The same count on the device: the KD warm-up's clock, advanced by the step's own operations (a replayed
        # step, models.graphs, reads it where it is); float64 holds every count a stream reaches exactly.
        self._seen = torch.zeros((), dtype=torch.float64, device=self.device)
        self.trust_gate = (TrustGate(len(config.tasks), config.kd_gate_window, config.kd_gate_margin,
                                     config.kd_gate_every, device=self.device) if config.gated else None)
        # Several ranks, one model (models.distributed): set by the trainer's ranks, None for one process.
        self.collective: Any = None
        self.graphs: StepGraphs | None = None  # use_cuda_graphs()
        # A teacher that also reads the privileged columns (models/privileged.py), built after the student so that
        # the student starts where a learner without it does.
        self.privileged_teacher = Learner(teacher_config(config), self.device) if config.privileged else None
        self._privileged_weights: dict[torch.device, torch.Tensor] = {}
        taught = self.privileged_teacher.config.tasks if self.privileged_teacher is not None else config.tasks
        self._teacher_columns = (torch.tensor([config.tasks.index(t) for t in taught], device=self.device)
                                 if taught != config.tasks else None)  # the student's columns the teacher learns
        # ... blended in per task only while it ranks better than the student (privileged_gate)
        self.privileged_gate = (TrustGate(len(config.tasks), config.kd_gate_window, config.kd_gate_margin,
                                          config.kd_gate_every, device=self.device)
                                if config.privileged and config.privileged_gate else None)

    def use_cuda_graphs(self, warmup: int = 3, size: int | None = None) -> None:
        """Replay the step of each full-size batch as one CUDA graph from now on (models/graphs.py): a few plain
        steps, one capture, then one launch a step. The full size is ``size``, else the first batch's; batches of
        another size run as plain steps. A ``ValueError`` says why where this learner's step cannot be replayed (not
        on a CUDA device, synchronous ranks, a dense table with Adam)."""
        self.graphs = StepGraphs(self, warmup, size)

    def _adam_kernels(self) -> dict[str, Any]:
        """The dense Adam's implementation: fused on a CPU or a CUDA device, else foreach."""
        fused = self.device.type in ("cpu", "cuda")
        kernels = {"fused": True, "foreach": None} if fused else {"fused": None, "foreach": True}
        # capturable on a GPU: its step count stays there and a CUDA graph may capture its step (models.graphs); the
        # fused kernel is the same either way
        return {**kernels, "capturable": self.device.type == "cuda"}

    def kd_scale(self) -> torch.Tensor | None:
        """The factor on alpha_k for the next step: KD warm-up ramp times the trust gate (None = 1)."""
        cfg = self.config
        scale = None
        if cfg.kd_warmup_samples > 0 and cfg.distills:
            ramp = (self._seen / cfg.kd_warmup_samples).clamp(max=1.0).float()  # min(1, samples / warm-up)
            scale = ramp.expand(len(cfg.tasks)).clone()
        if self.trust_gate is not None:
            scale = self.trust_gate.open.clone() if scale is None else scale * self.trust_gate.open
        return scale

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.bf16 and self.device.type in ("cuda", "cpu"):
            # On a CPU this pays at large batches where the matrix units take bf16 (avx512_bf16 / AMX): 1.42x a step
            # of the default model at batch 4,096 on this project's machine, 0.82x at 256 (docs/performance.md).
            # a captured step (models.graphs) must cast the weights at every replay: no cache of casts across steps
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=self.graphs is None)
        return contextlib.nullcontext()

    def step(self, batch: Batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """One update on ``batch``. Returns (losses, predictions made before the update).

        losses: ``{"total", "bce/<task>", "kd/<task>", "aux/<task>", "teacher_bce/<task>", "cal/<task>"}`` (terms
        the rung uses), with trust gating also ``"gate/<task>"`` (1 = distilling) and, once the gate has decided
        with both classes in its window, ``"teacher_auc/<task>"`` and ``"student_auc/<task>"`` (its windowed
        prequential AUCs);
        predictions: task -> student probability, float32 tensor [B] on CPU, for every learnt task
        (``ModelConfig.learnt_tasks``: a counted task is an input and predicts nothing).
        """
        return self.step_async(batch).result()

    def step_async(self, batch: Batch) -> PendingStep:
        """``step`` without waiting for it: the update is issued, what it reports is on its way to the host, and
        ``.result()`` of the returned :class:`PendingStep` gives ``step``'s (losses, predictions). On a GPU, reading
        step t's result after issuing step t + 1 keeps the device busy while the host reads (no synchronisation
        per step); on a CPU the step is done when this returns."""
        train = self._train if self.graphs is None else self.graphs.train
        names, reported, probabilities = train(batch)
        return PendingStep(names, self.config.learnt_tasks, self.trust_gate is not None, reported, probabilities)

    def _train(self, batch: Batch) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The update of ``step``, with what it reports left on the learner's device: (names of the losses, [the
        losses, then with a trust gate its gate, teacher AUCs and student AUCs per task], the student
        probabilities [B, K]). Nothing in it waits for a GPU (tests/unit/models/test_learner.py, on a GPU)."""
        batch = batch.to(self.device)
        targets = teacher_report = None
        if self.privileged_teacher is not None:
            # the teacher's prediction before it learns from the batch, then its own step; the student's view
            student_batch = self._student_view(batch, training=True)
            _, teacher_report, teacher_probabilities = self.privileged_teacher._train(self._teacher_view(batch))
            batch = student_batch
            teacher_probabilities = teacher_probabilities.to(batch.labels.dtype)
            if self._teacher_columns is not None:  # a task the teacher does not learn keeps its label (lambda 0)
                teacher_probabilities = batch.labels.index_copy(1, self._teacher_columns, teacher_probabilities)
            blend = self._privileged_weight(batch.labels.device)
            if self.privileged_gate is not None:
                blend = blend * self.privileged_gate.open.to(blend.dtype)
            targets = torch.lerp(batch.labels, teacher_probabilities, blend)
        self.model.train()
        with self._autocast():
            outputs = self.model(batch)
        kd_scale = self.kd_scale()
        total, terms = crossdistil_loss(self.model, outputs, batch, self.pair_generator, kd_scale, targets)
        # The forward above used the pre-update weights: its student scores are the prequential predictions.
        probabilities = torch.sigmoid(outputs.student_logits.detach().float())  # read back with the losses, after
        # the update (PendingStep): on a GPU the step runs without a synchronisation
        learnt = self.model.learnt_index(probabilities.device)  # a counted task predicts nothing, reports nothing
        per_task = (lambda v: v) if learnt is None else (lambda v: v.index_select(-1, learnt))

        self._zero_grad()
        total.backward()
        rows = len(batch) if self.collective is None else self.collective.after_backward(self.model, len(batch))
        self._update(batch.numeric)
        self._update_counts(batch.categorical, batch.labels)  # after the forward: no row sees its own label
        self._seen += rows
        self._count(rows)

        tasks = self.config.learnt_tasks
        names = ["total"] + [f"{term}/{task}" for term in terms for task in tasks]
        parts = [total.detach().float().reshape(1)] + [per_task(v.detach().float()) for v in terms.values()]
        if self.trust_gate is not None:
            # Both scores were taken before this update: prequential evidence for the next steps' gate.
            self.trust_gate.update(batch.labels, outputs.student_logits, outputs.teacher_scores)
            gate = self.trust_gate  # with a gate, kd_scale is its open state (times the warm-up): never None
            parts += [per_task(kd_scale.float()), per_task(gate.teacher_auc.float()),
                      per_task(gate.student_auc.float())]
        if teacher_report is not None:  # the teacher's own BCE per task (its report: total, then bce/<task>)
            taught = self.privileged_teacher.config.tasks
            names += [f"privileged_bce/{task}" for task in taught]
            parts.append(teacher_report[1:1 + len(taught)].float())
            if self.privileged_gate is not None:  # this step's gate (1 = blended), then the scores for the next
                names += [f"privileged_gate/{task}" for task in tasks]
                parts.append(per_task(self.privileged_gate.open.float()).clone())
                self.privileged_gate.update(batch.labels, outputs.student_logits, teacher_probabilities)
        return names, torch.cat(parts), per_task(probabilities)

    def _student_view(self, batch: Batch, training: bool = False) -> Batch:
        """A batch of a learner with a privileged teacher without the privileged columns (the student's inputs);
        a ValueError where a batch to train on does not have them (one to score may have the student's alone)."""
        n, p = len(self.config.features.numeric), len(self.config.privileged)
        if batch.numeric.shape[1] == n and not training:  # scoring: the student's inputs alone
            return batch
        if batch.numeric.shape[1] != n + p:
            raise ValueError(f"a learner with a privileged teacher takes batches encoded with "
                             f"models.privileged.teacher_spec: the {n} numeric features, then the {p} privileged "
                             f"columns {list(self.config.privileged)}; this batch has {batch.numeric.shape[1]} "
                             "numeric columns")
        return dataclasses.replace(batch, numeric=batch.numeric[:, :n])

    def _teacher_view(self, batch: Batch) -> Batch:
        """A batch for the privileged teacher: the labels of the tasks it learns (``teacher_tasks``)."""
        if self._teacher_columns is None:
            return batch
        return dataclasses.replace(batch, labels=batch.labels.index_select(1, self._teacher_columns),
                                   tasks=self.privileged_teacher.config.tasks if batch.tasks else ())

    def _privileged_weight(self, device: torch.device) -> torch.Tensor:
        """lambda_k [K] on ``device``, made once per device (no copy from the host in a step)."""
        if device not in self._privileged_weights:
            self._privileged_weights[device] = torch.tensor(self.config.privileged_weights(), device=device)
        return self._privileged_weights[device]

    def _count(self, rows: int) -> None:
        """The host's counters after a step of ``rows`` rows (with synchronous ranks: the rows of every rank's
        batch); a replayed step (models.graphs) runs its device work without Python, then this."""
        self.steps += 1
        self.samples += rows

    def step_empty(self) -> None:
        """A synchronous data-parallel step with no rows on this rank (``models.distributed``, mode ``sync``):
        zero weight here, the other ranks' mean gradients applied, so the replicas stay identical."""
        if self.privileged_teacher is not None:
            raise RuntimeError("a learner with a privileged teacher trains in one process (no synchronous ranks)")
        if self.collective is None or self.collective.mode != "sync":
            raise RuntimeError("step_empty is a step of synchronous ranks (models.distributed.Collective('sync'))")
        self._zero_grad()
        rows = self.collective.after_backward(self.model, 0)
        self._update(torch.zeros(0, self.model.normalizer.mean.shape[0]))
        self._update_counts(torch.zeros(0, len(self.config.features.categorical), dtype=torch.long, device=self.device),
                            torch.zeros(0, len(self.config.tasks), device=self.device))
        self._seen += rows
        self._count(rows)

    def _zero_grad(self) -> None:
        for optimizer in self._optimizers():
            optimizer.zero_grad(set_to_none=True)

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.dense_optimizer, self.embedding_optimizer] + ([self.wide_optimizer] if self.wide_optimizer else [])

    def _update(self, numeric: torch.Tensor) -> None:
        """Every optimizer's step on the gradients (this rank's, or all ranks' mean), then the normaliser."""
        self.dense_optimizer.step()
        self.embedding_optimizer.step()
        if self.wide_optimizer is not None:
            self.wide_optimizer.step()
        self._update_normalizer(numeric)

    def _update_normalizer(self, numeric: torch.Tensor) -> None:
        """Merge a batch's numeric features into the running statistics (synchronous ranks: all ranks' batches)."""
        normalizer = self.model.normalizer
        if self.collective is None or self.collective.mode != "sync":
            normalizer.update(numeric)
        elif numeric.shape[1] > 0:
            normalizer.merge(*self.collective.merged_batch_statistics(numeric))

    def _update_counts(self, categorical: torch.Tensor, labels: torch.Tensor) -> None:
        """Count a batch's rows and labels (models/counts.py); synchronous ranks count every rank's rows."""
        counts = self.model.counts
        if counts is None:
            return
        if self.collective is None or self.collective.mode != "sync":
            counts.add(categorical, labels)
        else:
            counts.add(*self.collective.gathered_rows(categorical, labels))

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Student probabilities per learnt task (float32 [B] on CPU); changes nothing."""
        self.model.eval()
        if self.privileged_teacher is not None:
            batch = self._student_view(batch)
        with self._autocast():
            logits = self.model(batch.to(self.device)).student_logits
        probabilities = torch.sigmoid(logits.float()).cpu()
        learnt = self.config.learnt_tasks  # a counted task has no prediction
        return {task: probabilities[:, k] for k, task in enumerate(self.config.tasks) if task in learnt}

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizers (dense, embedding, wide), normaliser, calibrators, pair-sampling RNG, steps and config.

        Tensors and plain types only; ``torch.save`` it and read it back with ``weights_only=True``. Like
        torch's own state_dicts it references the live tensors: save it (or deep-copy it) before training on.
        """
        return {
            "format": "crossdistil-learner",
            "version": 1,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "dense_optimizer": self.dense_optimizer.state_dict(),
            "embedding_optimizer": self.embedding_optimizer.state_dict(),
            **({"wide_optimizer": self.wide_optimizer.state_dict()} if self.wide_optimizer is not None else {}),
            "pair_generator": self.pair_generator.get_state(),
            "steps": self.steps,
            "samples": self.samples,
            **({"trust_gate": self.trust_gate.state_dict()} if self.trust_gate is not None else {}),
            **({"privileged_teacher": self.privileged_teacher.state_dict()}
               if self.privileged_teacher is not None else {}),
            **({"privileged_gate": self.privileged_gate.state_dict()} if self.privileged_gate is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore exactly what ``state_dict`` saved. The saved config may differ from this learner's in retunable
        options only (``models.config.RETUNABLE_OPTIONS``: learning rates, loss weights, ...): the model then trains
        on with this learner's values, its optimizers' param groups included; a structural difference is a
        ``ValueError`` naming it."""
        differing = config_differences(state["config"], self.config)  # an unknown key: its old behaviour
        retuned, structural = split_differences(differing)
        if structural:
            raise ValueError(
                f"checkpoint was written with a different model config (keys {list(structural)}; saved, this: "
                + ", ".join(f"{k} {a!r} != {b!r}" for k, (a, b) in structural.items())
                + (f"; retunable, so they may differ: {list(retuned)}" if retuned else "")
                + "); build the learner with Learner.from_state_dict(state) to use the saved config, or start a new "
                "one from its weights with Learner.warm_start(state)")
        if self.graphs is not None:  # the optimizers' loaded state is in new tensors: capture again
            self.graphs.reset()
        # Every optimizer hyper-parameter as this learner's config makes it (a retuned lr), not as the checkpoint's.
        configured = [[{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
                      for optimizer in self._optimizers()]
        self.model.load_state_dict(state["model"])
        dense = self._upgraded_dense_state(state["dense_optimizer"])
        # the implementation is this learner's, whatever wrote the checkpoint (it is no part of the state: a
        # checkpoint of a foreach Adam, before fused, loads as fused, and one from a GPU runs on a CPU)
        dense = {**dense, "param_groups": [{**g, **self._adam_kernels()} for g in dense["param_groups"]]}
        self.dense_optimizer.load_state_dict(dense)
        self.embedding_optimizer.load_state_dict(state["embedding_optimizer"])
        if self.wide_optimizer is not None:
            self.wide_optimizer.load_state_dict(state["wide_optimizer"])
        for optimizer, groups in zip(self._optimizers(), configured):
            for group, values in zip(optimizer.param_groups, groups):
                group.update(values)
        self.steps = int(state["steps"])
        try:
            self.pair_generator.set_state(state["pair_generator"])
        except RuntimeError:  # saved on another kind of device (a CPU generator's state into a GPU one)
            self.pair_generator.manual_seed(self.config.seed + 1 + self.steps)
        self.samples = int(state.get("samples", 0))
        self._seen.fill_(self.samples)
        if self.trust_gate is not None and "trust_gate" in state:
            self.trust_gate.load_state_dict(state["trust_gate"])
        if self.privileged_teacher is not None:
            self.privileged_teacher.load_state_dict(state["privileged_teacher"])
        if self.privileged_gate is not None:
            self.privileged_gate.load_state_dict(state["privileged_gate"])

    def _upgraded_dense_state(self, saved: Mapping[str, Any]) -> Mapping[str, Any]:
        """A dense-optimizer state written before the calibrators had a parameter group of their own, split.

        The calibrators are the model's last two parameters, so they were the last two of the single group, with
        the same state indices they have now (indices run over all groups in order).
        """
        groups = saved["param_groups"]
        if len(groups) != 1 or len(self.dense_optimizer.param_groups) != 2:
            return saved
        old = groups[0]
        network = {**old, "params": old["params"][:-2]}
        calibrators = {**old, "params": old["params"][-2:], "lr": self.config.calibrator_lr or old["lr"]}
        return {**saved, "param_groups": [network, calibrators]}

    def warm_start(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Initialise this new learner's model from another learner's ``state_dict`` (of any config): every tensor
        that still means the same thing is copied, whole or the entries of the tasks and features kept
        (``models.warm_start.carry_over``); the rest keeps its initialisation. The optimizers (their state belongs to
        the old shapes and settings), the step and sample counts, the trust gates, the pair-sampling generator and a
        privileged teacher stay as a new learner's. Returns ``carry_over``'s report; a ``ValueError`` for a state
        that is not a CrossDistil learner's (a river or VW peer's) or whose config this version cannot read."""
        found = state.get("format")
        if found != "crossdistil-learner" or not isinstance(state.get("model"), Mapping):
            raise ValueError(f"not the state of a CrossDistil model (format {found!r}; a river or VW peer's state "
                             "cannot start one)")
        saved_config = ModelConfig.from_dict({**LEGACY_VALUES, **state["config"]})
        if self.graphs is not None:
            self.graphs.reset()
        return carry_over(saved_config, state["model"], self.config, self.model)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: str | torch.device = "cpu") -> Learner:
        """A learner built from the config saved in ``state``, with everything restored."""
        learner = cls(ModelConfig.from_dict({**LEGACY_VALUES, **state["config"]}), device=device)
        learner.load_state_dict(state)
        return learner

    def serving_state(self, onnx: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Students-only weights (no teacher towers, calibrators or teacher gates) and metadata.

        Tensors are contiguous CPU copies and the metadata is ``dict[str, str]``, so the pair can go
        straight to ``safetensors.torch.save(tensors, metadata)``. ``onnx``: also the students as an ONNX graph
        (``models.onnx_export``), a uint8 tensor ``onnx.students``, with its contract as JSON in ``metadata["onnx"]``.
        """
        with torch.device("meta"):  # only the key names are needed
            keep = set(CrossDistilModel(self.config, students_only=True).state_dict())
        tensors = {
            name: value.detach().to("cpu", copy=True).contiguous()
            for name, value in self.model.state_dict().items()
            if name in keep
        }
        metadata = {
            "format": SERVING_FORMAT,
            "version": SERVING_VERSION,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "steps": str(self.steps),
        }
        if onnx:
            with torch.device("meta"):
                students = CrossDistilModel(self.config, students_only=True)
            students.load_state_dict(tensors, strict=True, assign=True)
            graph = export_students(students.eval())
            tensors[ONNX_TENSOR] = torch.frombuffer(bytearray(graph), dtype=torch.uint8)
            metadata["onnx"] = json.dumps(describe_graph(self.config), sort_keys=True)
        return tensors, metadata


def flatten_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A nested state (``Learner.state_dict()``) as flat tensors plus a JSON skeleton, for safetensors.

    Tensors go to ``tensors`` under their path (``"model/embedding.weight"``); everything else (ints, floats,
    strings, optimizer hyper-parameters, int-keyed optimizer state) stays in ``metadata["state"]``, with dict
    keys and tuples kept exactly, so ``unflatten_state`` restores an equal structure. No pickle involved.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu", copy=True).contiguous()
            return {"tensor": path}
        if isinstance(value, Mapping):
            return {"dict": [[key, encode(v, f"{path}/{key}")] for key, v in value.items()]}
        if isinstance(value, tuple):
            return {"tuple": [encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return {"list": [encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise TypeError(f"state entry {path!r} of type {type(value).__name__} cannot be stored without pickle")

    skeleton = encode(dict(state), "")
    return tensors, {"format": "crossdistil-learner-state", "version": "1", "state": json.dumps(skeleton)}


def unflatten_state(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, Any]:
    """The inverse of ``flatten_state``."""
    if metadata.get("format") != "crossdistil-learner-state":
        raise ValueError(f"not a CrossDistil learner state (format={metadata.get('format')!r})")

    def decode(node: dict) -> Any:
        (kind, value), = node.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "dict":
            return {key: decode(v) for key, v in value}
        if kind == "tuple":
            return tuple(decode(v) for v in value)
        if kind == "list":
            return [decode(v) for v in value]
        return value

    return decode(json.loads(metadata["state"]))


class ServingModel:
    """Scores with the students only, from ``Learner.serving_state()`` output.

    >>> learner = Learner(ModelConfig(hidden_dims=(8,), tower_dims=(4,)))
    >>> serving = ServingModel.from_serving_state(*learner.serving_state())
    >>> sorted(serving.score_rows([{"user_id": "u", "item_id": "i"}]))
    ['click', 'long_view']
    """

    def __init__(self, config: ModelConfig, model: CrossDistilModel, device: torch.device) -> None:
        self.config = config
        self.model = model
        self.device = device

    @classmethod
    def from_serving_state(
        cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], device: str | torch.device = "cpu"
    ) -> ServingModel:
        if metadata.get("format") != SERVING_FORMAT or metadata.get("version") != SERVING_VERSION:
            raise ValueError(
                f"not a CrossDistil serving state (format={metadata.get('format')!r}, "
                f"version={metadata.get('version')!r}); "
                f"expected format={SERVING_FORMAT!r} version={SERVING_VERSION!r}"
            )
        # A key the exporter did not know meant its old behaviour (no wide part before it existed).
        config = ModelConfig.from_dict({**LEGACY_VALUES, **json.loads(metadata["config"])})
        tensors = {name: value for name, value in tensors.items() if name != ONNX_TENSOR}  # for other runtimes
        target = resolve_device(device)
        with torch.device("meta"):
            model = CrossDistilModel(config, students_only=True)  # no wasted random init of a large table
        model.load_state_dict(dict(tensors), strict=True, assign=True)
        model = model.to(target).eval()
        return cls(config, model, target)

    @torch.no_grad()
    def score(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Student probabilities per served task (``ModelConfig.served_tasks``: the students-only model runs those
        towers alone), float32 [B] on CPU."""
        logits = self.model(batch.to(self.device)).student_logits
        probabilities = torch.sigmoid(logits.float()).cpu()
        return {task: probabilities[:, k] for k, task in enumerate(self.config.served_tasks)}

    def score_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Encode rows (labels not needed: ``encode_for_scoring``, the same table rows and numerics as
        ``encode_rows``) and score them."""
        return self.score(encode_for_scoring(rows, self.config.features, self.config.tasks))
