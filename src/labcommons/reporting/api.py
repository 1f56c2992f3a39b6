"""Statistics endpoints under /api/v1/stats (in progress)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["statistics"])
