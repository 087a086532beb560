"""The wide (linear) part beside the deep towers: a logistic regression on the hashed features and their crosses.

Each task gets one weight per hashed categorical value (the embedding table's rows, so no second hashing), one per
hashed cross of two fields (``user_id*item_id``, ``user_id*hourmin``, ...), one per numeric feature and a bias.
Its logit is added to the student's: s_k = tower_k(h) + wide_k(x) (Wide & Deep, Cheng et al. 2016). The learner
trains it with its own per-coordinate optimizer (sparse AdaGrad, ``Learner.wide_optimizer``): a row seen once moves
by a full step, a frequent one by ever smaller steps, so a new user or video counts from its first impression,
while the deep part is still learning its embedding. Only the rows a batch uses are touched.

>>> from models.features import FeatureSpec
>>> wide = WidePart(FeatureSpec(categorical=("user_id", "item_id", "tab"), hash_buckets=1000), tasks=2,
...                 crosses=("user_id*item_id", "user_id*hourmin"))
>>> wide.crosses  # hourmin is not a feature here: that cross is left out
(('user_id', 'item_id'),)
>>> wide(torch.tensor([[1, 2, 3]]), torch.zeros(1, 0)).shape
torch.Size([1, 2])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from models.features import FeatureSpec

log = logging.getLogger(__name__)

# VW's winning interactions on KuaiRand-Pure (reports/peers_kuairand_pure): user x item and user x context; a cross
# naming a field the feature spec lacks is left out without a word, so the default fits every data set.
DEFAULT_WIDE_CROSSES = ("user_id*item_id", "user_id*hour", "user_id*hourmin", "user_id*weekday", "user_id*tab")
# (option, name) pairs already warned about: a grid builds a model per run, a learner may build a teacher beside it
_warned_absent: set[tuple[str, str]] = set()

# Cross row of columns (a, b) under cross number j: (a * _P1 + b * _P2 + (j + 1) * _P3) mod Q, Q the largest prime
# <= hash_buckets. a and b are already uniform blake2b rows, so this linear map mod a prime spreads pairs evenly;
# every product stays below 2^63 for tables up to 2^32 rows.
_P1, _P2, _P3 = 2_147_483_629, 1_000_000_007, 998_244_353


def parse_cross(text: str, option: str = "wide_crosses") -> tuple[str, str]:
    """``"user_id*item_id"`` -> ``("user_id", "item_id")``; ``option`` names the setting in the error.

    >>> parse_cross("user_id*tab")
    ('user_id', 'tab')
    """
    left, sep, right = text.partition("*")
    if not sep or not left.strip() or not right.strip() or "*" in right or left.strip() == right.strip():
        raise ValueError(f"{option}: expected FIELD*FIELD of two different fields, got {text!r}")
    return left.strip(), right.strip()


def warn_absent_once(logger: logging.Logger, option: str, absent: Sequence[str], defaults: Sequence[str],
                     spec: FeatureSpec) -> None:
    """Warn once per process about the entries of ``option`` that name a field ``spec`` lacks (``absent``, left out)
    and that a user wrote: those of ``defaults`` are meant to fit any data set, so they are left out silently."""
    named = [name for name in absent if name not in defaults and (option, name) not in _warned_absent]
    if named:
        _warned_absent.update((option, name) for name in named)
        logger.warning("%s: %s name(s) no categorical feature of the data (%s), so they are left out; check the "
                       "spelling", option, named, ", ".join(spec.categorical))


def largest_prime_at_most(n: int) -> int:
    """The largest prime <= n (n >= 2), by trial division (n is a table size, ~2^24 at most in practice).

    >>> largest_prime_at_most(2**10), largest_prime_at_most(2)
    (1021, 2)
    """
    if n < 2:
        raise ValueError(f"no prime <= {n}")
    for candidate in range(n, 1, -1):
        if candidate < 4 or (candidate % 2 and all(candidate % d for d in range(3, int(candidate**0.5) + 1, 2))):
            return candidate
    return 2  # unreachable: 2 is prime


def cross_rows(categorical: torch.Tensor, columns: Sequence[tuple[int, int]], modulus: int) -> torch.Tensor:
    """[B, X] rows in [0, modulus) of the crosses of column pairs ``columns`` of the table rows ``categorical`` [B, C]:
    cross j of columns (a, b) is (a * _P1 + b * _P2 + (j + 1) * _P3) mod ``modulus`` (a prime: see _P1). Shared by
    the wide part's cross weights and the online counts of crosses (models/counts.py)."""
    return torch.stack([torch.remainder(categorical[:, a] * _P1 + categorical[:, b] * _P2 + (j + 1) * _P3, modulus)
                        for j, (a, b) in enumerate(columns)], dim=1)


class WidePart(nn.Module):
    """Linear logits [B, K] from the batch's table rows [B, C] and standardised numerics [B, N].

    ``crosses`` are ``"field*field"`` names; a cross naming a field the spec does not have is left out (so one
    default list serves every data set; one not of ``DEFAULT_WIDE_CROSSES`` with a warning, as it may be misspelt),
    and ``crosses`` keeps those in use as pairs of names. Weights start at 0: the untrained wide part adds nothing to
    the deep model's logits.
    """

    def __init__(self, spec: FeatureSpec, tasks: int, crosses: Sequence[str] = (), sparse: bool = True) -> None:
        super().__init__()
        pairs = [parse_cross(c) for c in crosses]
        columns = {name: i for i, name in enumerate(spec.categorical)}
        self.crosses = tuple(p for p in pairs if p[0] in columns and p[1] in columns)
        absent = [c for c, p in zip(crosses, pairs) if p not in self.crosses]
        warn_absent_once(log, "wide_crosses", absent, DEFAULT_WIDE_CROSSES, spec)
        # Plain ints, not buffers: a serving model built on the meta device has nothing to restore for them.
        self.cross_columns = tuple((columns[a], columns[b]) for a, b in self.crosses)
        self.single_rows = spec.hash_buckets
        self.cross_rows = largest_prime_at_most(spec.hash_buckets) if self.crosses else 0
        self.weight = nn.Embedding(self.single_rows + self.cross_rows, tasks, sparse=sparse)
        nn.init.zeros_(self.weight.weight)
        self.numeric = nn.Parameter(torch.zeros(len(spec.numeric), tasks))
        self.bias = nn.Parameter(torch.zeros(tasks))

    def rows(self, categorical: torch.Tensor) -> torch.Tensor:
        """The weight rows [B, C + X] a batch uses: the table rows as they are, then one row per cross."""
        if not self.crosses:
            return categorical
        crossed = cross_rows(categorical, self.cross_columns, self.cross_rows)
        return torch.cat([categorical, crossed + self.single_rows], dim=1)

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        logits = self.weight(self.rows(categorical)).sum(dim=1) + self.bias
        if numeric.shape[1]:
            logits = logits + numeric @ self.numeric
        return logits

