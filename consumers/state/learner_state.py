"""The learner's part of a trainer checkpoint, and the publication built from the same model.

Written and read by whichever process holds the learner: the trainer itself, or its learner process
(``consumers.runtime.learner_process``). One code path either way.

A trainer checkpoint (``consumers.state.checkpoints``) holds, besides the stream side the trainer adds
(positions, join and batcher state, publication bookkeeping):

* ``trainer_format``: 2. The learner's tensors are the file's tensors, named by their path in
  ``Learner.state_dict()``; ``learner`` is the plain skeleton ``models.learner.flatten_state`` makes (format
  ``crossdistil-learner-state``: dict keys and tuples kept exactly).
* ``trainer_format`` 1 (written before the trainer's units were split out of one module): the skeleton
  replaced each tensor by ``{"__tensor__": name}`` inside the msgpack metadata. Still read, so a trainer
  upgraded in place resumes from its last checkpoint; never written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from consumers.state.checkpoints import Checkpoint, CheckpointError, CheckpointStore, decode_checkpoint_file
from consumers.state.tensors import non_finite_tensors
from consumers.state.wire import encode_checkpoint, newer_format
from models.config import ModelConfig
from models.learner import flatten_state, unflatten_state

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
_V1_TENSOR = "__tensor__"
# The learner's weights and optimizer state, by their path in ``flatten_state``: what a model that diverged fills
# with NaN. Not the gates' statistics (``/trust_gate/``: an AUC not measured yet is NaN on purpose).
WEIGHTS = ("/model/", "/dense_optimizer/", "/embedding_optimizer/", "/wide_optimizer/", "/privileged_teacher/")


class ModelDiverged(RuntimeError):
    """The learner's weights or optimizer state hold NaN or infinite values (training diverged: a learning rate
    too high, a loss that overflowed). Such a model must be neither checkpointed (a restart would resume it) nor
    published (serving would score NaN): ``write_learner_checkpoint`` raises this before writing anything."""


def check_format(checkpoint: Checkpoint) -> None:
    """Raise ``CheckpointError`` when ``checkpoint`` was not written by a trainer this code can resume."""
    found = checkpoint.metadata.get("trainer_format")
    if newer_format(found, CHECKPOINT_FORMAT):
        # A newer crossdistil's checkpoint (a rollback): starting a new model would throw its training away.
        raise CheckpointError(f"{checkpoint.path} was written by a newer version of crossdistil (trainer_format "
                              f"{found}; this one reads {', '.join(map(str, READABLE_FORMATS))}): run that version or "
                              "a later one to resume it; it is left as it is")
    if found not in READABLE_FORMATS:
        raise CheckpointError(f"{checkpoint.path} was not written by this trainer (trainer_format {found!r}, "
                              f"readable: {list(READABLE_FORMATS)}); point checkpoint.dir at an empty directory")


def learner_state(metadata: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Learner.state_dict()`` inside a trainer checkpoint's metadata and tensors (either format)."""
    if metadata.get("trainer_format") == 1:
        return _v1_state(metadata["learner"], tensors)
    return unflatten_state(tensors, metadata["learner"])


def saved_config(metadata: Mapping[str, Any]) -> Any:
    """The learner's ``config`` entry inside a trainer checkpoint's metadata, read without its tensors (None where
    there is none, as for a learner that keeps no config)."""
    learner = metadata.get("learner")
    if metadata.get("trainer_format") == 1:
        return learner.get("config") if isinstance(learner, Mapping) else None
    if not isinstance(learner, Mapping) or not isinstance(learner.get("state"), str):
        return None
    entries = dict(json.loads(learner["state"]).get("dict", []))
    if "config" not in entries:
        return None
    return unflatten_state({}, {**learner, "state": json.dumps(entries["config"])})  # a config holds no tensor


def _v1_state(skeleton: Any, tensors: Mapping[str, Any]) -> Any:
    """``trainer_format`` 1's skeleton: each tensor was ``{"__tensor__": name}``, tuples were lists."""
    if isinstance(skeleton, Mapping):
        if set(skeleton) == {_V1_TENSOR}:
            return tensors[skeleton[_V1_TENSOR]]
        return {k: _v1_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_v1_state(v, tensors) for v in skeleton]
    return skeleton


