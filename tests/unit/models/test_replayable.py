"""A device's training step is replayable: every step of one batch size issues the same operations, with the same
arguments, on the same state tensors — what a CUDA graph captures once and replays (models/graphs.py).

Checked on a CPU, on a device's paths (``models.host.DEVICE_PATHS_ON_CPU``): a dispatch mode records each operation
of ``Learner._train`` with its non-tensor arguments and, for each tensor, its shape, its dtype and which of the
learner's state tensors (a parameter, a buffer, an optimizer's state, the trust gate's ring and counters, the
warm-up's count) it lives in, or none. Two consecutive steps must record the same list. A number of the host's
that changes from step to step (a ring position as a slice bound, a step size computed in Python, a window's
filled length as a shape) shows up as a difference; so does a state tensor replaced by a new one. And a step's
Python changes nothing of the host's but what a replay advances after it (``Learner._count``, ``TrustGate.advance``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models import host
from models.learner import Learner
from models.rowwise import RowAdam
from tests.unit.models.test_learner import make_batch, small_config

pytestmark = pytest.mark.unit


def named_state(learner: Learner) -> dict[str, torch.Tensor]:
    """Every tensor a step may read or write in place, between steps, by name: the model's parameters and buffers,
    the optimizers' state, the trust gate's ring and counters, the warm-up's count."""
    named: dict[str, torch.Tensor] = {f"model.{n}": t for n, t in learner.model.state_dict(keep_vars=True).items()}
    for i, optimizer in enumerate(learner._optimizers()):
        for j, state in enumerate(optimizer.state.values()):
            named.update({f"optimizer{i}.{j}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    if learner.trust_gate is not None:
        named.update({f"gate.{k}": v for k, v in vars(learner.trust_gate).items() if isinstance(v, torch.Tensor)})
    named["learner._seen"] = learner._seen
    return named


def state_tensors(learner: Learner) -> dict[int, str]:
    """Storage address -> name of each of ``named_state``'s tensors."""
    return {t.untyped_storage().data_ptr(): name for name, t in named_state(learner).items()}


class _Recorder(TorchDispatchMode):
    def __init__(self, state: dict[int, str]) -> None:
        super().__init__()
        self.state, self.calls = state, []

    def describe(self, value: object) -> object:
        if isinstance(value, torch.Tensor):
            where = "sparse" if value.is_sparse else self.state.get(value.untyped_storage().data_ptr(), "-")
            return tuple(value.shape), value.dtype, where
        if isinstance(value, torch.Generator):
            return "generator"
        return repr(value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func.namespace != "profiler":  # torch's record_function markers: a new handle each call
            self.calls.append((str(func), tuple(self.describe(a) for a in tree_flatten((args, kwargs))[0])))
        return func(*args, **kwargs)


def recorded_steps(learner: Learner, batches: int, start: int = 1) -> list[list]:
    """The operations of ``batches`` consecutive steps of 48 rows, after one step that makes the optimizers' state."""
    learner.step(make_batch(0))
    state = state_tensors(learner)
    steps = []
    for i in range(start, start + batches):
        recorder = _Recorder(state)
        with recorder:
            learner._train(make_batch(48 * i))
        steps.append(recorder.calls)
    return steps


def first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"operation {i}: {x} then {y}"
    return f"{len(a)} then {len(b)} operations"


@pytest.mark.parametrize("options", [
    dict(rung="crossdistil"),  # the trust gate (window 200, a decision due every 48 rows: every step)
    dict(rung="crossdistil", kd_gate_every=100, kd_gate_window=500, kd_warmup_samples=700, count_half_life=300),
    dict(rung="crossdistil", kd_gate="none", backbone="mmoe", quadruplet_same_user=True),
    dict(rung="mtl"),
    dict(rung="mtl", embedding_optimizer="adam"),  # SparseAdam's step size from a step count on the device
    dict(rung="mtl", wide_decay=0.99),  # the wide part's forgetting AdaGrad on fixed shapes
    dict(rung="mtl", wide="ftrl"),
    dict(rung="direct_kd", backbone="ple"),
], ids=["trust", "gate-not-due-warm-up-forgetting", "paper-mmoe-same-user", "mtl", "mtl-adam-table",
        "mtl-forgetting-wide", "mtl-ftrl-wide", "direct_kd-ple"])
def test_each_step_of_a_devices_paths_issues_the_same_operations(options: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight steps: the gate's window fills (500 rows) and wraps, decisions come due and not, the warm-up ramps."""
    monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", True)
    config = {"kd_gate_every": 48, "kd_gate_window": 200, **options}
    steps = recorded_steps(Learner(small_config(**config)), batches=14)
    assert len(steps[0]) > 100
    for i in range(1, len(steps)):
        assert steps[i] == steps[0], f"step {i + 1} differs from step 1: {first_difference(steps[0], steps[i])}"


def test_a_step_that_is_not_replayable_is_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: a step size the host computes from its step count (as the Adam table's did before
    its count moved to the device) changes a number in the step's arguments every step, and a CPU's own gate
    writes its ring at slices that move."""
    monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", True)
    device_step = RowAdam._slots_step

    def host_step(param: torch.Tensor, state: dict, group: dict) -> None:
        device_step(param, state, group)
        param.mul_(1.0 + 1e-9 * float(state["step"]))  # a number of the host's that changes every step

    monkeypatch.setattr(RowAdam, "_slots_step", staticmethod(host_step))
    steps = recorded_steps(Learner(small_config(rung="mtl", embedding_optimizer="adam")), batches=2)
    assert steps[0] != steps[1] and "aten.mul" in first_difference(*steps)
    monkeypatch.undo()
    monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", False)
    steps = recorded_steps(Learner(small_config(rung="crossdistil", kd_gate_every=1000)), batches=2)
    assert steps[0] != steps[1] and "slice" in first_difference(*steps)


def host_state(learner: Learner) -> dict[str, object]:
    """Every plain (non-tensor) value of the learner, its gate, its optimizers and its modules: what a step's Python
    may change and a replayed step's kernels cannot."""
    plain = (int, float, bool, str, type(None))
    out: dict[str, object] = {}
    objects = {"learner": learner, "gate": learner.trust_gate, **dict(learner.model.named_modules())}
    for name, obj in objects.items():
        if obj is not None:
            out.update({f"{name}.{k}": v for k, v in vars(obj).items() if isinstance(v, plain)})
    for i, optimizer in enumerate(learner._optimizers()):
        for j, group in enumerate(optimizer.param_groups):
            out.update({f"optimizer{i}.group{j}.{k}": v for k, v in group.items() if isinstance(v, plain)})
        for j, state in enumerate(optimizer.state.values()):
            out.update({f"optimizer{i}.{j}.{k}": v for k, v in state.items() if isinstance(v, plain)})
    return out


@pytest.mark.parametrize("rung", ["crossdistil", "mtl"])
def test_a_steps_python_changes_only_what_a_replay_advances_after_it(rung: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """models/graphs.py replays a step's kernels, then runs ``Learner._count`` and ``TrustGate.advance``: on a
    device's paths a step's Python must change nothing else of the host's (or a replay would leave it behind)."""
    monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", True)
    stepped = Learner(small_config(rung=rung, kd_gate_every=100, kd_gate_window=500, kd_warmup_samples=700))
    advanced = Learner(small_config(rung=rung, kd_gate_every=100, kd_gate_window=500, kd_warmup_samples=700))
    for learner in (stepped, advanced):
        learner.step(make_batch(0))
    for i in range(1, 6):
        stepped._train(make_batch(48 * i))
        advanced._count(48)
        if advanced.trust_gate is not None:
            advanced.trust_gate.advance(48)
        assert host_state(stepped) == host_state(advanced), i
    assert (stepped.steps, stepped.samples) == (6, 288)
    assert rung == "mtl" or (stepped.trust_gate.position, stepped.trust_gate.filled) == (288, 288)
