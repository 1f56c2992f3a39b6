"""Result file pages: upload from the order page and download."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
