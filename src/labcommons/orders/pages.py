"""Service order pages: ordering a service, my orders, an order's page, the facility's order queue."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
