"""bench/train_step.py keeps running and keeps its JSON shape (a tiny configuration, not a measurement)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"


def test_train_step_bench_prints_every_section_as_json(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main(["--batch-sizes", "32,64", "--table-log2", "8,10", "--default-log2", "10",
                          "--steps", "1", "--warmup", "1", "--rounds", "1", "--threads", "0"])
    result = json.loads(capsys.readouterr().out)
    assert status == 0
    assert [e["batch"] for e in result["throughput"]] == [32, 64]
    assert all(e["sparse_samples_per_s"] > 0 and e["dense_samples_per_s"] > 0 for e in result["throughput"])
    assert all(e["sparse_pipelined_samples_per_s"] > 0 for e in result["throughput"])  # steps read one behind
    assert {(b["batch"], b["optimizer"]) for b in result["breakdown"]} == {
        (32, "sparse"), (32, "dense"), (64, "sparse"), (64, "dense")}
    assert all(0.0 < b["embedding_share"] < 1.0 for b in result["breakdown"])
    assert set(result["table_sizes"]["sparse_step_ms"]) == {"2^8", "2^10"}
    assert isinstance(result["table_sizes"]["sparse_within_20_percent"], bool)


def test_set_options_reach_every_model_measured(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("bench_train_step_set", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main(["--only-compare", "--compare", "mtl", "--batch-sizes", "32", "--default-log2", "10",
                          "--steps", "1", "--rounds", "1", "--threads", "0", "--set", "count_features=",
                          "--set", "embedding_optimizer=adam", "--set", "embedding_lr=0.01"])
    result = json.loads(capsys.readouterr().out)
    assert status == 0 and result["model"]["set"] == {"count_features": "", "embedding_optimizer": "adam",
                                                      "embedding_lr": 0.01}
    made = module.config(2**10, True, False, "crossdistil")
    assert made.count_features == () and made.embedding_optimizer == "adam" and made.embedding_lr == 0.01
    assert made.rung == "crossdistil"  # the settings add to the configuration's own
    with pytest.raises(SystemExit):
        module.main(["--set", "no_equals_sign"])


@pytest.mark.slow
def test_pipeline_stages_bench_trains_every_impression_in_each_variant() -> None:
    import subprocess
    import sys

    script = BENCH.parent / "pipeline_stages.py"
    done = subprocess.run([sys.executable, str(script), "--events", "1500", "--rounds", "1", "--batch-size", "256",
                           "--variants", "gc_default,gc_tuned"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    for name in ("gc_default", "gc_tuned"):
        variant = result["variants"][name]
        assert variant["samples"] == 1500  # every impression of the stream became a trained sample
        assert set(variant["us_per_event_fastest"]) == {"decode_validate", "join", "batch_train_metrics"}
    assert result["variants"]["gc_default"]["ratio_to_gc_default"] == 1.0


def test_step_kernels_counts_the_operations_of_a_step_on_the_device_paths(capsys: pytest.CaptureFixture) -> None:
    from models import host

    spec = importlib.util.spec_from_file_location("bench_step_kernels", BENCH.parent / "step_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        status = module.main(["--batch-size", "64", "--steps", "1", "--compare", "mtl,crossdistil", "--listed", "200"])
    finally:
        host.DEVICE_PATHS_ON_CPU = False  # the bench sets it for its process
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    per_step = {name: entry["per_step"] for name, entry in result["configs"].items()}
    assert 50 < per_step["mtl"] < per_step["crossdistil"]  # the teachers, their losses and the gate add operations
    most = result["configs"]["mtl"]["most"]
    assert "aten::threshold_backward" in most and all(n > 0 for n in most.values())
    assert not set(most) & module._NOT_KERNELS


def test_compare_names_add_auxiliary_tasks_and_a_privileged_teacher(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("bench_train_step_names", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plain, aux = module.config(2**10, True, False, "mtl"), module.config(2**10, True, False, "mtl+aux+privileged")
    assert plain.tasks == ("click", "long_view") and plain.privileged == ()
    assert aux.tasks == ("click", "long_view", *module.AUX_TASKS) and aux.privileged == ("play_ms",)
    assert aux.rung == "mtl"
    status = module.main(["--only-compare", "--compare", "mtl,mtl+aux", "--batch-sizes", "32", "--default-log2",
                          "10", "--steps", "1", "--rounds", "1", "--threads", "0"])
    assert status == 0 and json.loads(capsys.readouterr().out)["configs"][0]["step_ms"].keys() == {"mtl", "mtl+aux"}
