"""Tensors as bytes: the safetensors encoding shared by checkpoint files and the serving topic's wire format.

Nothing is ever pickled: safetensors holds raw tensor data and a JSON header only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Tensors as safetensors bytes: detached, on CPU, contiguous; tensors sharing storage are copied."""
    from safetensors.torch import save  # lazy: torch loads only with the first tensor written

    plain: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if storage in seen and t.numel() > 0:
            t = t.clone()  # safetensors refuses tensors that share memory (tied weights)
        seen.add(storage)
        plain[name] = t
    return save(plain)
