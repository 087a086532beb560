"""The step API: every backbone x rung trains, checkpoints round-trip exactly, serving has students only."""

from __future__ import annotations

import io

import pytest
import torch

from models.config import BACKBONES, RUNGS, ModelConfig
from models.features import FeatureSpec, encode_rows
from models.learner import Learner, ServingModel, flatten_state, resolve_device, unflatten_state
from models.rowwise import RowAdagrad, RowAdam
from tests.gpu_steps import train_without_host_sync

pytestmark = pytest.mark.unit

TASKS = ("click", "long_view")


def small_config(**overrides) -> ModelConfig:
    base = dict(
        tasks=TASKS,
        features=FeatureSpec(categorical=("user_id", "item_id", "hour"), numeric=("watch",), hash_buckets=2**10),
        hidden_dims=(16,), tower_dims=(8,), num_experts=2, max_pairs_per_level=16, seed=11, rung="crossdistil",
    )
    base.update(overrides)
    return ModelConfig(**base)


def make_batch(start: int, n: int = 48):
    rows = [
        {"user_id": f"u{i % 5}", "item_id": f"i{i % 37}", "features": {"hour": i % 24, "watch": 1000 * (i % 13)},
         "labels": {"click": int(i % 3 != 0), "long_view": int(i % 4 == 1)}}
        for i in range(start, start + n)
    ]
    return encode_rows(rows, small_config().features, TASKS)


def saved_and_loaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# Under the default options: teachers also learn their task's BCE, distilling teacher rungs report the trust gate.
GATE = {"gate"}  # and teacher_auc, student_auc from the gate's first decision on
EXPECTED_TERMS = {
    "mtl": {"bce"}, "aux": {"bce", "aux", "teacher_bce"}, "kd": {"bce", "aux", "teacher_bce", "kd"} | GATE,
    "cal": {"bce", "aux", "teacher_bce", "kd", "cal"} | GATE,
    "crossdistil": {"bce", "aux", "teacher_bce", "kd", "cal"} | GATE, "direct_kd": {"bce", "kd"},
}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("rung", RUNGS)
def test_every_backbone_and_rung_runs_a_step_with_the_rungs_terms(backbone: str, rung: str) -> None:
    learner = Learner(small_config(backbone=backbone, rung=rung, ple_levels=2))
    losses, predictions = learner.step(make_batch(0))
    assert {name.split("/")[0] for name in losses} - {"total"} == EXPECTED_TERMS[rung]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert set(predictions) == set(TASKS) and predictions["click"].shape == (48,)


def test_step_returns_the_predictions_made_before_the_update() -> None:
    learner = Learner(small_config())
    batch = make_batch(0)
    before = learner.predict(batch)
    _, predictions = learner.step(batch)
    after = learner.predict(batch)
    assert torch.equal(predictions["click"], before["click"])
    assert not torch.equal(after["click"], before["click"])


@pytest.mark.parametrize(("method", "optimizer"), [("adagrad", RowAdagrad), ("adam", RowAdam)])
def test_sparse_step_changes_only_the_embedding_rows_the_batch_uses(method: str, optimizer: type) -> None:
    learner = Learner(small_config(embedding_optimizer=method))
    assert isinstance(learner.embedding_optimizer, optimizer)
    batch = make_batch(0)
    before = learner.model.embedding.weight.detach().clone()
    learner.step(batch)
    changed = (learner.model.embedding.weight.detach() != before).any(dim=1)
    used = torch.zeros_like(changed)
    used[batch.categorical.flatten()] = True
    assert torch.equal(changed, used)


