"""Points in time as users type them: unix milliseconds or ISO 8601.

>>> parse_time("2022-04-08T12:00:00Z"), parse_time("1649419200000"), parse_time(None)
(1649419200000, 1649419200000, None)
"""

from __future__ import annotations

from datetime import datetime, timezone


def parse_time(text: str | None) -> int | None:
    """``--from-time`` / ``--to-time``: unix milliseconds, or ISO 8601 (UTC unless it says otherwise)."""
    if text is None:
        return None
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"time {text!r} is neither unix milliseconds nor ISO 8601 "
                         "(e.g. 2022-04-08T12:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)
