"""Multi-task backbones h = B(x): Shared-Bottom, MMoE, PLE, Cross-Stitch.

A backbone returns a list of representations; head ``i`` (students 0..K-1, then teachers K..2K-1) reads
``reps[i % len(reps)]``. So Shared-Bottom returns one, Cross-Stitch K columns (the teacher of task k reads
column k), and the gated backbones one gated output per head: 2K when the model has teachers, each
auxiliary tower with a gate of its own.

``top_heads`` lets a serving model build only the student gates of the last level (see ServingModel).
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, dims: tuple[int, ...]) -> nn.Sequential:
    """Linear+ReLU layers of the given widths (the ReLU in place: the Linear's output is read by nothing else, and
    writing a fresh [B, d] tensor costs twice the memory traffic: ~3% of a CPU step at batch 4,096)."""
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), nn.ReLU(inplace=True)]
        in_dim = d
    return nn.Sequential(*layers)


class SharedBottom(nn.Module):
    """One shared MLP; every head reads the same representation."""

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...]) -> None:
        super().__init__()
        self.bottom = mlp(input_dim, hidden_dims)
        self.output_dim = hidden_dims[-1] if hidden_dims else input_dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.bottom(x)]


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts: shared experts, one softmax gate per head."""

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...], num_experts: int, heads: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(mlp(input_dim, hidden_dims) for _ in range(num_experts))
        self.gates = nn.ModuleList(nn.Linear(input_dim, num_experts) for _ in range(heads))
        self.output_dim = hidden_dims[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, D]
        return [torch.einsum("be,bed->bd", torch.softmax(g(x), dim=-1), experts) for g in self.gates]


class _CGCLevel(nn.Module):
    """One Customized Gate Control level of PLE: shared experts, specific experts and a gate per head.

    Non-final levels also gate all experts into the next level's shared input.
    """

    def __init__(
        self, input_dim: int, hidden_dims: tuple[int, ...], shared: int, specific: int, heads: int, gated_heads: int,
        final: bool,
    ) -> None:
        super().__init__()
        self.shared = nn.ModuleList(mlp(input_dim, hidden_dims) for _ in range(shared))
        # Only heads that get a gate need their specific experts on the final level.
        self.specific = nn.ModuleList(
            nn.ModuleList(mlp(input_dim, hidden_dims) for _ in range(specific)) for _ in range(gated_heads)
        )
        self.gates = nn.ModuleList(nn.Linear(input_dim, shared + specific) for _ in range(gated_heads))
        self.shared_gate = None if final else nn.Linear(input_dim, shared + specific * heads)
        self.output_dim = hidden_dims[-1]

    def forward(self, head_inputs: list[torch.Tensor],
                shared_input: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        shared = [e(shared_input) for e in self.shared]
        specific = [[e(head_inputs[h]) for e in experts] for h, experts in enumerate(self.specific)]
        outputs = []
        for h, gate in enumerate(self.gates):
            experts = torch.stack(shared + specific[h], dim=1)
            outputs.append(torch.einsum("be,bed->bd", torch.softmax(gate(head_inputs[h]), dim=-1), experts))
        shared_out = None
        if self.shared_gate is not None:
            experts = torch.stack(shared + [e for s in specific for e in s], dim=1)
            shared_out = torch.einsum("be,bed->bd", torch.softmax(self.shared_gate(shared_input), dim=-1), experts)
        return outputs, shared_out


class PLE(nn.Module):
    """Progressive Layered Extraction: ``levels`` CGC levels; heads include the auxiliary tasks."""

    def __init__(
        self, input_dim: int, hidden_dims: tuple[int, ...], shared: int, specific: int, levels: int, heads: int,
        top_heads: int,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.levels = nn.ModuleList()
        dim = input_dim
        for level in range(levels):
            final = level == levels - 1
            self.levels.append(
                _CGCLevel(dim, hidden_dims, shared, specific, heads, top_heads if final else heads, final))
            dim = hidden_dims[-1]
        self.output_dim = dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        head_inputs, shared_input = [x] * self.heads, x
        for level in self.levels:
            head_inputs, shared_input = level(head_inputs, shared_input)
        return head_inputs


class CrossStitch(nn.Module):
    """One MLP column per task, mixed after every layer by a learned K x K cross-stitch matrix.

    K columns, not 2K: the auxiliary task of k refines task k's own order (its label dominates the
    quadruplet category), so its tower reads column k.
    """

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...], tasks: int) -> None:
        super().__init__()
        self.columns = nn.ModuleList()
        for _ in range(tasks):
            dims, layers = input_dim, nn.ModuleList()
            for d in hidden_dims:
                layers.append(nn.Sequential(nn.Linear(dims, d), nn.ReLU(inplace=True)))
                dims = d
            self.columns.append(layers)
        # Start close to separate columns, with a little sharing (the usual cross-stitch init).
        off = 0.1 / max(tasks - 1, 1)
        init = torch.full((tasks, tasks), off) + torch.eye(tasks) * (0.9 - off) if tasks > 1 else torch.ones(1, 1)
        self.stitches = nn.ParameterList(nn.Parameter(init.clone()) for _ in hidden_dims)
        self.output_dim = hidden_dims[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hs = [x] * len(self.columns)
        for layer, stitch in enumerate(self.stitches):
            hs = [col[layer](h) for col, h in zip(self.columns, hs)]
            stacked = torch.stack(hs, dim=1)  # [B, K, D]
            hs = list(torch.einsum("kj,bjd->kbd", stitch, stacked).unbind(0))
        return hs


def build_backbone(
    name: str, input_dim: int, hidden_dims: tuple[int, ...], *, tasks: int, heads: int, top_heads: int,
    num_experts: int = 4, ple_shared: int = 2, ple_specific: int = 1, ple_levels: int = 1,
) -> nn.Module:
    """The backbone called ``name`` for ``heads`` heads (K or 2K), with gates built for ``top_heads`` of them."""
    if not hidden_dims:
        raise ValueError("hidden_dims must name at least one layer width")
    if name == "shared_bottom":
        return SharedBottom(input_dim, hidden_dims)
    if name == "mmoe":
        return MMoE(input_dim, hidden_dims, num_experts, top_heads)
    if name == "ple":
        return PLE(input_dim, hidden_dims, ple_shared, ple_specific, ple_levels, heads, top_heads)
    if name == "cross_stitch":
        return CrossStitch(input_dim, hidden_dims, tasks)
    raise ValueError(f"unknown backbone {name!r}")
