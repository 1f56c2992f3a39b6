"""Opaque keyset cursors shared by every paginated list."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from labcommons.db import MAX_ID
from labcommons.errors import InvalidInput


def encode_cursor(values: list[Any]) -> str:
    """An opaque cursor carrying the sort key of the last row returned."""
    raw = json.dumps(values, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, length: int) -> list[Any]:
    """The sort key inside a cursor; a cursor that was not made by us is a 422 on `cursor`."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("The cursor is not valid.", field="cursor", code="invalid_cursor") from exc
    if not isinstance(values, list) or len(values) != length:
        raise InvalidInput("The cursor is not valid.", field="cursor", code="invalid_cursor")
    return values


def decode_keyset(cursor: str, *, ranked: bool = False) -> tuple[float | None, int]:
    """The (rank, id) of the last row in the cursor of a list ordered by id, after a rank when `ranked` (None
    otherwise). The values go into SQL comparisons, so a cursor carrying other types is a 422 on `cursor` too."""
    values = decode_cursor(cursor, 2 if ranked else 1)
    rank, last_id = values if ranked else (None, values[0])
    if isinstance(last_id, bool) or not isinstance(last_id, int) or not 0 <= last_id <= MAX_ID:
        raise InvalidInput("The cursor is not valid.", field="cursor", code="invalid_cursor")
    if not ranked:
        return None, last_id
    if isinstance(rank, bool) or not isinstance(rank, int | float) or not math.isfinite(rank):
        raise InvalidInput("The cursor is not valid.", field="cursor", code="invalid_cursor")
    return float(rank), last_id
