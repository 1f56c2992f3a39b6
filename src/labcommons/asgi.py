"""ASGI entry point for multi-process servers: `uvicorn labcommons.asgi:app --workers N`, or gunicorn with uvicorn
workers (`gunicorn -c deploy/gunicorn.conf.py labcommons.asgi:app`); see docs/deploy.md.

Each worker process imports this module: it sets up logging and, when LABCOMMONS_METRICS_DIR names a directory, the
metrics files shared by the workers (before prometheus_client is imported), then builds the app from the
environment's settings.
"""

from labcommons.config import get_settings
from labcommons.ops.observability import prepare_process

prepare_process(get_settings())

from labcommons.app import create_app  # noqa: E402  (after prepare_process: it imports prometheus_client)

app = create_app()
