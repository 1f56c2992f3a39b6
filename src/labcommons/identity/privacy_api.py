"""Personal data: a user's export and deletion (groundwork: filled in by the privacy work)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
