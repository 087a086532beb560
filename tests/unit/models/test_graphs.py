"""CUDA graphs of the training step (models/graphs.py): refused with the reason where a step cannot replay; on a GPU,
replayed steps are the plain steps (losses, predictions, every weight and counter), never wait for the host, and a
loaded checkpoint captures again. That a device's step can replay at all is checked on a CPU, in every CI, by
test_replayable.py."""

from __future__ import annotations

import pytest
import torch

from models.graphs import not_replayable
from models.learner import Learner
from tests.unit.models.test_learner import make_batch, saved_and_loaded, small_config

pytestmark = pytest.mark.unit

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines only)")

# The trust gate deciding every 96 rows over 200 (due every other step), the KD warm-up ramping, forgetting counts.
GRAPHED = dict(rung="crossdistil", kd_gate_every=96, kd_gate_window=200, kd_warmup_samples=500, count_half_life=300)


def test_a_step_that_cannot_replay_is_refused_with_its_reason() -> None:
    with pytest.raises(ValueError, match="need a CUDA device; this learner is on cpu"):
        Learner(small_config()).use_cuda_graphs()
    for options, reason in ((dict(embedding_optimizer="adam"), "Adam computes its step size on the host"),
                            (dict(wide_decay=0.99), "forgetting sums or FTRL")):
        learner = Learner(small_config(**options))
        learner.device = torch.device("cuda")  # only what the reasons read: the device, the optimizers, the ranks
        assert reason in not_replayable(learner)
    learner = Learner(small_config())
    learner.device, learner.collective = torch.device("cuda"), object()
    assert "synchronous ranks" in not_replayable(learner)
    learner.collective = None
    assert not_replayable(learner) is None


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])) for k in a)


@needs_cuda
@pytest.mark.parametrize("rung", ["mtl", "crossdistil"])
def test_replayed_steps_are_the_plain_steps(rung: str) -> None:
    """Ten full batches (three plain, one captured, six replayed), a short last one (plain), three more replays."""
    options = {**GRAPHED, "rung": rung}
    plain, graphed = Learner(small_config(**options), device="cuda"), Learner(small_config(**options), device="cuda")
    graphed.use_cuda_graphs(warmup=3)
    batches = [make_batch(48 * i).to("cuda") for i in range(10)] + [make_batch(480, n=30).to("cuda")]
    batches += [make_batch(510 + 48 * i).to("cuda") for i in range(3)]
    for i, batch in enumerate(batches):
        (want_losses, want_predictions), (losses, predictions) = plain.step(batch), graphed.step(batch)
        assert close(losses, want_losses), (i, losses, want_losses)
        assert all(torch.allclose(predictions[t], want_predictions[t], rtol=1e-5, atol=1e-6) for t in predictions)
    assert graphed.graphs.replays == 10 and graphed.graphs.size == 48
    assert (graphed.steps, graphed.samples) == (plain.steps, plain.samples) == (14, 13 * 48 + 30)
    want, got = plain.state_dict(), graphed.state_dict()
    for name, tensor in want["model"].items():
        assert torch.allclose(got["model"][name].float(), tensor.float(), rtol=1e-4, atol=1e-6), name
    if rung == "crossdistil":
        gate, twin = graphed.trust_gate, plain.trust_gate
        assert (gate.position, gate.filled, gate.since_decision) == (twin.position, twin.filled, twin.since_decision)
        assert [int(gate._cursor), int(gate._filled), int(gate._since)] == [twin.position, twin.filled,
                                                                             twin.since_decision]
        assert torch.equal(gate.open, twin.open)
    for optimizer in ("embedding_optimizer", "wide_optimizer"):
        steps = [state["step"] for state in got[optimizer]["state"].values()]
        assert all(int(step) == 14 for step in steps), (optimizer, steps)


@needs_cuda
def test_a_replayed_step_never_waits_for_the_host() -> None:
    learner = Learner(small_config(**GRAPHED), device="cuda")
    learner.use_cuda_graphs(warmup=2)
    batches = [make_batch(48 * i).to("cuda") for i in range(8)]
    for batch in batches[:3]:  # two plain steps and the capture
        learner.step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [learner.step_async(batch) for batch in batches[3:]]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert learner.graphs.replays == 6 and all(v == v for v in pending[-1].result()[0].values())


@needs_cuda
def test_a_loaded_checkpoint_is_captured_again() -> None:
    plain, graphed = Learner(small_config(**GRAPHED), device="cuda"), Learner(small_config(**GRAPHED), device="cuda")
    graphed.use_cuda_graphs(warmup=1)
    for i in range(4):
        plain.step(make_batch(48 * i).to("cuda"))
        graphed.step(make_batch(48 * i).to("cuda"))
    state = saved_and_loaded(plain.state_dict())
    plain.load_state_dict(state)
    graphed.load_state_dict(state)
    assert graphed.graphs.graph is None
    for i in range(4, 9):
        assert close(graphed.step(make_batch(48 * i).to("cuda"))[0], plain.step(make_batch(48 * i).to("cuda"))[0])
    assert graphed.graphs.replays == 4
