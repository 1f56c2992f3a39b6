"""Production observability: request ids, structured logs, Prometheus metrics, health and readiness."""

from __future__ import annotations

from fastapi import FastAPI

from labcommons.config import Settings


def install_observability(app: FastAPI, settings: Settings) -> None:
    """Add request ids, JSON access logs, /metrics and the health/readiness probes to the app."""
