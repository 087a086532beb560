"""CUDA graphs of the training step (models/graphs.py): refused with the reason where a step cannot replay; on a GPU,
replayed steps are the plain steps (losses, predictions, every weight and counter), never wait for the host, and a
loaded checkpoint captures again. That a device's step can replay at all is checked on a CPU, in every CI, by
test_replayable.py; StepGraphs' own bookkeeping (warm-up, capture, replays, short batches, a load) runs on a CPU
here too, with a graph's semantics emulated: a capture runs the step's Python but no kernel, a replay the kernels
but no Python."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from models import graphs, host
from models.graphs import not_replayable
from models.learner import Learner
from tests.unit.models.test_learner import make_batch, saved_and_loaded, small_config
from tests.unit.models.test_replayable import host_state, named_state

pytestmark = pytest.mark.unit

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines only)")

# The trust gate deciding every 96 rows over 200 (due every other step), the KD warm-up ramping, forgetting counts.
GRAPHED = dict(rung="crossdistil", kd_gate_every=96, kd_gate_window=200, kd_warmup_samples=500, count_half_life=300)


def test_a_step_that_cannot_replay_is_refused_with_its_reason() -> None:
    with pytest.raises(ValueError, match="need a CUDA device; this learner is on cpu"):
        Learner(small_config()).use_cuda_graphs()
    for options, reason in ((dict(embedding_optimizer="adam", sparse_embeddings=False), "dense embedding table"),):
        learner = Learner(small_config(**options))
        learner.device = torch.device("cuda")  # only what the reasons read: the device, the optimizers, the ranks
        assert reason in not_replayable(learner)
    learner = Learner(small_config())
    learner.device, learner.collective = torch.device("cuda"), object()
    assert "synchronous ranks" in not_replayable(learner)
    learner.collective = None
    assert not_replayable(learner) is None
    for options in (dict(embedding_optimizer="adam"), dict(wide_decay=0.99), dict(wide="ftrl")):
        learner = Learner(small_config(**options))  # their steps count on the device, their rows in fixed shapes
        learner.device = torch.device("cuda")
        assert not_replayable(learner) is None, options


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
    state = plain.state_dict()  # each loads its own copy: loaded optimizer states share the dict's tensors
    plain.load_state_dict(saved_and_loaded(state))
    graphed.load_state_dict(saved_and_loaded(state))
    assert graphed.graphs.graph is None
    for i in range(4, 9):
        assert close(graphed.step(make_batch(48 * i).to("cuda"))[0], plain.step(make_batch(48 * i).to("cuda"))[0])
    assert graphed.graphs.replays == 4


# -- StepGraphs' own bookkeeping on a CPU, with CUDA graphs' semantics emulated ---------------------------------

class _EmulatedCuda:
    """CUDA graphs' semantics on a CPU, for StepGraphs' bookkeeping: a capture runs the step's Python (its host
    effects stay) and undoes its effect on the learner's tensors and generator (a capture runs no kernel); a replay
    runs the step again — the same operations, test_replayable.py — into the captured outputs, and undoes its host
    effects (a replay runs no Python)."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        emulated = self

        class Graph:
            def register_generator_state(self, generator: torch.Generator) -> None:
                assert generator is learner.pair_generator

            def replay(self) -> None:
                emulated.replay()

        class Capture:
            def __init__(self, graph: Graph) -> None:
                pass

            def __enter__(self) -> None:
                emulated.saved = ([t.clone() for t in named_state(learner).values()],
                                  learner.pair_generator.get_state())

            def __exit__(self, *exc: object) -> None:
                tensors, generator = emulated.saved
                with torch.no_grad():
                    for tensor, saved in zip(named_state(learner).values(), tensors, strict=True):
                        tensor.copy_(saved)
                learner.pair_generator.set_state(generator)

        class Stream:
            def __init__(self, device: object = None) -> None:
                pass

            def wait_stream(self, other: object) -> None:
                pass

        self.CUDAGraph, self.graph, self.Stream = Graph, Capture, Stream

    def replay(self) -> None:
        learner, graphs = self.learner, self.learner.graphs
        before = host_state(learner)
        _, reported, probabilities = learner._train(graphs.static)
        for name, value in before.items():  # the step's Python did not run: put the host's values back
            owner, _, attribute = name.rpartition(".")
            target = {"learner": learner, "gate": learner.trust_gate}.get(owner)
            if target is not None:
                setattr(target, attribute, value)
        graphs.outputs[1].copy_(reported)
        graphs.outputs[2].copy_(probabilities)


@pytest.mark.parametrize("size, first", [(None, []), (48, [30, 20])])
def test_the_bookkeeping_of_captures_and_replays_gives_the_plain_steps(monkeypatch: pytest.MonkeyPatch,
                                                                        size: int | None, first: list[int]) -> None:
    """On a device's paths on this CPU, with a CUDA graph's semantics emulated (a capture runs no kernel, a replay
    no Python): warm-up, capture, replays, a short batch, a load and a second capture give the plain steps' losses,
    predictions, weights and counters to the last bit. With the size given (a live trainer's batch size), short
    batches before the first full one run as plain steps and do not become the captured size."""
    monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", True)
    monkeypatch.setattr(graphs, "not_replayable", lambda learner: None)
    plain, graphed = Learner(small_config(**GRAPHED)), Learner(small_config(**GRAPHED))
    emulated = _EmulatedCuda(graphed)
    for name, value in (("CUDAGraph", emulated.CUDAGraph), ("graph", emulated.graph), ("Stream", emulated.Stream),
                        ("stream", lambda stream: nullcontext()), ("current_stream", lambda device=None: emulated),
                        ("synchronize", lambda device=None: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    emulated.wait_stream = lambda other: None
    graphed.use_cuda_graphs(warmup=2, size=size)
    sizes = first + [48] * 8 + [30] + [48] * 3
    for i, n in enumerate(sizes):
        batch = make_batch(48 * i, n=n)
        (want, want_predictions), (got, predictions) = plain.step(batch), graphed.step(batch)
        assert got == want, i
        assert all(torch.equal(predictions[t], want_predictions[t]) for t in predictions), i
    assert graphed.graphs.replays == 9 and (graphed.steps, graphed.samples) == (plain.steps, plain.samples)
    assert graphed.graphs.size == 48
    state = plain.state_dict()  # each loads its own copy: loaded optimizer states share the dict's tensors
    plain.load_state_dict(saved_and_loaded(state))
    graphed.load_state_dict(saved_and_loaded(state))
    for i in range(len(sizes), len(sizes) + 5):
        assert graphed.step(make_batch(48 * i))[0] == plain.step(make_batch(48 * i))[0], i
    assert graphed.graphs.replays == 3  # two plain steps, a capture and its replay, two replays
    want, got = named_state(plain), named_state(graphed)
    assert all(torch.equal(got[name], want[name]) for name in want)
    gate, twin = graphed.trust_gate, plain.trust_gate
    assert (gate.position, gate.filled, gate.since_decision) == (twin.position, twin.filled, twin.since_decision)
