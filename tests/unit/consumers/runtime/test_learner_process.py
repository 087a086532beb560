"""The learner in its own process (``model.separate_process``): same results, checkpoints, failures. No broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from consumers.runtime.assembly import build_pipeline, model_config
from consumers.runtime.config import config_from_dict, load_config
from consumers.runtime.learner_process import LearnerProcessError, RemoteLearner
from consumers.state.checkpoints import CheckpointStore
from consumers.state.ledger import Ledger, read_ledger
from streamer.datasets.synthetic import SyntheticDataset
from streamer.stream import merge_events

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[4]
SMALL = ["model.options={hidden_dims = [8], tower_dims = [4], embedding_dim = 4, "
         "features = {categorical = ['user_id', 'item_id'], hash_buckets = 1024}}",
         "join.attribution_window_s={click = 5, long_view = 30}", "batching.batch_size=64"]


def synthetic_events(n: int = 3000) -> list[tuple[str, dict]]:
    """(topic, event) in stream order: impressions and their feedback."""
    dataset = SyntheticDataset(n_events=n, tasks="click,long_view", seed=3)
    return [(routed.topic, routed.event) for routed in merge_events(dataset.interactions())]


def replay(cfg, events, directory: Path,
           read_behind: bool = False) -> tuple[list[dict], int, int, list[tuple[int, int]]]:
    steps_seen: list[tuple[int, int]] = []  # (step, trained samples) as each batch's hook sees them
    pipeline = build_pipeline(cfg, clock=None, ledger=Ledger(directory, cfg.model.tasks),
                        on_batch=lambda *_: steps_seen.append((pipeline.learner.steps, pipeline.trained_samples)))
    if read_behind:  # as on a GPU: each step answered after the next is issued
        pipeline.learner.read_behind = True
    try:
        for topic, event in events:
            pipeline.ingest([dict(event)], (topic, 0))
            pipeline.train_ready()
        pipeline.flush()
        pipeline.ledger.commit(pipeline.learner.steps)
        return read_ledger(directory), pipeline.trained_samples, pipeline.learner.steps, steps_seen
    finally:
        pipeline.close()


def test_a_replay_trains_the_same_when_each_step_is_read_after_the_next_is_issued(tmp_path: Path) -> None:
    events = synthetic_events()
    cfg = load_config(None, env={}, overrides=SMALL)
    inline = replay(cfg, events, tmp_path / "inline")
    behind = replay(cfg, events, tmp_path / "behind", read_behind=True)
    assert behind == inline and inline[2] > 10  # rows, samples, steps, and the step each batch's hook sees


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="needs a CUDA device (runs on GPU machines only)")
def test_a_replay_with_cuda_graphs_trains_what_plain_steps_train(tmp_path: Path) -> None:
    """``model.cuda_graphs``: the pipeline's full-size batches replay one captured step, partial ones run plain; the
    same impressions, labels and steps as plain steps, predictions equal up to float rounding."""
    events = synthetic_events()
    plain_cfg = load_config(None, env={}, overrides=SMALL + ["model.device=cuda"])
    graphs_cfg = load_config(None, env={}, overrides=SMALL + ["model.device=cuda", "model.cuda_graphs=true"])
    plain = replay(plain_cfg, events, tmp_path / "plain", read_behind=True)
    graphs = replay(graphs_cfg, events, tmp_path / "graphs", read_behind=True)
    assert graphs[1:] == plain[1:] and plain[2] > 10  # samples, steps, the step each batch's hook sees
    assert [r["impression_id"] for r in graphs[0]] == [r["impression_id"] for r in plain[0]]
    for a, b in zip(graphs[0], plain[0]):
        assert {k: v for k, v in a.items() if not k.startswith("pred/")} == \
            {k: v for k, v in b.items() if not k.startswith("pred/")}
        assert all(abs(a[k] - b[k]) < 1e-4 for k in a if k.startswith("pred/")), (a, b)


def test_a_step_read_behind_is_answered_once_done_or_once_the_next_is_issued() -> None:
    from consumers.core.pipeline import InProcessLearner
    from models.features import batch_from_columns, encode_columns

    cfg = load_config(None, env={}, overrides=SMALL)
    learner = build_pipeline(cfg, clock=None).learner.learner
    rows = [{"user_id": f"u{i % 7}", "item_id": f"i{i % 11}", "features": {}, "labels": {"click": i % 2}}
            for i in range(64)]
    batch = batch_from_columns(encode_columns(rows, model_config(cfg).features, cfg.model.tasks), cfg.model.tasks)
    port = InProcessLearner(learner, cfg.model.tasks, encode=lambda samples: batch, read_behind=True)
    port.submit([], "first")
    assert port.in_flight == 1 and port.steps == 0
    assert [c for c, _ in port.answers()] == ["first"]  # on a CPU the step is done at once: answered
    port.submit([], "second")
    port.submit([], "third")
    assert [c for c, _ in port.answers(wait=True)] == ["second", "third"] and port.steps == 3 == learner.steps


@pytest.mark.slow
def test_a_replay_trains_bit_for_bit_the_same_with_the_learner_in_its_own_process(tmp_path: Path) -> None:
    events = synthetic_events()
    inline = replay(load_config(None, env={}, overrides=SMALL), events, tmp_path / "inline")
    separate = replay(load_config(None, env={}, overrides=SMALL + ["model.separate_process=true"]), events,
                      tmp_path / "separate")
    rows, samples, steps, seen = separate
    assert samples == inline[1] > 1000 and steps == inline[2] > 10
    assert rows == inline[0]  # the same samples, labels and prequential predictions, in the same order
    assert seen == inline[3]  # each batch's hooks see its own step, as with the learner in process


@pytest.mark.slow
def test_a_checkpoint_written_by_the_learner_process_restores_the_same_model_in_process(tmp_path: Path) -> None:
    from consumers.state.learner_state import learner_state
    from models.features import encode_rows
    from models.learner import Learner

    cfg = load_config(None, env={}, overrides=SMALL)
    remote = RemoteLearner(cfg, torch_threads=1)
    try:
        rows = [[f"u{i % 7}", f"i{i}", {}, {"click": i % 2, "long_view": (i // 3) % 2}] for i in range(64)]
        for k in range(3):
            remote.submit_rows(rows, k)
        assert [context for context, _ in remote.answers(wait=True)] == [0, 1, 2]
        written = remote.write_checkpoint(str(tmp_path), 2, {"positions": [["impressions", 0, 42]]}, None)
        assert written["messages"] == [] and Path(written["path"]).name == "ckpt-000000000003.cdckpt"
        probe = [[f"u{i % 5}", f"p{i}", {}, {"click": 1, "long_view": 0}] for i in range(32)]
        remote.submit_rows(probe, "probe")
        (_, answer), = remote.answers(wait=True)
    finally:
        remote.close()
    checkpoint = CheckpointStore(tmp_path).latest()
    assert checkpoint.metadata["positions"] == [["impressions", 0, 42]]
    restored = Learner(model_config(cfg))
    restored.load_state_dict(learner_state(checkpoint.metadata, checkpoint.tensors))
    assert restored.steps == 3
    batch = encode_rows([{"user_id": r[0], "item_id": r[1], "features": r[2], "labels": r[3]} for r in probe],
                        restored.config.features, restored.config.tasks)
    _, predictions = restored.step(batch)
    scores = answer.scores
    for k, task in enumerate(restored.config.tasks):
        assert np.array_equal(predictions[task].numpy(), scores[:, k])


@pytest.mark.slow
def test_a_failure_in_the_learner_process_is_raised_with_its_traceback(tmp_path: Path) -> None:
    remote = RemoteLearner(load_config(None, env={}, overrides=SMALL), torch_threads=1)
    try:
        # a checkpoint it cannot read is that OSError, as in process (the trainer exits 2 for it, not 6)
        with pytest.raises(FileNotFoundError) as missing:
            remote.load_checkpoint(str(tmp_path / "missing.cdckpt"))
        assert not isinstance(missing.value, LearnerProcessError)
        with pytest.raises(LearnerProcessError, match="(?s)Traceback.*IndexError"):  # any other failure
            remote.submit_rows([["u"]], None)  # a row without its item, features and labels
            list(remote.answers(wait=True))
        remote.process.kill()  # the learner dies: the trainer must not wait forever, nor carry on
        remote.process.wait()
        with pytest.raises(LearnerProcessError, match="killed by signal 9"):
            remote.submit_rows([["u", "i", {}, {"click": 1, "long_view": 0}]], None)
            list(remote.answers(wait=True))
    finally:
        remote.close()


@pytest.mark.slow
def test_the_learner_process_dies_with_a_trainer_killed_by_sigkill() -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from consumers.runtime.config import load_config
        from consumers.runtime.learner_process import RemoteLearner
        remote = RemoteLearner(load_config(None, env={{}}, overrides={SMALL!r}), torch_threads=1)
        print(remote.process.pid, flush=True)
        time.sleep(600)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(trainer.stdout.readline())
        os.kill(child, 0)  # alive
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child), "the learner process outlived its trainer"
    finally:
        trainer.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"  # a zombie is dead, waiting for init to reap it
    except FileNotFoundError:
        return False


def test_the_configuration_crosses_to_the_child_unchanged() -> None:
    cfg = load_config(None, env={}, overrides=SMALL + ["model.separate_process=true", "model.seed=7"])
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.slow
def test_a_trainer_whose_learner_process_died_is_unhealthy_and_stops_with_status_6(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from consumers.trainer import command
    from consumers.trainer import daemon as trainer_module

    cfg = load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{tmp_path}'", "model.separate_process=true"])
    trainer = trainer_module.Trainer(cfg)
    try:
        assert trainer.health()[0]
        trainer.learner.process.kill()
        trainer.learner.process.wait()
        healthy, reason = trainer.health()
        assert not healthy and "learner process died" in reason
        with pytest.raises(LearnerProcessError, match="died"):
            trainer.learner.check_alive()
    finally:
        trainer.pipeline.close()

    # `crossdistil train` turns it into exit status 6 (here: the learner process cannot even start).
    def broken_start(*_args, **_kwargs):
        raise LearnerProcessError("the learner process failed:\nboom")

    monkeypatch.setattr("consumers.runtime.learner_process.RemoteLearner", broken_start)
    config = tmp_path / "trainer.toml"
    config.write_text("[model]\nseparate_process = true\n")
    args = argparse.Namespace(config=str(config), overrides=[f"checkpoint.dir={str(tmp_path)!r}"], device=None,
                              check_config=False, torch_threads=1, from_time=None, exit_when_idle=None,
                              ledger=None, log_level="WARNING")
    assert command.run(args) == 6


GATED = ["model.options={rung = 'crossdistil', hidden_dims = [8], tower_dims = [4], embedding_dim = 4, "
         "kd_gate = 'trust', kd_gate_window = 256, kd_gate_every = 64, "
         "features = {categorical = ['user_id', 'item_id'], hash_buckets = 1024}}",
         "join.attribution_window_s={click = 5, long_view = 30}", "batching.batch_size=64"]


def gate_samples(cfg, events) -> tuple[dict, int]:
    """The trust-gate series a replay leaves in the trainer's metrics, and the learner's steps."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    pipeline = build_pipeline(cfg, clock=None)
    try:
        for topic, event in events:
            pipeline.ingest([dict(event)], (topic, 0))
            pipeline.train_ready()
        pipeline.flush()
        text = generate_latest(pipeline.metrics.registry).decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) if f.name.startswith("crossdistil_kd_gate")
                   for s in f.samples if not s.name.endswith("_created")}
        return samples, pipeline.learner.steps
    finally:
        pipeline.close()


