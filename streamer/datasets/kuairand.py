"""The ``kuairand`` adapter: the KuaiRand-27K explicit-feedback subset (``../shared/data/kuairand``).

Tasks and where their labels come from:

* ``click`` = ``is_click``; feedback **1 s** after the impression (the log has no click time; a click follows
  the impression closely).
* ``long_view`` = ``long_view``; feedback at ``time_ms + play_time_ms`` (the real watch time: the view became
  long while it was playing, and we only know when it ended).
* ``like`` = ``label`` (1 = like, 0 = hate; every row carries one of the two, so 0 is an explicit *hate*, not a
  missing like); feedback at ``time_ms + play_time_ms + 2 s`` (after viewing).

Features (known at impression time only): categorical ``hour`` (0..23) and ``weekday`` (0 = Monday) of the
impression in Beijing time (UTC+8, the log's local time; they agree with the ``date`` and ``hourmin`` columns,
which upstream rounded to the nearest hour), numeric ``duration_ms`` (raw; **0 means unknown**, 7,738 rows).
Outcome columns (``play_time_ms``, ``comment_stay_time``, ``is_*``, ``long_view``, ``label``) are never features.
``impression_id`` is ``kr-<data row index>`` (0-based, file order). The file is not in time order: it is sorted
stably by ``time_ms`` (4,761 rows share a timestamp with an earlier row; ties keep file order).

Oddities of the data, and what we do (counts over the 41,828 rows):

* 231 rows are ``long_view`` = 1 with ``is_click`` = 0, and 9,535 are liked without a click (likes and hates
  are explicit feedback given on any impression). Kept as they are: tasks are independent labels.
* 991 rows have ``play_time_ms`` = 0; none of them is a long view, so their long_view feedback never fires; a
  like on them arrives 2 s after the impression.
* 20,513 rows have ``play_time_ms`` > ``duration_ms`` (replays, or unknown duration): kept; timing uses
  ``play_time_ms`` only.
* Label rates are higher than in a raw log (upstream kept only rows with a like or hate; see the README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamer.datasets.base import Interaction
from streamer.datasets.tabular import TabularDataset, mapping_from_dict

CLICK_DELAY_MS = 1_000
LIKE_AFTER_VIEW_MS = 2_000
BEIJING_OFFSET_MS = 8 * 3600 * 1000
DEFAULT_FILE = "kuairand27k_like_hate_kcore15.tsv"

MAPPING: dict[str, Any] = {
    "name": "kuairand",
    "format": "tsv",
    "user": "user_id",
    "item": "video_id",
    "time": "time_ms",
    "time_unit": "ms",
    "impression_id_prefix": "kr",
    "numeric": ["duration_ms"],
    "tasks": {
        "click": {"column": "is_click", "delay_ms": CLICK_DELAY_MS},
        "long_view": {"column": "long_view", "delay_column": "play_time_ms", "delay_unit": "ms"},
        "like": {"column": "label", "delay_column": "play_time_ms", "delay_unit": "ms",
                 "delay_ms": LIKE_AFTER_VIEW_MS},
    },
}


def local_hour_and_weekday(ts_ms: int) -> tuple[int, int]:
    """Hour of day (0..23) and weekday (0 = Monday) in Beijing time of an epoch-ms instant."""
    local_ms = ts_ms + BEIJING_OFFSET_MS
    days, ms_of_day = divmod(local_ms, 86_400_000)
    # 1970-01-01 was a Thursday (weekday 3).
    return ms_of_day // 3_600_000, (days + 3) % 7


class KuaiRand(TabularDataset):
    """KuaiRand-27K through the built-in mapping, plus the hour and weekday features."""

    def __init__(self, source: str | Path) -> None:
        path = Path(source)
        if path.is_dir():
            path = path / DEFAULT_FILE
        super().__init__(path, mapping_from_dict(MAPPING, origin="built-in kuairand mapping"))
        self.categorical_features = ("hour", "weekday")

    def _interaction(self, row_index: int, row: dict[str, Any]) -> Interaction:
        record = super()._interaction(row_index, row)
        hour, weekday = local_hour_and_weekday(record.ts_ms)
        record.features.update(hour=str(hour), weekday=str(weekday))
        return record
