"""Sample endpoints under /api/v1: registering samples, custody events, labels."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["orders"])