@pytest.mark.slow
def test_the_learner_process_reports_the_trust_gate_to_the_metrics_as_a_learner_in_process_does() -> None:
    events = synthetic_events(1500)
    inline, steps = gate_samples(load_config(None, env={}, overrides=GATED), events)
    separate, _ = gate_samples(load_config(None, env={}, overrides=GATED + ["model.separate_process=true"]), events)
    assert separate == inline
    counted = sum(v for (name, labels), v in inline.items()
                  if name == "crossdistil_kd_gate_steps_total" and ("task", "click") in labels)
    assert counted == steps > 10
    assert ("crossdistil_kd_gate_auc", (("role", "teacher"), ("task", "click"))) in inline  # decided at least once


@pytest.fixture
def one_torch_thread():
    """One torch thread here, as a replay runs (``crossdistil backtest --torch-threads 1``): a learner process may be
    forked only then."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_queued_requests_never_wait_on_the_learner_process_and_train_the_same(one_torch_thread) -> None:
    from consumers.runtime.processes import can_fork
    from models.features import encode_columns

    cfg = load_config(None, env={}, overrides=SMALL)
    rng = np.random.default_rng(2)
    rows = [{"user_id": f"u{rng.integers(50)}", "item_id": f"i{rng.integers(80)}", "features": {},
             "labels": {"click": int(rng.random() < 0.3), "long_view": int(rng.random() < 0.2)}}
            for _ in range(20 * 64)]
    spec = model_config(cfg).features
    batches = [encode_columns(rows[k * 64:(k + 1) * 64], spec, cfg.model.tasks) for k in range(20)]
    scores = {}
    for queue_bytes, fork in ((None, False), (1 << 30, False), (1 << 30, True)):
        remote = RemoteLearner(cfg, torch_threads=1, wait_ready=False, queue_bytes=queue_bytes, fork=fork)
        assert remote.forked == (fork and can_fork())
        taken = []

        def counted(take=remote._take_answer, taken=taken) -> None:
            taken.append(1)
            take()

        remote._take_answer = counted
        try:
            for k, columns in enumerate(batches):  # more than MAX_IN_FLIGHT (8), sent while the child starts
                remote.submit_columns(columns, k)
            submitted_waiting = len(taken)
            answers = list(remote.answers(wait=True))
        finally:
            remote.close()
        assert [context for context, _ in answers] == list(range(20))
        scores[queue_bytes, fork] = np.concatenate([answer.scores for _, answer in answers])
        # synchronous: the 9th batch waits for the 1st answer; queued: no submit waits for an answer
        assert (submitted_waiting == 0) == (queue_bytes is not None), submitted_waiting
    assert np.array_equal(scores[None, False], scores[1 << 30, False])
    assert np.array_equal(scores[None, False], scores[1 << 30, True])  # a forked child builds the same learner


@pytest.mark.slow
def test_a_forked_learner_process_is_not_forked_with_more_than_one_torch_thread() -> None:
    """torch's intra-op threads do not survive a fork (the child's pool would wait for threads it does not have):
    with more than one, the child is a new interpreter."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        remote = RemoteLearner(load_config(None, env={}, overrides=SMALL), torch_threads=1, fork=True)
        try:
            assert not remote.forked
        finally:
            remote.close()
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("fork", [False, True], ids=["new interpreter", "forked"])
def test_a_learner_process_that_dies_with_requests_queued_is_an_error_not_a_hang(one_torch_thread, fork) -> None:
    remote = RemoteLearner(load_config(None, env={}, overrides=SMALL), torch_threads=1, queue_bytes=1 << 30,
                           fork=fork)
    try:
        remote.process.kill()
        remote.process.wait()
        with pytest.raises(LearnerProcessError, match="killed by signal 9"):
            for _ in range(50):
                remote.submit_rows([["u", "i", {}, {"click": 1, "long_view": 0}]], None)
            list(remote.answers(wait=True))
    finally:
        remote.close()
