"""Which path a step's code takes on a tensor's device: the host's, or a device's that never waits for the host.

On a CPU, reading a value (``bool(t.any())``, numpy's sort through ``.numpy()``, ``coalesce`` sizing its output by the
number of unique rows) costs nothing but the read, and the host's paths use it: the embedding updates find the unique
rows with numpy (``models.rowwise``), the trust gate sorts with numpy (``models.trust_gate``), a closed gate skips
KD's backward (``models.crossdistil``). On a GPU each such read would make the host wait for the device, so the
step takes paths with fixed shapes that read nothing back. Both give the same numbers (each module's tests).

``DEVICE_PATHS_ON_CPU`` runs a device's paths on a CPU: tests set it to hold those paths to the host's values and
to check, on a machine without a GPU, that nothing in a step reads a value back (tests/unit/models/
test_host_reads.py).
"""

from __future__ import annotations

import torch

DEVICE_PATHS_ON_CPU = False


def on_host(device: torch.device) -> bool:
    """Whether code on ``device`` may read values back (a CPU, unless ``DEVICE_PATHS_ON_CPU``)."""
    return device.type == "cpu" and not DEVICE_PATHS_ON_CPU
