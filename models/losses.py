"""The loss terms of docs/method.md ("Term by term"), one small function each.

Shapes: functions take [B] or [B, K] tensors and average over the batch (dim 0), so a [B, K] input gives
one value per task. ``stopgrad`` in the spec is ``.detach()`` here, applied inside the function that the
spec attaches it to, so a caller cannot forget it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ADJACENT_LEVELS = ((1, 0), (2, 1), (3, 2))
# quadruplet_loss takes the exact mean over every pair when the batch's B x B score differences number at most
# EXACT_FACTOR x max_pairs_per_level (B <= 256 with the default 4,096): one small matrix, cheaper than sampling.
EXACT_FACTOR = 16
ALL_LEVEL_PAIRS = ((1, 0), (2, 0), (3, 0), (2, 1), (3, 1), (3, 2))


def task_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE(sigmoid(s_k), y_k), mean over the batch."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)


def quadruplet_categories(own: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """c_k by (y_k, y_j): (1,1) -> 3, (1,0) -> 2, (0,1) -> 1, (0,0) -> 0; task k's label dominates."""
    return (2 * own + partner).long()


def dense_ranks(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank among the distinct values of ``values`` [B] (0 for the smallest; equal values, equal ranks).

    Shape [B] whatever the data (no ``unique``), so it runs on a device without a host synchronisation.

    >>> dense_ranks(torch.tensor([40, 7, 40, 9])).tolist()
    [2, 0, 2, 1]
    """
    ordered, order = torch.sort(values)
    new_value = torch.ones_like(ordered)
    new_value[1:] = (ordered[1:] != ordered[:-1]).long()
    ranks = torch.empty_like(order)
    ranks[order] = torch.cumsum(new_value, 0) - 1
    return ranks


class LevelPairs:
    """Pairs (a, b) of a batch's rows with c(a) = high, c(b) = low (and the same user, with ``users``), drawn
    uniformly with replacement from all such pairs, for every task and level pair at once, on the categories'
    device, in shapes fixed by the batch size.

    ``categories`` [B, K]: each task's quadruplet categories ([B]: one task). Each task's rows are sorted once by
    (category, user), so the rows of a level (of a user) are one contiguous range of that order. Without users a
    pair is a uniform row of each level. With users, a row's partners are found by ``searchsorted``; a is drawn
    with probability proportional to its number of partners, then b uniformly among them: again every pair equally
    likely. No ``nonzero``, ``.item()`` or copy to the host: an empty level gives pairs marked invalid, not a branch.
    """

    def __init__(self, categories: torch.Tensor, users: torch.Tensor | None = None) -> None:
        columns = (categories[None, :] if categories.dim() == 1 else categories.t()).contiguous()  # [K, B]
        self.categories = columns
        self.size = size = columns.shape[1]
        self.user_rank = dense_ranks(users) if users is not None else None
        keys = columns * size + self.user_rank if users is not None else columns
        self.keys, self.order = torch.sort(keys, dim=1, stable=True)
        if users is None:
            self.counts = torch.zeros(len(columns), 4, dtype=torch.long, device=columns.device).scatter_add_(
                1, columns, torch.ones_like(columns))  # [K, 4]
            self.starts = torch.cumsum(self.counts, 1) - self.counts

    def sample(self, level_pairs: Sequence[tuple[int, int]], count: int, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``count`` pairs of each task k and level pair p as row indices (a, b) [K, P, count], and whether any
        pair exists [K, P] (bool). The draws are those of one ``rand(2, count)`` per task and level pair in turn."""
        tasks, size = self.categories.shape
        draw = torch.rand(tasks, len(level_pairs), 2, count, generator=generator, device=self.categories.device,
                          dtype=torch.float64)
        if self.user_rank is None:
            def level(name: str, which: int) -> torch.Tensor:  # [K, P, 1]: a count or a start of each pair's level
                values = getattr(self, name)
                return torch.stack([values[:, pair[which]] for pair in level_pairs], dim=1).unsqueeze(2)
            high_rows, low_rows = level("counts", 0), level("counts", 1)
            a = self._pick(level("starts", 0), high_rows, draw[:, :, 0])
            b = self._pick(level("starts", 1), low_rows, draw[:, :, 1])
            return a, b, ((high_rows > 0) & (low_rows > 0)).squeeze(2)
        # the key of each row's partners at level ``low``, for every task (its sorted keys) and level pair
        wanted = torch.stack([low * size + self.user_rank for _, low in level_pairs]).expand(tasks, -1, -1)
        flat = wanted.reshape(tasks, -1).contiguous()
        first = torch.searchsorted(self.keys, flat).view(wanted.shape)  # [K, P, B]
        partners = torch.searchsorted(self.keys, flat, right=True).view(wanted.shape) - first
        is_high = torch.stack([self.categories == high for high, _ in level_pairs], dim=1)  # [K, P, B]
        cumulative = torch.cumsum(torch.where(is_high, partners, torch.zeros_like(partners)), 2)
        total = cumulative[:, :, -1:]  # [K, P, 1]
        # a: inverse CDF of the partner counts (clamped inside the batch: with total = 0 the pairs are invalid)
        a = torch.searchsorted(cumulative, (draw[:, :, 0] * total).long(), right=True).clamp(max=size - 1)
        return a, self._pick(first.gather(2, a), partners.gather(2, a), draw[:, :, 1]), (total > 0).squeeze(2)

    def _pick(self, start: torch.Tensor, rows: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
        """Rows ``order[start + floor(draw * rows)]`` [K, P, count] of each task's order, kept inside the range
        and the batch (rows may be 0)."""
        offset = torch.minimum((draw * rows).long(), (rows - 1).clamp(min=0))
        position = (start + offset).clamp(max=self.size - 1)
        return self.order.gather(1, position.flatten(1)).view(position.shape)


def decided_by_partner(high_level: int, low_level: int) -> bool:
    """True for the level pairs (3, 2) and (1, 0): task k's label is equal, only the partner's differs."""
    return high_level // 2 == low_level // 2


def quadruplet_loss(
    scores: torch.Tensor, categories: torch.Tensor, *, pairs: str = "adjacent", margin: float = 0.0,
    max_pairs_per_level: int = 4096, users: torch.Tensor | None = None, generator: torch.Generator | None = None,
    partner_weight: float = 1.0,
) -> torch.Tensor:
    """L_aux,k = sum over level pairs (l, l') of w(l, l') mean_{c(a)=l, c(b)=l'} softplus(margin - (r(a) - r(b))).

    ``scores`` [B, K] are the teacher scores r_k of every task, ``categories`` [B, K] their quadruplet categories
    c_k; the result is [K] ([B] and [B] give one task's, a 0-d tensor). ``pairs``: "adjacent" (3 -> 2 -> 1 -> 0,
    default) or "all" (the six ordered level pairs). Empty levels contribute nothing. ``users`` [B] restricts to
    same-user pairs. w = ``partner_weight`` for the pairs decided by the partner's label alone ((3, 2), (1, 0)), 1
    for the pairs about task k's own label [ours; paper: all 1].

    The cost is O(max_pairs_per_level) per task and level pair: a batch whose B x B row pairs number at most
    ``EXACT_FACTOR`` x max_pairs_per_level takes the exact mean over every pair (one B x B matrix per task for all
    level pairs); a larger one the mean over ``max_pairs_per_level`` pairs drawn uniformly with replacement
    (``LevelPairs``, with ``generator``, every task and level pair in the same few operations), an unbiased
    estimate of the same mean. Either way the shapes depend on B and K only, never on the labels, and nothing
    leaves the device.

    >>> r = torch.tensor([2.0, 0.0]); c = torch.tensor([3, 2])
    >>> round(float(quadruplet_loss(r, c)), 4)  # softplus(-(2 - 0))
    0.1269
    """
    if scores.dim() == 1:
        return quadruplet_loss(scores[:, None], categories[:, None], pairs=pairs, margin=margin,
                               max_pairs_per_level=max_pairs_per_level, users=users, generator=generator,
                               partner_weight=partner_weight)[0]
    level_pairs = ADJACENT_LEVELS if pairs == "adjacent" else ALL_LEVEL_PAIRS
    weights = {pair: partner_weight if decided_by_partner(*pair) else 1.0 for pair in level_pairs}
    level_pairs = tuple(pair for pair in level_pairs if weights[pair] != 0.0)
    tasks = scores.shape[1]
    total = scores.new_zeros(tasks)
    if not level_pairs:
        return total
    categories = categories.detach()
    size = len(scores)
    columns = scores.t()  # [K, B]
    if size * size <= EXACT_FACTOR * max_pairs_per_level:
        # Every pair: softplus of all B x B score differences of each task once, then every level pair's sum at
        # once as onehot^T S onehot ([K, 4, 4]), divided by its number of pairs (0 pairs: a sum of 0).
        differences = F.softplus(margin - (columns[:, :, None] - columns[:, None, :]))
        onehot = F.one_hot(categories.t(), 4).to(scores.dtype)  # [K, B, 4]
        if users is None:
            counts = onehot.sum(dim=1)
            pair_counts = counts[:, :, None] * counts[:, None, :]
        else:
            same_user = (users[:, None] == users[None, :]).to(scores.dtype)
            differences = differences * same_user
            pair_counts = onehot.transpose(1, 2) @ same_user @ onehot
        means = (onehot.transpose(1, 2) @ differences @ onehot) / pair_counts.clamp(min=1.0)
        for high_level, low_level in level_pairs:
            total = total + weights[(high_level, low_level)] * means[:, high_level, low_level]
        return total
    a, b, exists = LevelPairs(categories, users).sample(level_pairs, max_pairs_per_level, generator)
    picked = columns.gather(1, torch.cat([a, b], dim=1).flatten(1)).view(tasks, 2, *a.shape[1:])  # [K, 2, P, n]
    terms = F.softplus(margin - (picked[:, 0] - picked[:, 1])).mean(dim=2)  # [K, P]
    terms = torch.where(exists, terms, torch.zeros_like(terms))
    for p, pair in enumerate(level_pairs):
        total = total + weights[pair] * terms[:, p]
    return total


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass (0 = stopgrad).

    >>> x = torch.ones(2, requires_grad=True); scale_gradient(x, 0.25).sum().backward(); x.grad.tolist()
    [0.25, 0.25]
    """
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return x * scale + x.detach() * (1.0 - scale)


def platt_calibrate(scores: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """z_k = a_k * stopgrad(r_k) + b_k with a_k = softplus(alpha_k) > 0: calibration never changes the order."""
    return F.softplus(alpha) * scores.detach() + bias


def calibration_loss(calibrated_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cal,k = BCE(sigmoid(z_k), y_k), mean over the batch (trains a_k, b_k only: z_k holds stopgrad(r_k))."""
    return F.binary_cross_entropy_with_logits(calibrated_logits, labels, reduction="none").mean(dim=0)


def correct_errors(
    teacher_logits: torch.Tensor, labels: torch.Tensor, mode: str = "clamp", margin: float = 0.0, mix: float = 0.5
) -> torch.Tensor:
    """z~: the teacher logit corrected where it contradicts y_k.

    clamp: z~ = max(z, +m) if y = 1, min(z, -m) if y = 0.  mix: sigmoid(z~) = (1 - lam) sigmoid(z) + lam y.
    none: z~ = z. clamp never leaves z~ on the wrong side of y; mix does not when lam >= 0.5, and always moves
    the soft label toward y.
    """
    if mode == "none":
        return teacher_logits
    if mode == "clamp":
        positive = labels > 0.5
        return torch.where(positive, teacher_logits.clamp(min=margin), teacher_logits.clamp(max=-margin))
    if mode == "mix":
        soft = (1.0 - mix) * torch.sigmoid(teacher_logits) + mix * labels
        return torch.logit(soft, eps=1e-6)
    raise ValueError(f"unknown error-correction mode {mode!r}; use 'clamp', 'mix' or 'none'")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """L_kd,k = T^2 * BCE(sigmoid(s_k / T), stopgrad(sigmoid(z~_k / T))), mean over the batch."""
    target = torch.sigmoid(teacher_logits.detach() / temperature)
    bce = F.binary_cross_entropy_with_logits(student_logits / temperature, target, reduction="none")
    return temperature**2 * bce.mean(dim=0)
