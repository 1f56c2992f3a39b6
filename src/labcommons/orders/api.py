"""Service order endpoints under /api/v1: orders, transitions, quotes, messages, ratings."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["orders"])
