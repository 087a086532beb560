"""The sparse-aware optimizers of the wide part and the embedding table: per-coordinate (per-row) steps.

A hashed row seen once should move by a full step and a frequent one by ever smaller steps: that is what made
``river_lr`` and Vowpal Wabbit work on KuaiRand-Pure (reports/peers_kuairand_pure), what the wide part uses
(``ModelConfig.wide``) and, with ``ModelConfig.embedding_optimizer = "adagrad"`` (the default), what the embedding
table uses.
Only the rows a batch uses change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from models.rowwise import RowAdagrad, RowAdam, _fixed_shapes, _touched_slots


class WideOptimizer(torch.optim.Optimizer):
    """Per-coordinate steps for the wide part, sparse-aware: AdaGrad whose sums forget, or FTRL-Proximal.

    ``method="adagrad"``: each weight moves by ``lr * g / (sqrt(G) + eps)`` with ``G <- decay * G + g^2``; the
    decay is applied to every sum once per step (``decay = 1`` is plain AdaGrad), so a weight not used for a while
    gets larger steps again: on a drifting stream the wide part keeps learning instead of freezing.
    ``method="ftrl"``: FTRL-Proximal (McMahan et al. 2013) with ``alpha = lr``, ``beta``, ``l1``, ``l2``; its
    sums ``n`` forget by ``decay`` likewise. Sparse gradients (an ``nn.Embedding(sparse=True)``) touch only their
    rows; the decay is one multiply of the whole table.

    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> opt = WideOptimizer([w], lr=0.1)
    >>> w.grad = torch.tensor([1.0, -4.0]); opt.step(); w.data  # AdaGrad's first step: lr * sign(g)
    tensor([-0.1000,  0.1000])
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, method: str = "adagrad", decay: float = 1.0,
                 beta: float = 1e-6, l1: float = 0.0, l2: float = 0.0, eps: float = 1e-10) -> None:
        if method not in ("adagrad", "ftrl"):
            raise ValueError(f"method must be 'adagrad' or 'ftrl', got {method!r}")
        super().__init__(params, dict(lr=lr, method=method, decay=decay, beta=beta, l1=l1, l2=l2, eps=eps))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # each step count with its parameter (a checkpoint's is on the CPU)
            for p in group["params"]:
                if torch.is_tensor(self.state[p].get("step")):
                    self.state[p]["step"] = self.state[p]["step"].to(p.device)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), device=p.device)  # counted there: a replayed step counts too
                    state["sum"] = torch.zeros_like(p)
                    if group["method"] == "ftrl":
                        state["z"] = torch.zeros_like(p)
                state["step"] += 1
                if group["decay"] < 1.0:
                    state["sum"].mul_(group["decay"])
                grad = p.grad
                if grad.is_sparse and _fixed_shapes(grad):  # a GPU's path: no wait for the host
                    self._update_slots(p, state, *_touched_slots(grad), group)
                    continue
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows, values = None, grad
                self._update(p, state, rows, values, group)

    @staticmethod
    def _update_slots(p: torch.Tensor, state: dict, rows: torch.Tensor, g: torch.Tensor, used: torch.Tensor,
                      group: dict) -> None:
        """``_update`` on ``_touched_slots``' fixed shapes: every change added with ``index_add_``, so the unused
        slots (row 0, a zero gradient, ``used = 0``) add nothing even where row 0 is a used slot too. The same values
        as ``_update``, up to the order a row's repeated gradients are summed and, for FTRL's weights, rounding
        (w + (w' - w) for w')."""
        sums = state["sum"]
        old = sums.index_select(0, rows)
        squared = g * g
        sums.index_add_(0, rows, squared)
        new = old + squared
        if group["method"] == "adagrad":
            p.index_add_(0, rows, -group["lr"] * g / (new.sqrt() + group["eps"]))
            return
        alpha, beta, l1, l2 = group["lr"], group["beta"], group["l1"], group["l2"]
        w = p.index_select(0, rows)
        z_old = state["z"].index_select(0, rows)
        z = z_old + g - (new.sqrt() - old.sqrt()) / alpha * w
        state["z"].index_add_(0, rows, (z - z_old) * used)
        shrunk = torch.sign(z) * (z.abs() - l1).clamp(min=0)
        p.index_add_(0, rows, (-shrunk / ((beta + new.sqrt()) / alpha + l2) - w) * used)

    @staticmethod
    def _update(p: torch.Tensor, state: dict, rows: torch.Tensor | None, g: torch.Tensor, group: dict) -> None:
        index = (slice(None),) if rows is None else (rows,)
        sums = state["sum"]
        old = sums[index]
        new = old + g * g
        sums[index] = new
        if group["method"] == "adagrad":
            p[index] = p[index] - group["lr"] * g / (new.sqrt() + group["eps"])
            return
        alpha, beta, l1, l2 = group["lr"], group["beta"], group["l1"], group["l2"]
        w = p[index]
        z = state["z"][index] + g - (new.sqrt() - old.sqrt()) / alpha * w
        state["z"][index] = z
        shrunk = torch.sign(z) * (z.abs() - l1).clamp(min=0)
        p[index] = -shrunk / ((beta + new.sqrt()) / alpha + l2)


def wide_optimizer(parameters: Iterable[torch.Tensor], method: str, lr: float,
                   decay: float = 1.0) -> torch.optim.Optimizer:
    """The wide part's optimizer: plain AdaGrad (``decay = 1``) is torch's on the touched rows (``RowAdagrad``), else
    ``WideOptimizer``."""
    if method == "adagrad" and decay == 1.0:
        return RowAdagrad(parameters, lr=lr)
    return WideOptimizer(parameters, lr=lr, method=method, decay=decay)


def embedding_optimizer(table: torch.Tensor, method: str, lr: float, sparse: bool) -> torch.optim.Optimizer:
    """The embedding table's optimizer: ``"adagrad"`` (per-row AdaGrad, torch's update on the touched rows), or
    ``"adam"``: SparseAdam on sparse gradients (Adam's moments, lazily, on the touched rows), dense Adam otherwise.
    Both sparse updates are ``models.rowwise``'s gathers and scatters (torch's values and state)."""
    if method == "adagrad":
        return RowAdagrad([table], lr=lr)
    return RowAdam([table], lr=lr) if sparse else torch.optim.Adam([table], lr=lr)
