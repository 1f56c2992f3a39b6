"""Opaque keyset cursors shared by every paginated list."""

from __future__ import annotations

import base64
import json
from typing import Any

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
