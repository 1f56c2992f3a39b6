"""Service pages: a service's own page and the facility's service editor."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
