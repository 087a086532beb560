"""Trainer configuration files for the integration tests, written through the project's own schema.

Each test names only what matters to it; everything else is the schema default, except what every test
against the session broker wants: its own consumer group, the metrics endpoint off, the CPU, and short
session timeouts so that a killed trainer leaves its group quickly. The file is what ``--check-config``
prints, so a misspelt key fails here, at once, instead of inside a daemon.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from consumers.runtime.config import load_config, to_toml, toml_value

TEST_DEFAULTS: dict[str, Any] = {
    "kafka.client_options": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
    "model.device": "cpu",
    "metrics.port": 0,
}


def write_trainer_config(path: Path, bootstrap: str, topics: Mapping[str, str], settings: Mapping[str, Any]) -> Path:
    """Write a trainer TOML to ``path``: the broker, ``topics`` (keys ``impressions``, ``feedback`` and, when
    given, ``dead_letters``, ``model``), a fresh group id, ``TEST_DEFAULTS``, then ``settings``
    (``"section.key": value``, plain Python values). Returns ``path``."""
    values: dict[str, Any] = {
        "kafka.bootstrap": bootstrap,
        "kafka.group_id": f"test-{uuid.uuid4().hex[:8]}",
        "kafka.impressions_topic": topics["impressions"],
        "kafka.feedback_topic": topics["feedback"],
        **{f"kafka.{key}_topic": topics[name] for name, key in (("dead_letters", "dead_letter"), ("model", "model"))
           if name in topics},
        **TEST_DEFAULTS,
        **settings,
    }
    cfg = load_config(None, env={}, overrides=[f"{key}={toml_value(value)}" for key, value in values.items()])
    path.write_text(to_toml(cfg))
    return path
