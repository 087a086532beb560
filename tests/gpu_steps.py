"""Training steps on a GPU with host synchronisations turned into errors (``torch.cuda.set_sync_debug_mode``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def train_without_host_sync(learner: Any, batches: Sequence[Any]) -> None:
    """``learner._train`` on each batch (on its CUDA device) with every host synchronisation an error; the caller
    has run the steps that make per-device caches first. The mode is restored whatever happens."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            learner._train(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
