"""Placeholder router; filled in by the identity issue."""

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