def test_same_seed_gives_identical_training_and_another_seed_does_not() -> None:
    def run(seed: int) -> list[dict[str, float]]:
        learner = Learner(small_config(seed=seed))
        return [learner.step(make_batch(48 * i))[0] for i in range(3)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_checkpoint_round_trip_reproduces_predictions_bit_for_bit() -> None:
    learner = Learner(small_config())
    for i in range(3):
        learner.step(make_batch(48 * i))
    restored = Learner.from_state_dict(saved_and_loaded(learner.state_dict()))
    batch = make_batch(1000)
    for task in TASKS:
        assert torch.equal(restored.predict(batch)[task], learner.predict(batch)[task])


def test_training_on_after_reload_equals_uninterrupted_training() -> None:
    # A small pair cap makes pair sampling random, so the checkpointed generator state matters too.
    uninterrupted = Learner(small_config(max_pairs_per_level=4))
    interrupted = Learner(small_config(max_pairs_per_level=4))
    for i in range(3):
        uninterrupted.step(make_batch(48 * i))
        interrupted.step(make_batch(48 * i))
    state = saved_and_loaded(interrupted.state_dict())
    del interrupted
    resumed = Learner(small_config(max_pairs_per_level=4))  # same config, fresh object
    resumed.load_state_dict(state)
    for i in range(3, 6):
        assert uninterrupted.step(make_batch(48 * i))[0] == resumed.step(make_batch(48 * i))[0]
    for (name, a), (_, b) in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_fused_dense_adam_trains_as_the_foreach_one_did_and_loads_its_checkpoints() -> None:
    fused = Learner(small_config())
    foreach = Learner(small_config())
    assert all(g["fused"] and not g["foreach"] for g in fused.dense_optimizer.param_groups)
    for group in foreach.dense_optimizer.param_groups:  # the implementation before fused (no state yet)
        group["fused"], group["foreach"] = None, True
    # the same update; the fused kernel may round a few elements differently (KuaiRand AUCs moved by <= 3e-4,
    # docs/performance.md), so the parameters are compared within float rounding
    for i in range(20):
        fused.step(make_batch(48 * i))
        foreach.step(make_batch(48 * i))
    for (name, a), (_, b) in zip(fused.model.state_dict().items(), foreach.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    resumed = Learner(small_config())
    resumed.load_state_dict(saved_and_loaded(foreach.state_dict()))  # a checkpoint written with foreach
    assert all(g["fused"] and not g["foreach"] for g in resumed.dense_optimizer.param_groups)
    for i in range(20, 23):
        resumed.step(make_batch(48 * i))
        foreach.step(make_batch(48 * i))
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(), foreach.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_full_state_round_trips_through_safetensors_and_training_continues_identically() -> None:
    from safetensors.torch import load, save

    uninterrupted = Learner(small_config(max_pairs_per_level=4))
    interrupted = Learner(small_config(max_pairs_per_level=4))
    for i in range(2):
        uninterrupted.step(make_batch(48 * i))
        interrupted.step(make_batch(48 * i))
    tensors, metadata = flatten_state(interrupted.state_dict())
    resumed = Learner.from_state_dict(unflatten_state(load(save(tensors, metadata)), metadata))
    for i in range(2, 4):
        assert uninterrupted.step(make_batch(48 * i))[0] == resumed.step(make_batch(48 * i))[0]


def test_loading_a_checkpoint_of_another_config_names_the_differences() -> None:
    state = Learner(small_config()).state_dict()
    with pytest.raises(ValueError, match="backbone"):
        Learner(small_config(backbone="mmoe")).load_state_dict(state)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_serving_export_scores_like_the_students_and_holds_no_teacher_parameters(backbone: str) -> None:
    learner = Learner(small_config(backbone=backbone, ple_levels=1))
    for i in range(2):
        learner.step(make_batch(48 * i))
    tensors, metadata = learner.serving_state()
    assert not [n for n in tensors if n.startswith(("teacher_towers", "calibrator"))]
    if backbone == "mmoe":  # K gates remain of the 2K trained (the teachers' are dropped)
        assert sorted(n for n in tensors if n.startswith("backbone.gates")) == [
            "backbone.gates.0.bias", "backbone.gates.0.weight", "backbone.gates.1.bias", "backbone.gates.1.weight"]
    if backbone == "ple":
        assert not [n for n in tensors if n.startswith(("backbone.levels.0.gates.2", "backbone.levels.0.specific.2"))]
    serving = ServingModel.from_serving_state(tensors, metadata)
    batch = make_batch(500)
    for task in TASKS:
        assert torch.equal(serving.score(batch)[task], learner.predict(batch)[task])


def test_two_level_ple_serving_keeps_the_lower_teacher_experts_the_students_depend_on() -> None:
    learner = Learner(small_config(backbone="ple", ple_levels=2))
    learner.step(make_batch(0))
    tensors, metadata = learner.serving_state()
    assert any(n.startswith("backbone.levels.0.specific.3") for n in tensors)  # feeds level 1's shared gate
    assert not any(n.startswith(("backbone.levels.1.specific.2", "backbone.levels.1.gates.2")) for n in tensors)
    batch = make_batch(200)
    assert torch.equal(ServingModel.from_serving_state(tensors, metadata).score(batch)["long_view"],
                       learner.predict(batch)["long_view"])


def test_serving_state_survives_safetensors() -> None:
    from safetensors.torch import load, save

    learner = Learner(small_config())
    learner.step(make_batch(0))
    tensors, metadata = learner.serving_state()
    blob = save(tensors, metadata)
    serving = ServingModel.from_serving_state(load(blob), metadata)
    rows = [{"user_id": "u1", "item_id": "i3", "features": {"hour": 4, "watch": 12.5}}]
    assert torch.equal(serving.score_rows(rows)["click"],
                       learner.predict(encode_rows(rows, learner.config.features, TASKS))["click"])


def test_serving_state_of_another_format_is_refused() -> None:
    tensors, metadata = Learner(small_config()).serving_state()
    with pytest.raises(ValueError, match="not a CrossDistil serving state"):
        ServingModel.from_serving_state(tensors, {**metadata, "format": "something-else"})


def test_auto_device_picks_cuda_only_when_available() -> None:
    learner = Learner(small_config(), device="auto")
    assert learner.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("rung", ["mtl", "crossdistil"])
def test_steps_read_one_behind_equal_steps_read_at_once(rung: str) -> None:
    """step_async(t + 1) issued before step t's result is read: the same losses and predictions as step."""
    at_once, behind = (Learner(small_config(rung=rung, kd_gate_every=48, kd_gate_window=200)) for _ in range(2))
    batches = [make_batch(48 * i) for i in range(5)]
    expected = [at_once.step(batch) for batch in batches]
    pending = [behind.step_async(batches[0])]
    for batch in batches[1:]:
        pending.append(behind.step_async(batch))
    results = [p.result() for p in pending]
    assert results[-1] is pending[-1].result()  # read once
    for (losses, predictions), (want_losses, want_predictions) in zip(results, expected):
        assert losses == want_losses
        assert all(torch.equal(predictions[t], want_predictions[t]) for t in TASKS)
    assert "teacher_auc/click" in results[-1][0] if rung == "crossdistil" else "gate/click" not in results[-1][0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines only)")
@pytest.mark.parametrize("rung", ["mtl", "crossdistil", "direct_kd"])
@pytest.mark.parametrize("backbone", ["shared_bottom", "mmoe"])
def test_a_training_step_never_waits_for_the_host_on_a_gpu(rung: str, backbone: str) -> None:
    """Everything ``Learner.step`` does before its one read of the reported values (the gate deciding included,
    with forgetting counts, a warm-up and the embedding table's AdaGrad and Adam) under sync_debug_mode "error"."""
    for table_optimizer in ("adagrad", "adam"):
        learner = Learner(small_config(rung=rung, backbone=backbone, kd_gate_every=48, kd_gate_window=200,
                                       kd_warmup_samples=500, count_half_life=300,
                                       embedding_optimizer=table_optimizer), device="cuda")
        batches = [make_batch(48 * i).to("cuda") for i in range(6)]
        for batch in batches[:2]:  # per-device caches and the optimizers' first state are made once
            learner.step(batch)
        train_without_host_sync(learner, batches[2:])
        losses, _ = learner.step(batches[0])
        assert all(value == value for value in losses.values())  # and it still reports numbers


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_a_cuda_device_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="sees no CUDA device"):
        Learner(small_config(), device="cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("device", ["gpu", "GPU", "cuda:x", "cuda:-1", "", None])
def test_a_misspelt_device_is_a_value_error_naming_the_accepted_devices(device) -> None:
    with pytest.raises(ValueError, match=r"expected auto, cpu, cuda, cuda:N \(N the GPU's index\) or mps"):
        resolve_device(device)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="a machine without an Apple GPU")
def test_mps_without_an_apple_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="torch sees no Apple GPU"):
        resolve_device("mps")
