"""Nothing in a training step reads a value back to the host, checked on a CPU.

The step runs a GPU's paths (``models.host.DEVICE_PATHS_ON_CPU``) under modes that fail on every operation that
makes the host wait for a GPU: a value read (``.item()``, ``bool()``, ``int()``, ``float()``), an output sized by the
data (``nonzero``, ``unique``, ``masked_select``, ``coalesce``, a boolean mask as an index), a copy out through
``.numpy()`` or ``.tolist()``. The GPU tests (test_learner.py, test_rowwise.py, test_losses.py) check the same with
CUDA's own ``sync_debug_mode`` where a GPU is; this one runs in every CI, so a read added to the step fails here
first.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from models import host
from models.learner import Learner
from models.losses import quadruplet_loss
from tests.unit.models.test_learner import make_batch, small_config

pytestmark = pytest.mark.unit

aten = torch.ops.aten
# Operations whose result (or whose output's size) the host must read from the device.
_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim,
          aten.unique_consecutive, aten._coalesce, aten.equal, aten.is_nonzero}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class HostReadError(AssertionError):
    pass


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _READS:
            raise HostReadError(f"{func} reads a value back to the host")
        if packet in _INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            raise HostReadError(f"{func} with a boolean mask sizes its output by the data")
        if packet is aten.repeat_interleave and isinstance(args[0 if func is aten.repeat_interleave.Tensor else 1],
                                                           torch.Tensor) and kwargs.get("output_size") is None:
            raise HostReadError(f"{func} with tensor repeats and no output_size reads their sum back")
        return func(*args, **kwargs)


class _NoHostCopies(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in (torch.Tensor.numpy, torch.Tensor.tolist):
            raise HostReadError(f"{func.__name__}() copies a tensor to the host")
        return func(*args, **(kwargs or {}))


class no_host_reads:
    """Within it, an operation that would make the host wait for a GPU raises HostReadError."""

    def __enter__(self) -> None:
        self.modes = [_NoHostCopies(), _NoHostReads()]
        for mode in self.modes:
            mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


@pytest.mark.parametrize("rung", ["mtl", "crossdistil", "direct_kd"])
@pytest.mark.parametrize("backbone", ["shared_bottom", "mmoe"])
@pytest.mark.parametrize("table_optimizer", ["adagrad", "adam"])
def test_a_training_step_on_a_devices_paths_reads_nothing_back(rung: str, backbone: str, table_optimizer: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``Learner._train``: everything a step does before its one read of what it reports (a gate that decides
    every step, forgetting counts, a KD warm-up; the wide part's and the table's sparse updates; at 48 rows L_aux
    samples its pairs: 48 x 48 > 16 x 16)."""
    monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", True)
    learner = Learner(small_config(rung=rung, backbone=backbone, embedding_optimizer=table_optimizer,
                                   kd_gate_every=48, kd_gate_window=200, kd_warmup_samples=500, count_half_life=300))
    learner.step(make_batch(0))  # the optimizers' first state is made once
    with no_host_reads():
        for start in (48, 96, 144, 192):
            learner._train(make_batch(start))
    losses, _ = learner.step(make_batch(240))
    assert all(value == value for value in losses.values())


@pytest.mark.parametrize("wide", [dict(wide_decay=0.99), dict(wide="ftrl")], ids=["forgetting", "ftrl"])
def test_the_wide_parts_other_optimizers_read_nothing_back(wide: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wide part's forgetting AdaGrad and FTRL (``models.optimizers.WideOptimizer``) on a device's paths: their
    sparse rows in ``_touched_slots``' fixed shapes, not ``coalesce`` (whose size is the data's)."""
    monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", True)
    learner = Learner(small_config(rung="mtl", **wide))
    learner.step(make_batch(0))
    with no_host_reads():
        for start in (48, 96):
            learner._train(make_batch(start))


@pytest.mark.parametrize("same_user", [False, True])
def test_the_sampled_and_the_exact_quadruplet_loss_read_nothing_back(same_user: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", True)
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 2, requires_grad=True)
    categories = torch.randint(0, 4, (300, 2), generator=generator)
    users = torch.randint(0, 20, (300,), generator=generator) if same_user else None
    with no_host_reads():
        for pairs in (64, 4096):  # 300 x 300 pairs: sampled above 16 x 64, exact at 16 x 4,096
            quadruplet_loss(scores, categories, users=users, pairs="all", max_pairs_per_level=pairs,
                            generator=generator).sum().backward()


def test_the_host_paths_do_read_and_are_caught() -> None:
    """The check is not vacuous: on a CPU's own paths a step reads (numpy's unique rows, a closed gate's skip)."""
    learner = Learner(small_config(rung="crossdistil"))
    learner.step(make_batch(0))
    with pytest.raises(HostReadError), no_host_reads():
        learner._train(make_batch(48))
    with pytest.raises(HostReadError, match="boolean mask"), no_host_reads():
        torch.arange(4)[torch.tensor([True, False, True, False])]
    with pytest.raises(HostReadError, match="reads a value"), no_host_reads():
        bool(torch.tensor([1.0]).any())
