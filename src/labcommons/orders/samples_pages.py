"""Sample pages: custody forms posted from the order page and printable labels."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
