"""Result file endpoints under /api/v1: streamed upload, listing, download, withdrawal."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["orders"])
