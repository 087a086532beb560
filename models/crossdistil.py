"""The CrossDistil model: embeddings -> backbone -> student towers (s_k) and auxiliary teacher towers (r_k),
plus the Platt calibrators (alpha_k, b_k), and ``crossdistil_loss``, the total loss of docs/method.md.

Read top to bottom: ``CrossDistilModel.forward`` gives (s, r); ``crossdistil_loss`` turns them into
L = sum_k [BCE(s_k, y_k) + alpha_k L_kd,k + beta_k L_aux,k + L_cal,k], with the terms each rung switches on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from models.backbones import build_backbone, mlp
from models.config import ModelConfig
from models.counts import CountFeatures
from models.features import Batch
from models.host import on_host
from models.losses import (
    calibration_loss,
    correct_errors,
    kd_loss,
    platt_calibrate,
    quadruplet_categories,
    quadruplet_loss,
    scale_gradient,
    task_bce,
)
from models.wide import WidePart


class RunningNormalizer(nn.Module):
    """Standardises numeric features with running mean and variance (buffers, so they are checkpointed).

    Statistics change only through ``update`` (the learner calls it after each training step), never in
    ``forward``, so scoring is a pure function of the state.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch into the running statistics (Chan et al. parallel update)."""
        if x.shape[1] == 0 or x.shape[0] == 0:
            return
        x = x.double()
        batch_mean = x.mean(dim=0)
        self.merge(float(x.shape[0]), batch_mean, ((x - batch_mean) ** 2).sum(dim=0))

    @torch.no_grad()
    def merge(self, n: float, batch_mean: torch.Tensor, batch_m2: torch.Tensor) -> None:
        """Merge the statistics (rows, mean, sum of squared deviations) of a batch seen elsewhere."""
        if n <= 0:
            return
        batch_mean = batch_mean.to(self.mean)
        batch_m2 = batch_m2.to(self.m2)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta**2 * (self.count * n / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 0:
            return x
        var = torch.where(self.count > 1, self.m2 / self.count.clamp(min=1), torch.ones_like(self.m2))
        out = (x.double() - self.mean) / torch.sqrt(var + 1e-6)
        return out.clamp(-8.0, 8.0).to(x.dtype)  # a wild value cannot blow up a step


@dataclass
class Outputs:
    """student_logits s [B, K]; teacher_scores r [B, K] or None when the rung has no teachers."""

    student_logits: torch.Tensor
    teacher_scores: torch.Tensor | None


class CrossDistilModel(nn.Module):
    """Students (and, when the rung needs them, auxiliary teachers and calibrators) on one backbone.

    ``students_only=True`` builds the serving subset: no teacher towers, no calibrators, no last-level
    teacher gates; its state_dict keys are a subset of the full model's. It scores the served tasks alone
    (``ModelConfig.served_tasks``): its ``student_logits`` have one column per served task, the auxiliary tasks'
    towers are kept (the state is the trainer's) but not run.
    """

    def __init__(self, config: ModelConfig, students_only: bool = False) -> None:
        super().__init__()
        self.config = config
        k = len(config.tasks)
        spec = config.features
        self.embedding = nn.Embedding(spec.hash_buckets, config.embedding_dim, sparse=config.sparse_embeddings)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.normalizer = RunningNormalizer(len(spec.numeric))
        # Towers, gates, heads and wide logits exist for the learnt tasks alone (a counted task is an input, not an
        # output): tower i is task learnt[i]'s. ``learnt`` is None when every task is learnt (no reindexing).
        n = len(config.learnt_tasks)
        self.learnt = [config.tasks.index(t) for t in config.learnt_tasks] if n != k else None
        # The wide (linear) part: its logits add to the students' (served), never to the teachers'.
        self.wide = (WidePart(spec, n, config.wide_crosses, sparse=config.sparse_embeddings)
                     if config.wide != "none" else None)
        # Online counts and label rates of some fields (models/counts.py): more inputs of the backbone.
        self.counts = (CountFeatures(spec, k, config.count_features, config.count_smoothing, config.count_half_life,
                                     cross_smoothing=config.count_cross_smoothing or None,
                                     cross_prior=config.count_cross_prior)
                       if config.count_features else None)
        input_dim = len(spec.categorical) * config.embedding_dim + len(spec.numeric) + (
            self.counts.width if self.counts is not None else 0)
        heads = 2 * n if config.has_teachers else n
        build = partial(build_backbone, config.backbone, input_dim, config.hidden_dims, tasks=n,
                        num_experts=config.num_experts, ple_shared=config.ple_shared_experts,
                        ple_specific=config.ple_specific_experts, ple_levels=config.ple_levels)
        before = torch.random.get_rng_state()
        self.backbone = build(heads=heads, top_heads=n if students_only else heads)
        if heads != n and not students_only:
            self._start_like_mtl(build, before)
        dim = self.backbone.output_dim
        self.student_towers = nn.ModuleList(_tower(dim, config.tower_dims) for _ in range(n))
        # the towers a students-only model runs: the served tasks' (None: all, as a trained model needs)
        self.served = ([config.learnt_tasks.index(t) for t in config.served_tasks]
                       if students_only and config.served_tasks != config.tasks else None)
        if config.uses_partner and not students_only:
            # Column j = partner(k) of each task k, for the teachers and the loss; derived, so not in the state_dict.
            self.register_buffer("partner_index", torch.tensor([config.tasks.index(config.partner_of(t))
                                                                 for t in config.tasks]), persistent=False)
        self.has_teachers = config.has_teachers and not students_only
        if self.has_teachers:
            # A label-aware teacher reads y_j next to the representation: one more input.
            teacher_dim = dim + (1 if config.teacher_partner_input else 0)
            self.teacher_towers = nn.ModuleList(_tower(teacher_dim, config.tower_dims) for _ in range(n))
            if config.teacher_residual:
                # A residual teacher starts as its student (r_k = s_k) and learns only what it adds.
                for tower in self.teacher_towers:
                    nn.init.zeros_(tower[-1].weight)
                    nn.init.zeros_(tower[-1].bias)
        if config.calibrates and not students_only:
            # alpha_k starts where a_k = softplus(alpha_k) = 1, b_k = 0: z_k = r_k at first.
            self.calibrator_alpha = nn.Parameter(torch.full((k,), math.log(math.e - 1.0)))
            self.calibrator_bias = nn.Parameter(torch.zeros(k))
        self._loss_weights: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._learnt_index: dict[torch.device, torch.Tensor] = {}

    def _start_like_mtl(self, build: Callable[..., nn.Module], before: torch.Tensor) -> None:
        """Give the student side of the backbone the initial weights an ``mtl`` model of the same seed has.

        The gated backbones build the teachers' gates (and PLE their specific experts) among the students' own,
        so the same seed would start the students elsewhere than in ``mtl`` and a paired difference to ``mtl``
        would carry initialisation noise. So the global generator is rewound, the K-head backbone of ``mtl`` is
        built, its tensors copied into every parameter of the same name and shape, and the generator left where
        ``mtl``'s is: the student towers and everything after them start as in ``mtl`` too. (A PLE of more than
        one level mixes the teachers' experts into the students' path: there it is close, not exact.)
        """
        torch.random.set_rng_state(before)
        tasks = len(self.config.learnt_tasks)
        plain = build(heads=tasks, top_heads=tasks).state_dict()
        with torch.no_grad():
            for name, value in self.backbone.state_dict().items():
                if name in plain and plain[name].shape == value.shape:
                    value.copy_(plain[name])

    def loss_weights(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha_k (``kd_weight``), beta_k (``aux_weight``), w_k (``bce_weight``) and the learnt tasks' mask (1, 0 for
        a counted task, which has no loss: its other weights are 0 too) [K] on ``device``, made once per device: a
        tensor made from a list at every step would be a copy from the host that a GPU step waits for."""
        if device not in self._loss_weights:
            cfg = self.config
            mask = [1.0 if t in cfg.learnt_tasks else 0.0 for t in cfg.tasks]
            weights = [[w * m for w, m in zip(cfg.task_weights(name), mask)]
                       for name in ("kd_weight", "aux_weight", "bce_weight")]
            self._loss_weights[device] = tuple(torch.tensor(v, device=device) for v in weights + [mask])
        return self._loss_weights[device]

    def learnt_index(self, device: torch.device) -> torch.Tensor | None:
        """The learnt tasks' columns [L] on ``device`` (None: every task is learnt), made once per device."""
        if self.learnt is None:
            return None
        if device not in self._learnt_index:
            self._learnt_index[device] = torch.tensor(self.learnt, device=device)
        return self._learnt_index[device]

    def forward(self, batch: Batch) -> Outputs:
        return self.scores(batch.categorical, self.normalizer(batch.numeric), batch.labels)

    def scores(self, categorical: torch.Tensor, numeric: torch.Tensor, labels: torch.Tensor | None = None) -> Outputs:
        """Outputs from the table rows [B, C] and the standardised numerics [B, N] (the ONNX graph's path too)."""
        x = self._inputs(categorical, numeric)
        wide = self.wide(categorical, numeric) if self.wide is not None else None
        return self.heads(x, labels, wide)

    def embed(self, batch: Batch) -> torch.Tensor:
        """The backbone's input: hashed embeddings [B, C * D], the normalised numerics [B, N], the counts' inputs."""
        return self._inputs(batch.categorical, self.normalizer(batch.numeric))

    def _inputs(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        parts = [self.embedding(categorical).flatten(1), numeric]
        if self.counts is not None:
            parts.append(self.counts(categorical).to(numeric.dtype))
        return torch.cat(parts, dim=1)

    def heads(self, x: torch.Tensor, labels: torch.Tensor | None = None, wide: torch.Tensor | None = None) -> Outputs:
        """Backbone and towers on an embedded input (split from ``embed`` so benchmarks can time each side).

        ``labels`` [B, K] are read only by a label-aware teacher (``teacher_partner_input``): the teacher of
        task k sees its partner's label y_j, privileged information that exists in training, never in serving
        (serving builds the students only). ``wide`` [B, L]: the wide part's logits of the learnt tasks, added to the
        students'.
        """
        reps = self.backbone(x)
        n = len(self.student_towers)
        run = range(n) if self.served is None else self.served
        s = torch.cat([self.student_towers[i](reps[i % len(reps)]) for i in run], dim=1)
        if wide is not None:
            s = s + (wide if self.served is None else wide[:, self.served]).to(s.dtype)
        r = None
        if self.has_teachers:
            # The teachers' gradient into the shared backbone is scaled (teacher_backbone_grad; 0 = stopgrad).
            grad = self.config.teacher_backbone_grad
            inputs = [scale_gradient(reps[(n + i) % len(reps)], grad) for i in range(n)]
            if self.config.teacher_partner_input:
                if labels is None:
                    raise ValueError("a label-aware teacher (teacher_partner_input) needs the batch's labels")
                partner_labels = labels[:, self.partner_index].to(x.dtype)
                columns = range(n) if self.learnt is None else self.learnt
                inputs = [torch.cat([h, partner_labels[:, i:i + 1]], dim=1) for i, h in zip(columns, inputs)]
            r = torch.cat([tower(h) for tower, h in zip(self.teacher_towers, inputs)], dim=1)
            if self.config.teacher_residual:
                r = r + s.detach()
            r = self._all_tasks(r)
        return Outputs(student_logits=self._all_tasks(s), teacher_scores=r)

    def _all_tasks(self, learnt: torch.Tensor) -> torch.Tensor:
        """[B, K] from the learnt tasks' [B, L] logits: a counted task's logit is 0 (it has no tower). A students-only
        model's served columns stay as they are."""
        if self.learnt is None or self.served is not None:
            return learnt
        out = learnt.new_zeros(learnt.shape[0], len(self.config.tasks))
        return out.index_copy(1, self.learnt_index(learnt.device), learnt)


def _tower(in_dim: int, dims: tuple[int, ...]) -> nn.Sequential:
    return nn.Sequential(mlp(in_dim, dims), nn.Linear(dims[-1] if dims else in_dim, 1))


def crossdistil_loss(
    model: CrossDistilModel, outputs: Outputs, batch: Batch, generator: torch.Generator | None = None,
    kd_scale: torch.Tensor | None = None, targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its per-task terms ``{"bce"|"kd"|"aux"|"teacher_bce"|"cal": [K] tensor}`` for the rung.

    Gradient flow (docs/method.md): BCE and KD reach the students; L_aux (and gamma * BCE(r_k, y_k) when
    ``teacher_task_weight`` = gamma > 0) the teachers; L_cal only the calibrators (platt_calibrate stops r_k);
    KD targets are stopped (kd_loss), so KD never moves a teacher or a calibrator. The backbone gets
    gradients through the students and, scaled by ``teacher_backbone_grad``, the teachers.
    ``kd_scale`` [K] multiplies alpha_k (the learner's KD warm-up and trust gate; None = 1). ``targets`` [B, K]:
    the students' BCE targets where they are not the labels (a privileged teacher's blend, models/privileged.py);
    everything else reads the labels.
    """
    cfg = model.config
    y = batch.labels
    s = outputs.student_logits.float()
    partner = model.partner_index if cfg.uses_partner else None
    terms: dict[str, torch.Tensor] = {"bce": task_bce(s, y if targets is None else targets.float())}

    if cfg.has_teachers:
        r = outputs.teacher_scores.float()
        categories = quadruplet_categories(y, y[:, partner])
        users = batch.user if cfg.quadruplet_same_user else None
        learnt = model.learnt_index(y.device)  # a counted task has no teacher: no pairs to sample for it
        terms["aux"] = quadruplet_loss(
            r if learnt is None else r.index_select(1, learnt),
            categories if learnt is None else categories.index_select(1, learnt),
            pairs=cfg.quadruplet_pairs, margin=cfg.quadruplet_margin,
            max_pairs_per_level=cfg.max_pairs_per_level, users=users, generator=generator,
            partner_weight=cfg.quadruplet_partner_weight,
        )
        if learnt is not None:
            terms["aux"] = r.new_zeros(r.shape[1]).index_copy(0, learnt, terms["aux"])
        if cfg.teacher_task_weight > 0:
            terms["teacher_bce"] = task_bce(r, y)
        if cfg.calibrates:
            z = platt_calibrate(r, model.calibrator_alpha, model.calibrator_bias)
            terms["cal"] = calibration_loss(z, y)
            teacher_logits = z
        else:
            teacher_logits = r  # rung "kd": uncalibrated sigmoid(r_k)
        if cfg.distills:
            # Every alpha_k scaled to 0 (a closed trust gate): the term is measured, not differentiated. A GPU
            # differentiates it anyway (its gradient is 0): reading the gate would make the step wait for the device.
            idle = kd_scale is not None and on_host(kd_scale.device) and not bool(kd_scale.any())
            with torch.no_grad() if idle else contextlib.nullcontext():
                corrected = correct_errors(teacher_logits, y, cfg.correction_mode, cfg.correction_margin,
                                           cfg.correction_mix)
                terms["kd"] = kd_loss(s, corrected, cfg.kd_temperature)
    elif cfg.rung == "direct_kd":
        terms["kd"] = kd_loss(s, s[:, partner], cfg.kd_temperature)  # student j's logit, stopped inside kd_loss

    alpha, beta, w, learnt_mask = model.loss_weights(y.device)
    if kd_scale is not None:
        alpha = alpha * kd_scale.to(y.device)
    total = (w * terms["bce"]).sum()
    if "kd" in terms:
        total = total + (alpha * terms["kd"]).sum()
    if "aux" in terms:
        total = total + (beta * terms["aux"]).sum()
    if "teacher_bce" in terms:  # the mask: a counted task's teacher and calibrator learn nothing (all ones else)
        total = total + cfg.teacher_task_weight * (learnt_mask * terms["teacher_bce"]).sum()
    if "cal" in terms:
        total = total + (learnt_mask * terms["cal"]).sum()
    return total, terms
