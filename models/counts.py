"""Online count features: how often a user (a video, any field's value) has been seen so far, and with which labels.

A new user's embedding and wide weights start at nothing and learn by gradient steps; how often that user clicked
in the impressions already labelled is known exactly, and says much of their next click. For each
field of ``ModelConfig.count_features`` the model keeps, per hashed value (the embedding table's rows), a count of
labelled rows and one sum of labels per task, both forgetting with a half-life counted in rows
(``count_half_life``; 0 = never). The deep part reads, per field, ``log1p(n) / 5`` and, per task k, ``4 (rate_k -
prior_k)`` with the smoothed rate ``rate_k = (positives_k + a prior_k) / (n + a)`` (``a = count_smoothing``) and
``prior_k`` the stream's own rate so far: an unseen value reads (0, 0, ...). The factors 1/5 and 4 put both near
[-1, 1] on KuaiRand; reports/peers_kuairand_pure has the measurements.

The counts are buffers of the model: checkpointed, published and served with it (serving reads them as they were
at publication, like the weights). They change only through :meth:`CountFeatures.add`, which the learner calls after
each training step with the labels of the rows it just scored, so a prediction never sees its own label (the
prequential rule). Forgetting is lazy and exact: each row keeps the clock (rows counted) of its last update and is
scaled by ``2 ** (-age / half_life)`` when read or touched, so a step costs O(batch), never O(table).

A field may be a cross of two, ``"user_id*tab"``: each (user, tab) pair is counted apart, hashed into the field's
rows as the wide part hashes its crosses (``models.wide.cross_rows``), so the deep part reads how this user
responds in this tab, not only overall. A cross's cells are much sparser than its fields' values, so it may have
its own smoothing (``cross_smoothing``, the same ``a`` by default), and with ``cross_prior="field"`` its rate is
smoothed towards the rate of its first counted field instead of the stream's, and read as the difference:
``4 (rate_c - rate_user)`` with ``rate_c = (positives_c + a_c rate_user) / (n_c + a_c)``. The user's level is then
in the user's own inputs alone, and the cross says only how this tab differs from the user's usual (0 when the
pair is new); a cross with no counted field of its pair keeps the stream's prior.

>>> from models.features import FeatureSpec
>>> counts = CountFeatures(FeatureSpec(categorical=("user_id", "item_id"), hash_buckets=10), tasks=1,
...                        fields=("user_id", "hourmin"))
>>> counts.fields  # hourmin is not a feature here: left out (with a warning: the default list is left out silently)
('user_id',)
>>> rows = torch.tensor([[3, 7], [3, 8]])
>>> counts.add(rows, torch.tensor([[1.0], [1.0]]))
>>> counts(torch.tensor([[3, 7], [4, 7]]))  # user row 3 seen twice, clicked twice; row 4 never seen
tensor([[0.2197, 0.2857],
        [0.0000, 0.0000]])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from models.features import FeatureSpec
from models.wide import cross_rows, largest_prime_at_most, parse_cross, warn_absent_once

log = logging.getLogger(__name__)

# The fields counted by default; absent ones are left out without a word, so the default fits every data set.
# The user's rates per tab, video type and music type: +0.001..+0.006 AUC on every task of KuaiRand-Pure with no loss
# of within-user ranking as served (reports/kuairand_pure §3f, §3h); on data without those fields, the user and item.
DEFAULT_COUNT_FEATURES = ("user_id", "item_id", "user_id*tab", "user_id*video_type", "user_id*music_type")
# Where a cross's rate is smoothed to and read from: the stream's rate, or its first counted field's (module doc).
CROSS_PRIORS = ("stream", "field")
# Scales of the two kinds of input (module docstring): log1p(n) / 5 and 4 (rate - prior) span about [-1, 1].
_COUNT_SCALE, _RATE_SCALE = 0.2, 4.0


class CountFeatures(nn.Module):
    """Decayed counts and label sums per value of some categorical fields; ``width`` inputs per row of a batch.

    ``fields`` naming a field the spec lacks are left out (so one default serves every data set; one not of
    ``DEFAULT_COUNT_FEATURES`` with a warning, as it may be misspelt); ``fields`` keeps those in use, the single
    fields first, then the crosses (``"a*b"``). Buffers: ``table`` [F, R, 1 + K] (count,
    then one label sum per task), ``totals`` [1 + K] (the stream's), ``clock`` (rows counted) and, with forgetting,
    ``stamp`` [F, R] (the clock of each row's last update).
    """

    def __init__(self, spec: FeatureSpec, tasks: int, fields: Sequence[str], smoothing: float = 5.0,
                 half_life: int = 0, cross_smoothing: float | None = None, cross_prior: str = "stream") -> None:
        super().__init__()
        if cross_prior not in CROSS_PRIORS:
            raise ValueError(f"cross_prior must be one of {CROSS_PRIORS}, got {cross_prior!r}")
        known = set(spec.categorical)
        singles = tuple(f for f in fields if "*" not in f and f in known)
        pairs = [(f, parse_cross(f, "count_features")) for f in fields if "*" in f]
        crosses = tuple((name, pair) for name, pair in pairs if set(pair) <= known)
        # The single fields first, then the crosses (each order as given): field i is the table's slice i.
        self.fields = singles + tuple(name for name, _ in crosses)
        warn_absent_once(log, "count_features", [f for f in fields if f not in self.fields], DEFAULT_COUNT_FEATURES,
                         spec)
        self.columns = tuple(spec.categorical.index(f) for f in singles)
        self.cross_columns = tuple((spec.categorical.index(a), spec.categorical.index(b)) for _, (a, b) in crosses)
        # A cross's rows are (a, b) hashed into [0, Q), Q the largest prime <= the table's rows (models/wide.py).
        self.cross_modulus = largest_prime_at_most(spec.hash_buckets) if crosses else 0
        # A cross's rate leans on the rate of the first of its fields that is counted alone ("field"), or on the
        # stream's (-1: "stream", or no field of the pair counted alone).
        self.cross_parents = tuple(
            next((singles.index(f) for f in pair if f in singles), -1) if cross_prior == "field" else -1
            for _, pair in crosses)
        self.tasks = tasks
        self.smoothing = float(smoothing)
        self.cross_smoothing = self.smoothing if cross_smoothing is None else float(cross_smoothing)
        self.cross_prior = cross_prior
        self.half_life = int(half_life)
        self.register_buffer("table", torch.zeros(len(self.fields), spec.hash_buckets, 1 + tasks))
        self.register_buffer("totals", torch.zeros(1 + tasks, dtype=torch.float64))
        self.register_buffer("clock", torch.zeros((), dtype=torch.long))
        if self.half_life > 0:
            self.register_buffer("stamp", torch.zeros(len(self.fields), spec.hash_buckets, dtype=torch.long))
        # Field i's row r is row i * R + r of the flattened table: one gather and one index-add for all fields. The
        # index tensors are plain attributes, made once per device (a model loaded onto "meta" first has no buffers
        # that were not in its state_dict).
        self._index: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def width(self) -> int:
        """Inputs per row: for each field, its count and one rate per task."""
        return len(self.fields) * (1 + self.tasks)

    def _kept(self, ages: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The share of a value left after ``ages`` rows: 2 ** (-age / half_life), in ``dtype`` (the table's)."""
        return torch.exp2(ages.to(torch.float64) * (-1.0 / self.half_life)).to(dtype or self.table.dtype)

    def _flat_rows(self, categorical: torch.Tensor) -> torch.Tensor:
        """[B * F] rows of the flattened table, row-major (row b's fields in order)."""
        columns, offsets, _ = self._indices(categorical.device)
        rows = categorical.index_select(1, columns)
        if self.cross_columns:
            rows = torch.cat([rows, cross_rows(categorical, self.cross_columns, self.cross_modulus)], dim=1)
        return (rows + offsets).reshape(-1)

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The single fields' columns, each field's first row in the flattened table, and each cross's parent
        (``cross_parents`` with -1 as the slot after the singles, where the stream's prior goes), on ``device``."""
        index = self._index.get(device)
        if index is None:
            singles = len(self.columns)
            index = self._index[device] = (
                torch.tensor(self.columns, dtype=torch.long, device=device),
                torch.arange(len(self.fields), device=device) * self.table.shape[1],
                torch.tensor([singles if p < 0 else p for p in self.cross_parents], dtype=torch.long, device=device))
        return index

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        stamp = self.stamp.view(-1) if self.half_life > 0 else None
        return self.table.view(-1, 1 + self.tasks), stamp

    def forward(self, categorical: torch.Tensor) -> torch.Tensor:
        """[B, width] inputs for the table rows ``categorical`` [B, C] (nothing of this batch's labels)."""
        if not self.fields:
            return categorical.new_zeros((categorical.shape[0], 0), dtype=self.table.dtype)
        table, stamp = self._flat()
        rows = self._flat_rows(categorical)
        values = table.index_select(0, rows)
        if stamp is not None:
            values = values * self._kept(self.clock - stamp.index_select(0, rows)).unsqueeze(1)
        totals = self.totals.to(self.table.dtype)
        prior = (totals[1:] + 1.0) / (totals[0] + 2.0)
        if self.cross_columns and (self.cross_prior == "field" or self.cross_smoothing != self.smoothing):
            return self._inputs_with_crosses(values.view(categorical.shape[0], len(self.fields), 1 + self.tasks), prior)
        n = values[:, :1]
        rate = (values[:, 1:] + self.smoothing * prior) / (n + self.smoothing)
        inputs = torch.cat([torch.log1p(n) * _COUNT_SCALE, (rate - prior) * _RATE_SCALE], dim=1)
        return inputs.reshape(categorical.shape[0], self.width)

    def _inputs_with_crosses(self, values: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """forward's inputs from ``values`` [B, F, 1 + K] when the crosses have their own smoothing or prior."""
        singles = len(self.columns)
        n, positives = values[..., :1], values[..., 1:]
        rate = (positives[:, :singles] + self.smoothing * prior) / (n[:, :singles] + self.smoothing)
        # each cross's centre: its parent's rate, or (the slot after the singles) the stream's prior
        centres = torch.cat([rate, prior.expand(values.shape[0], 1, -1)], dim=1)
        centre = centres.index_select(1, self._indices(values.device)[2])
        cross = (positives[:, singles:] + self.cross_smoothing * centre) / (n[:, singles:] + self.cross_smoothing)
        rates = torch.cat([rate - prior, cross - centre], dim=1)
        inputs = torch.cat([torch.log1p(n) * _COUNT_SCALE, rates * _RATE_SCALE], dim=2)
        return inputs.reshape(values.shape[0], self.width)

    @torch.no_grad()
    def add(self, categorical: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Count the rows ``categorical`` [B, C] with their ``labels`` [B, K]; ``weights`` [B] (1 each when None)
        lets padding rows of a gathered batch count for nothing (``models.distributed``). The clock advances by the
        weights' sum. Rows appearing twice in a batch are counted twice; no host synchronisation."""
        if categorical.shape[0] == 0:
            return
        w = torch.ones(labels.shape[0], dtype=self.table.dtype, device=labels.device) if weights is None \
            else weights.to(self.table.dtype)
        values = torch.cat([w.unsqueeze(1), labels.to(self.table.dtype) * w.unsqueeze(1)], dim=1)
        rows_in = w.sum().round().long()
        clock = self.clock + rows_in
        if self.fields:
            table, stamp = self._flat()
            rows = self._flat_rows(categorical)
            if stamp is not None:
                # Bring the touched rows to the new clock first (duplicates write the same value), then add.
                aged = table.index_select(0, rows) * self._kept(clock - stamp.index_select(0, rows)).unsqueeze(1)
                table.index_copy_(0, rows, aged)
                stamp.index_put_((rows,), clock)  # not index_fill_, which reads a tensor value back to the host
            table.index_add_(0, rows, values.repeat_interleave(len(self.fields), dim=0))
        if self.half_life > 0:
            self.totals.mul_(self._kept(rows_in, torch.float64))
        self.totals.add_(values.sum(dim=0).to(torch.float64))
        self.clock.copy_(clock)

    @torch.no_grad()
    def settle(self, clock: torch.Tensor) -> None:
        """Bring every row to ``clock`` (forgetting applied up to it): O(table), for merging ranks' counts."""
        if self.half_life > 0:
            self.table.mul_(self._kept(clock - self.stamp).unsqueeze(-1))
            self.stamp.fill_(int(clock))
            self.totals.mul_(self._kept(clock - self.clock, torch.float64))
        self.clock.copy_(clock)

    def extra_repr(self) -> str:
        life = f"half_life={self.half_life}" if self.half_life else "never forgets"
        crosses = (f", cross_smoothing={self.cross_smoothing}, cross_prior={self.cross_prior}"
                   if self.cross_columns else "")
        return f"fields={self.fields}, smoothing={self.smoothing}{crosses}, {life}"

