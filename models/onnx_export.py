"""The students as a standard ONNX graph: what a team serving from Java, Go or C++ loads in onnxruntime.

The graph takes what docs/features.md defines and nothing the project's code must compute for it beyond hashing:

* input ``categorical``: int64 [batch, C], the table row of each categorical field, in the spec's order
  (field-salted blake2b-64 of ``field=value``, modulo ``hash_buckets``; a missing field hashes ``field=``);
* input ``numeric``: float32 [batch, N], the raw numeric values in the spec's order (a missing one is 0);
  the signed log1p and the running standardisation (the published statistics, clamped to [-8, 8]) are inside;
* output ``probabilities``: float32 [batch, K], the students' probabilities, one column per served task in order
  (``ModelConfig.served_tasks``: auxiliary tasks are left out).

Exported with torch's TorchScript-based exporter at ``OPSET`` (opset 17: onnxruntime 1.14 and newer), the
batch dimension dynamic. The same weights as the safetensors students: onnxruntime's probabilities equal
``ServingModel.score`` to ~1e-7 (``tests/unit/models/test_onnx_export.py``, every backbone).

>>> from models.config import ModelConfig
>>> from models.crossdistil import CrossDistilModel
>>> graph = export_students(CrossDistilModel(ModelConfig(hidden_dims=(8,), tower_dims=(4,)), students_only=True))
>>> len(graph) > 1000, describe(ModelConfig())["inputs"][0]["name"]
(True, 'categorical')
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig
from models.crossdistil import CrossDistilModel

OPSET = 17
TENSOR_NAME = "onnx.students"  # the graph's bytes, a uint8 tensor beside the students in a published payload


class StudentGraph(nn.Module):
    """Raw inputs -> student probabilities: the numeric transform of ``models.features.encode_rows`` and the
    students-only model's forward, in one module that exports."""

    def __init__(self, model: CrossDistilModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        numeric = torch.sign(numeric) * torch.log1p(torch.abs(numeric))
        # a students-only model's logits: the served tasks' columns, the auxiliary towers not in the graph at all
        return torch.sigmoid(self.model.scores(categorical, self.model.normalizer(numeric)).student_logits.float())


def export_students(model: CrossDistilModel) -> bytes:
    """The ONNX bytes of ``model``'s students (a students-only ``CrossDistilModel``, on any device)."""
    spec = model.config.features
    graph = StudentGraph(model).to("cpu").eval()
    example = (torch.zeros((2, len(spec.categorical)), dtype=torch.int64),
               torch.zeros((2, len(spec.numeric)), dtype=torch.float32))
    out = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own deprecation, not on this graph
        torch.onnx.export(graph, example, out, input_names=["categorical", "numeric"],
                          output_names=["probabilities"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"categorical": {0: "batch"}, "numeric": {0: "batch"},
                                        "probabilities": {0: "batch"}})
    return out.getvalue()


def describe(config: ModelConfig) -> dict[str, Any]:
    """The graph's contract, published beside it (``metadata.serving.onnx``)."""
    spec = config.features
    return {
        "tensor": TENSOR_NAME, "opset": OPSET,
        "inputs": [{"name": "categorical", "dtype": "int64", "shape": ["batch", len(spec.categorical)],
                    "fields": list(spec.categorical), "hash_buckets": spec.hash_buckets},
                   {"name": "numeric", "dtype": "float32", "shape": ["batch", len(spec.numeric)],
                    "fields": list(spec.numeric)}],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": ["batch", len(config.served_tasks)],
                     "tasks": list(config.served_tasks)}],
        "spec": "docs/features.md",
    }