def check_finite(learner_tensors: Mapping[str, Any], steps: int) -> None:
    """Raise ``ModelDiverged`` when the weights or optimizer state among ``learner_tensors`` (``flatten_state``'s
    tensors of the learner after ``steps`` steps) hold NaN or infinite values."""
    broken = non_finite_tensors({name: t for name, t in learner_tensors.items() if name.startswith(WEIGHTS)})
    if broken is not None:
        raise ModelDiverged(f"the model of step {steps:,} holds values that are not finite numbers: {broken}")


def divergence(learner: Any) -> str | None:
    """``ModelDiverged``'s message for ``learner`` as it is now, or None when its weights are finite (several ranks
    agree on it before any of them writes a part of a checkpoint round)."""
    try:
        check_finite(flatten_state(learner.state_dict())[0], learner.steps)
    except ModelDiverged as exc:
        return str(exc)
    return None


def write_learner_checkpoint(learner: Any, store: CheckpointStore, metadata: Mapping[str, Any],
                             publication: Mapping[str, Any] | None, number: int | None = None) -> dict[str, Any]:
    """Write ``learner`` + ``metadata`` as checkpoint ``learner.steps`` (or ``number``: several ranks number
    their checkpoints by round) and build the publication messages.

    ``publication``: None, or ``{"manifest": {...}, "version", "chunk_size", "previous_chunk_count",
    "max_message_bytes", "onnx"}`` (``consumers.state.wire.encode_checkpoint``; the learner's serving metadata is
    added to the manifest; ``onnx``: the students as an ONNX graph too). Returns ``{"path", "seconds",
    "messages": [[key, value], ...], "chunks"}``. Raises ``ModelDiverged``, having written and built nothing, when
    the learner's weights or optimizer state are not finite.
    """
    started = time.perf_counter()
    learner_tensors, learner_plain = flatten_state(learner.state_dict())
    check_finite(learner_tensors, learner.steps)
    messages: list[Any] = []
    chunks = 0
    if publication is not None:
        # The ONNX graph of the students (publish.onnx), for the deep model only: the peers have no graph.
        with_graph = bool(publication.get("onnx")) and isinstance(getattr(learner, "config", None), ModelConfig)
        tensors, serving_meta = learner.serving_state(onnx=True) if with_graph else learner.serving_state()
        manifest = {**publication["manifest"], "serving": dict(serving_meta)}
        messages = encode_checkpoint(tensors, manifest, version=int(publication["version"]),
                                     chunk_size=int(publication["chunk_size"]),
                                     previous_chunk_count=int(publication["previous_chunk_count"]),
                                     max_message_bytes=int(publication["max_message_bytes"]))
        chunks = sum(1 for key, value in messages if value is not None and key.startswith(b"chunk/"))
    full = {**metadata, "trainer_format": CHECKPOINT_FORMAT, "learner": learner_plain}
    if publication is not None:
        # Chunk keys the serving topic may hold once this publication is sent, whether or not it is acknowledged
        # (a restart cannot tell): the next publication tombstones those beyond its own count.
        full["published_chunks"] = max(chunks, int(publication["previous_chunk_count"]))
    path = store.write(learner.steps if number is None else number, learner_tensors, full)
    return {"path": str(path), "seconds": time.perf_counter() - started,
            "messages": [[key, value] for key, value in messages], "chunks": chunks}


def load_learner_checkpoint(learner: Any, path: str | Path | bytes) -> int:
    """Load the learner part of the checkpoint file at ``path`` (or of its bytes, as another rank sent them);
    returns its step count."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    tensors, metadata = decode_checkpoint_file(data)
    learner.load_state_dict(learner_state(metadata, tensors))
    return int(learner.steps)


def warm_start_learner(learner: Any, path: str | Path) -> dict[str, Any]:
    """Initialise ``learner`` (a new ``models.learner.Learner``) from the model of the checkpoint file at ``path``
    (``Learner.warm_start``: the tensors that still fit; never unpickled); ``carry_over``'s report. A ``ValueError``
    where the file is not a checkpoint, is damaged, or holds another kind of model (a river or VW peer's); an
    ``OSError`` where it cannot be read. ``load_learner_checkpoint``'s counterpart for a new model."""
    if not hasattr(learner, "warm_start"):
        raise ValueError(f"warm start is for the deep model (models.learner.Learner); {type(learner).__name__} "
                         "learns from its first event on")
    tensors, metadata = decode_checkpoint_file(Path(path).read_bytes())
    try:
        state = learner_state(metadata, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"it holds no learner state a trainer wrote ({type(exc).__name__}: {exc})") from None
    return learner.warm_start(state)
