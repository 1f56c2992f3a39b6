"""ASGI entry point for multi-process servers: `uvicorn labcommons.asgi:app --workers N`."""

from labcommons.app import create_app

app = create_app()
