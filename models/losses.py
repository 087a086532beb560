"""The loss terms of docs/method.md ("Term by term"), one small function each.

Shapes: functions take [B] or [B, K] tensors and average over the batch (dim 0), so a [B, K] input gives
one value per task. ``stopgrad`` in the spec is ``.detach()`` here, applied inside the function that the
spec attaches it to, so a caller cannot forget it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ADJACENT_LEVELS = ((1, 0), (2, 1), (3, 2))
ALL_LEVEL_PAIRS = ((1, 0), (2, 0), (3, 0), (2, 1), (3, 1), (3, 2))


def task_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE(sigmoid(s_k), y_k), mean over the batch."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)


def quadruplet_categories(own: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """c_k by (y_k, y_j): (1,1) -> 3, (1,0) -> 2, (0,1) -> 1, (0,0) -> 0; task k's label dominates."""
    return (2 * own + partner).long()


def sample_level_pairs(
    high: torch.Tensor, low: torch.Tensor, max_pairs: int, generator: torch.Generator | None = None,
    users: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (a, b) with a from ``high`` and b from ``low`` (index tensors on CPU).

    All pairs when there are at most ``max_pairs``; otherwise ``max_pairs`` pairs drawn uniformly, with
    replacement, from all of them, so the cost stays O(max_pairs). With ``users`` (the user of every row of
    the batch) only same-user pairs count.
    """
    if users is None:
        low_sorted = low
        start = torch.zeros(len(high), dtype=torch.long)
        count = torch.full((len(high),), len(low), dtype=torch.long)
    else:
        # Sort the low side by user; each high row's partners are then one contiguous range.
        low_users, order = torch.sort(users[low])
        low_sorted = low[order]
        high_users = users[high]
        start = torch.searchsorted(low_users, high_users, right=False)
        count = torch.searchsorted(low_users, high_users, right=True) - start
    total = int(count.sum())
    if total == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    if total <= max_pairs:
        a = torch.repeat_interleave(high, count)
        first = torch.repeat_interleave(start, count)
        offset = torch.arange(total) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        return a, low_sorted[first + offset]
    # P(high row i) proportional to its number of partners, then a uniform partner: uniform over pairs.
    pick = torch.multinomial(count.double(), max_pairs, replacement=True, generator=generator)
    offset = (torch.rand(max_pairs, generator=generator, dtype=torch.float64) * count[pick]).long()
    offset = torch.minimum(offset, count[pick] - 1)
    return high[pick], low_sorted[start[pick] + offset]


def decided_by_partner(high_level: int, low_level: int) -> bool:
    """True for the level pairs (3, 2) and (1, 0): task k's label is equal, only the partner's differs."""
    return high_level // 2 == low_level // 2


def quadruplet_loss(
    scores: torch.Tensor, categories: torch.Tensor, *, pairs: str = "adjacent", margin: float = 0.0,
    max_pairs_per_level: int = 4096, users: torch.Tensor | None = None, generator: torch.Generator | None = None,
    partner_weight: float = 1.0,
) -> torch.Tensor:
    """L_aux,k = sum over level pairs (l, l') of w(l, l') mean_{c(a)=l, c(b)=l'} softplus(margin - (r(a) - r(b))).

    ``scores`` [B] are one task's teacher scores r_k, ``categories`` [B] its quadruplet categories c_k.
    ``pairs``: "adjacent" (3 -> 2 -> 1 -> 0, default) or "all" (the six ordered level pairs). Empty levels
    contribute nothing. ``users`` restricts to same-user pairs. w = ``partner_weight`` for the pairs decided by
    the partner's label alone ((3, 2), (1, 0)), 1 for the pairs about task k's own label [ours; paper: all 1].

    >>> r = torch.tensor([2.0, 0.0]); c = torch.tensor([3, 2])
    >>> round(float(quadruplet_loss(r, c)), 4)  # softplus(-(2 - 0))
    0.1269
    """
    level_pairs = ADJACENT_LEVELS if pairs == "adjacent" else ALL_LEVEL_PAIRS
    cats = categories.detach().cpu()
    users_cpu = users.detach().cpu() if users is not None else None
    members = {level: torch.nonzero(cats == level).flatten() for level in range(4)}
    total = scores.new_zeros(())
    for high_level, low_level in level_pairs:
        high, low = members[high_level], members[low_level]
        weight = partner_weight if decided_by_partner(high_level, low_level) else 1.0
        if len(high) == 0 or len(low) == 0 or weight == 0.0:
            continue
        if users_cpu is None and len(high) * len(low) <= max_pairs_per_level:
            # Every pair, as one [high, low] matrix of differences: no index tensors to build (same value).
            high_scores, low_scores = scores[high.to(scores.device)], scores[low.to(scores.device)]
            differences = high_scores[:, None] - low_scores[None, :]
            total = total + weight * F.softplus(margin - differences).mean()
            continue
        a, b = sample_level_pairs(high, low, max_pairs_per_level, generator, users_cpu)
        if len(a) == 0:
            continue
        a, b = a.to(scores.device), b.to(scores.device)
        total = total + weight * F.softplus(margin - (scores[a] - scores[b])).mean()
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
