"""crossdistil inspect checkpoints: folders written by the real Checkpointer and store, damaged, empty, ranked and
locked; the folder is never changed. And the serving topic's publications judged one by one (no broker here:
tests/integration/test_inspect_serving_kafka.py reads a real topic)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

from consumers.cli import main
from consumers.runtime.assembly import build_pipeline
from consumers.runtime.config import load_config
from consumers.state.checkpoints import CheckpointStore
from consumers.state.ledger import Ledger
from consumers.state.wire import encode_checkpoint
from consumers.tools.inspect import (
    EXIT_BAD_INPUT,
    EXIT_NEWEST_DAMAGED,
    EXIT_NO_CHECKPOINT,
    EXIT_OK,
    inspect_ledger,
    publications,
    render_serving,
)
from consumers.trainer.checkpointing import Checkpointer
from consumers.trainer.dead_letters import DeadLetterQueue
from consumers.trainer.kafka_io import KafkaIO
from consumers.trainer.publisher import Publisher
from consumers.trainer.ranked import RoundCheckpointer, rank_config
from tests.lock_holder import lock_held_by_another_process
from tests.unit.consumers.trainer.fakes import Consumer, FlakyProducer
from tests.unit.consumers.trainer.test_checkpointing import SMALL, checkpointer, train_one_step

pytestmark = pytest.mark.unit


def inspect_json(capsys, *argv: str) -> tuple[int, dict]:
    status = main(["inspect", "checkpoints", *argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def trainer_folder(directory: Path, *, acknowledged: bool = True, checkpoints: int = 2) -> Checkpointer:
    """``checkpoints`` checkpoints of a trainer with one option off its default, two partitions, one impression
    pending in the join; publications acknowledged by Kafka or refused."""
    producer = FlakyProducer(refuse=not acknowledged)
    producer.healthy = acknowledged
    c = checkpointer(directory, producer, "model.options.embedding_lr=0.2")
    c.pipeline.join.add_impression({"impression_id": "waiting", "ts_ms": 1_700_000_000_000, "user_id": "u",
                                    "item_id": "i", "features": {}}, ("impressions", 0))
    for n in range(1, checkpoints + 1):
        train_one_step(c)
        c.kafka.positions = {("impressions", 0): 8 * n, ("feedback", 0): 3 * n}
        assert c.write("periodic")
    return c


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``directory``: (mtime ns, size, sha256)."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            stat = path.stat()
            found[str(path.relative_to(directory))] = (stat.st_mtime_ns, stat.st_size,
                                                       hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def test_each_checkpoint_is_listed_newest_first_with_what_a_trainer_restores_from_it(tmp_path: Path, capsys) -> None:
    trainer_folder(tmp_path)
    status, report = inspect_json(capsys, str(tmp_path))
    assert status == EXIT_OK and report["status"] == "ok"
    (folder,) = report["folders"]
    assert [c["step"] for c in folder["checkpoints"]] == [2, 1] and all(c["verifies"] for c in folder["checkpoints"])
    newest = folder["checkpoints"][0]
    assert newest["file"] == "ckpt-000000000002.cdckpt" and newest["written_at"].endswith("Z")
    assert newest["size_bytes"] == (tmp_path / newest["file"]).stat().st_size
    assert newest["positions"] == {"feedback/0": 6, "impressions/0": 16}
    assert newest["join"]["pending_impressions"] == 1 and newest["join"]["counters"]["impressions"] == 1
    model = newest["model"]
    assert (model["rung"], model["backbone"], model["tasks"]) == ("mtl", "shared_bottom", ["click", "long_view"])
    assert model["differs_from_defaults"]["embedding_lr"] == [0.2, 0.05]
    assert "seed" not in model["differs_from_defaults"]  # the defaults are not listed
    assert newest["publication"] == {"version": 2, "acknowledged": True, "untrained": False}
    assert folder["publication_record"] == {"version": 2, "step": 2}
    assert folder["lock"]["held"] is False


def test_a_publication_kafka_never_acknowledged_is_said(tmp_path: Path, capsys) -> None:
    trainer_folder(tmp_path, acknowledged=False, checkpoints=1)
    status, report = inspect_json(capsys, str(tmp_path))
    assert status == EXIT_OK
    (folder,) = report["folders"]
    assert folder["publication_record"] is None
    assert folder["checkpoints"][0]["publication"] == {"version": 1, "acknowledged": False, "untrained": False}
    main(["inspect", "checkpoints", str(tmp_path)])
    assert "NOT acknowledged" in capsys.readouterr().out


@pytest.mark.parametrize("damage, why", [
    (lambda data: data[: len(data) // 2], "truncated or extended"),
    (lambda data: bytes(len(data)), "not a crossdistil checkpoint"),
    (lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], "corrupted: sha256"),
])
def test_a_damaged_newest_checkpoint_says_why_and_exits_4(tmp_path: Path, capsys, damage, why: str) -> None:
    trainer_folder(tmp_path)
    newest = tmp_path / "ckpt-000000000002.cdckpt"
    newest.write_bytes(damage(newest.read_bytes()))
    status, report = inspect_json(capsys, str(tmp_path))
    assert status == EXIT_NEWEST_DAMAGED and report["status"] == "newest_damaged"
    damaged, older = report["folders"][0]["checkpoints"]
    assert not damaged["verifies"] and why in damaged["problem"] and "positions" not in damaged
    assert older["verifies"] and older["step"] == 1
    main(["inspect", "checkpoints", str(tmp_path)])
    assert "NEWEST CHECKPOINT DOES NOT VERIFY" in capsys.readouterr().out


def test_inspecting_changes_nothing_in_the_folder(tmp_path: Path, capsys) -> None:
    """Not the damaged file (a trainer's store renames it .corrupt), not the interrupted write's temp file (the store
    removes it), not the lock file."""
    trainer_folder(tmp_path)
    newest = tmp_path / "ckpt-000000000002.cdckpt"
    newest.write_bytes(bytes(newest.stat().st_size))
    (tmp_path / ".tmp-ckpt-000000000003.cdckpt.x").write_bytes(b"half")
    (tmp_path / ".lock").write_text("12345\n")
    ledger = tmp_path / "ledger"
    Ledger(ledger, ("click",)).add(["i1"], {"click": [1]}, {"click": [0.5]})
    before = snapshot(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert main(["inspect", "checkpoints", str(tmp_path), "--ledger", str(ledger)]) == EXIT_NEWEST_DAMAGED
    capsys.readouterr()
    status, report = inspect_json(capsys, str(tmp_path), "--ledger", str(ledger))
    assert status == EXIT_NEWEST_DAMAGED
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == names
    assert report["folders"][0]["temp_files"] == [".tmp-ckpt-000000000003.cdckpt.x"]
    assert report["folders"][0]["lock"] == {"held": False, "pid": None, "recorded_pid": 12345, "problem": None}


def test_a_damaged_ledger_segment_is_named_as_the_ledger_itself_reads_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, ("click",))
    ledger.add(["a", "b"], {"click": [1, 0]}, {"click": [0.5, 0.2]})
    ledger.commit(1)
    ledger.add(["c"], {"click": [1]}, {"click": [0.9]})
    ledger.commit(2)
    newest = tmp_path / "ledger-000000000002.tsv"
    newest.write_bytes(newest.read_bytes()[:-3])  # cut inside its last row
    whole, cut = inspect_ledger(tmp_path)["segments"]
    assert (whole["step"], whole["rows"], whole["problem"]) == (1, 2, None)
    assert cut["step"] == 2 and "ledger-000000000002.tsv is damaged: truncated" in cut["problem"]


def test_an_empty_folder_has_no_checkpoint_and_exits_5(tmp_path: Path, capsys) -> None:
    status, report = inspect_json(capsys, str(tmp_path))
    assert status == EXIT_NO_CHECKPOINT and report["status"] == "no_checkpoint"
    assert report["folders"][0]["checkpoints"] == []
    assert main(["inspect", "checkpoints", str(tmp_path)]) == EXIT_NO_CHECKPOINT
    assert "no checkpoint" in capsys.readouterr().out


def test_a_folder_that_does_not_exist_is_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["inspect", "checkpoints", str(tmp_path / "nowhere")]) == EXIT_BAD_INPUT
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_the_lock_of_a_running_trainer_is_seen_without_taking_it(tmp_path: Path, capsys) -> None:
    trainer_folder(tmp_path, checkpoints=1)
    with lock_held_by_another_process(tmp_path) as holder:
        status, report = inspect_json(capsys, str(tmp_path))
        assert report["folders"][0]["lock"] == {"held": True, "pid": holder.pid, "recorded_pid": holder.pid,
                                                "problem": None}
        with pytest.raises(OSError, match="in use by another trainer"):  # still the holder's
            CheckpointStore(tmp_path, lock=True)
    assert status == EXIT_OK
    _, report = inspect_json(capsys, str(tmp_path))
    assert report["folders"][0]["lock"]["held"] is False


class RankOfTwo:
    """One rank of 2 alone: every collective returns this rank's own values (the other would agree)."""

    world_size = 2

    def __init__(self, rank: int) -> None:
        self.rank, self.info = rank, SimpleNamespace(label=f"rank {rank}/2")

    def agree(self, values):
        return list(values)

    def gather_plain(self, value):
        return [value]


def round_checkpointer(base: Path, rank: int) -> RoundCheckpointer:
    cfg = rank_config(load_config(None, env={}, overrides=SMALL + [f"checkpoint.dir='{base}'"]), rank)
    pipeline = build_pipeline(cfg)
    store = CheckpointStore(cfg.checkpoint.dir, keep_last=cfg.checkpoint.keep_last)
    producer = FlakyProducer(refuse=False)
    producer.healthy = True
    kafka = KafkaIO(Consumer(), cfg.kafka, pipeline.join, pipeline.metrics)
    pipeline.learner.mode = "sync"  # what the ranks' learner adds (models.distributed): each steps in lockstep
    return RoundCheckpointer(cfg, store, pipeline, kafka, DeadLetterQueue(producer, cfg.kafka.dead_letter_topic),
                             Publisher(producer, cfg.kafka.model_topic, store, pipeline.metrics), pipeline.metrics,
                             ranks=RankOfTwo(rank), base_dir=str(base))


def test_a_ranked_folder_is_read_rank_by_rank_and_each_ranks_newest_must_verify(tmp_path: Path, capsys) -> None:
    ledger = tmp_path / "ledger"
    for rank in (0, 1):
        c = round_checkpointer(tmp_path, rank)
        c.kafka.positions = {("impressions", rank): 10 + rank}
        assert c.write("periodic")
        rank_ledger = Ledger(ledger / f"rank-{rank}", ("click",))
        rank_ledger.add(["a", "b"], {"click": [1, 0]}, {"click": [0.5, 0.5]})
        rank_ledger.commit(1)
    status, report = inspect_json(capsys, str(tmp_path), "--ledger", str(ledger))
    assert status == EXIT_OK
    zero, one = report["folders"]
    assert (zero["rank"], one["rank"]) == (0, 1)
    assert zero["round_record"]["round"] == 1 and zero["round_record"]["world_size"] == 2
    assert zero["checkpoints"][0]["model"]["rung"] == "mtl" and one["checkpoints"][0]["model"] is None
    assert one["checkpoints"][0]["positions"] == {"impressions/1": 11}
    assert one["checkpoints"][0]["round"] == {"round": 1, "rank": 1, "world_size": 2}
    assert [s["rows"] for s in one["ledger"]["segments"]] == [2]

    (tmp_path / "rank-1" / "ckpt-000000000001.cdckpt").write_bytes(b"")
    status, report = inspect_json(capsys, str(tmp_path))
    assert status == EXIT_NEWEST_DAMAGED
    assert "shorter than the 56-byte header" in report["folders"][1]["checkpoints"][0]["problem"]


# ------------------------------------------------------------------------------------------ serving topic


def messages(version: int, chunk_size: int = 64, step: int | None = None) -> list[tuple[bytes, bytes | None]]:
    import torch

    return encode_checkpoint({"w": torch.arange(40, dtype=torch.float32)},
                             {"step": step if step is not None else 10 * version, "tasks": ["click"],
                              "published_at_ms": 1_700_000_000_000}, version=version, chunk_size=chunk_size)


def with_offsets(*batches: list) -> list[tuple[int, bytes | None, bytes | None]]:
    flat = [message for batch in batches for message in batch]
    return [(offset, key, value) for offset, (key, value) in enumerate(flat)]


def test_publications_are_judged_one_by_one_newest_first() -> None:
    first, second = messages(1), messages(2)
    compacted = [m for m in first if m[0] != b"chunk/1"]  # a chunk key overwritten, its older value compacted away
    found = publications(with_offsets(compacted, second))
    assert [p["version"] for p in found] == [2, 1]
    newest, oldest = found
    assert newest["complete"] and newest["problem"] is None and newest["step"] == 20
    assert newest["chunks"] == newest["chunks_present"] == 4 and 160 < newest["size_bytes"] <= 4 * 64
    assert (newest["wire_format"], newest["payload_format"]) == (1, "safetensors")
    assert newest["published_at"] == "2023-11-14T22:13:20Z"
    assert not oldest["complete"] and oldest["chunks_present"] == 3
    assert oldest["problem"] == "missing_chunk: 1 of 4 chunks missing: 1"


def test_a_corrupt_chunk_and_a_publication_without_its_manifest_are_named() -> None:
    first = messages(1)
    key, value = first[0]
    header = msgpack.unpackb(value)
    header["data"] = bytes([header["data"][0] ^ 1]) + header["data"][1:]  # its chunk_sha256 stays the old data's
    first[0] = (key, msgpack.packb(header, use_bin_type=True))
    found = publications(with_offsets(first, messages(2)[:-1]))
    assert [(p["version"], p["complete"]) for p in found] == [(2, False), (1, False)]
    assert found[0]["problem"].startswith("no manifest") and found[0]["chunks_present"] == found[0]["chunks"] == 4
    assert found[1]["problem"].startswith("corrupt_chunk: chunk 0")
    text = render_serving({"topic": "model", "bootstrap": "b:1", "beginning_offset": 0, "end_offset": 9,
                           "records": 9, "publications": found})
    assert "corrupt_chunk" in text and "no manifest" in text


def test_a_new_models_step_0_says_it_is_never_published(tmp_path: Path, capsys) -> None:
    """Not "NOT acknowledged ... publishes it again": a trainer restored from it publishes nothing (its random
    initialisation), only its first step's checkpoint."""
    c = checkpointer(tmp_path, FlakyProducer(refuse=False))
    c.kafka.positions = {("impressions", 0): 4}
    assert c.write("shutdown") and c.store.steps() == [0]
    status, report = inspect_json(capsys, str(tmp_path))
    assert status == EXIT_OK and report["folders"][0]["checkpoints"][0]["publication"]["untrained"] is True
    assert main(["inspect", "checkpoints", str(tmp_path)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "publication  none: a new model's step 0 (untrained) is never published" in text
    assert "NOT acknowledged" not in text
