"""The ``icme2019`` adapter: the ICME 2019 short-video challenge (track 2, ByteDance/TikTok) schema.

Implemented as a built-in column mapping over the generic ``csv`` adapter (``mappings/icme2019.toml`` is the
same mapping as a file), which shows that a mapping is all a new data set needs.

Choices (the data has no timing beyond one anonymised integer):

* ``time`` is treated as **seconds** (an anonymised integer; the sample spans about 5.5 days read that way).
* ``finish`` feedback arrives when the video has played through: ``time + duration_time`` seconds.
* ``like`` feedback arrives 1 s after that (a like is counted once the video was watched).
* Tasks: ``finish``, ``like``. Features: categorical ``user_city``, ``author_id``, ``item_city``, ``channel``,
  ``music_id``, ``device``; numeric ``duration_time`` (seconds, raw). ``finish`` and ``like`` are outcomes and
  never features. The file is not in time order; it is sorted stably by ``time``.
* ``impression_id`` is ``icme-<data row index>`` (0-based, file order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamer.datasets.tabular import TabularDataset, mapping_from_dict

COLUMNS = (
    "uid", "user_city", "item_id", "author_id", "item_city", "channel",
    "finish", "like", "music_id", "device", "time", "duration_time",
)

MAPPING: dict[str, Any] = {
    "name": "icme2019",
    "format": "tsv",
    "header": False,
    "columns": list(COLUMNS),
    "user": "uid",
    "item": "item_id",
    "time": "time",
    "time_unit": "s",
    "impression_id_prefix": "icme",
    "categorical": ["user_city", "author_id", "item_city", "channel", "music_id", "device"],
    "numeric": ["duration_time"],
    "tasks": {
        "finish": {"column": "finish", "delay_column": "duration_time", "delay_unit": "s"},
        "like": {"column": "like", "delay_column": "duration_time", "delay_unit": "s", "delay_ms": 1000},
    },
}

DEFAULT_FILE = "icme2019_track2_sample_1000.tsv"


def open_icme2019(source: str | Path) -> TabularDataset:
    """Open the ICME 2019 file at ``source`` (a file, or the folder holding the 1,000-row sample)."""
    path = Path(source)
    if path.is_dir():
        path = path / DEFAULT_FILE
    return TabularDataset(path, mapping_from_dict(MAPPING, origin="built-in icme2019 mapping"))
