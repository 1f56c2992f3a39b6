"""gunicorn settings for LabCommons, the alternative to `labcommons serve`:

    gunicorn -c deploy/gunicorn.conf.py labcommons.asgi:app

needs `pip install gunicorn uvicorn-worker`. gunicorn's master only supervises: each worker imports labcommons.asgi,
which sets up logging and the shared metrics directory from the LABCOMMONS_* environment. The hooks below do for the
metrics what `labcommons serve` does itself: an empty directory at start, dead workers' live gauges dropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

bind = os.environ.get("LABCOMMONS_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "uvicorn_worker.UvicornWorker"
# SIGTERM: requests in progress get this long to finish.
graceful_timeout = 30
timeout = 60
keepalive = 5
# The app's middleware writes one access line per request; gunicorn's own would repeat it.
accesslog = None
# X-Forwarded-* are applied only from these addresses (and only matter with LABCOMMONS_TRUST_PROXY_HEADERS=true).
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")

METRICS_DIR = os.environ.setdefault("LABCOMMONS_METRICS_DIR", "/run/labcommons/metrics")


def _empty_metrics_dir() -> None:
    path = Path(METRICS_DIR)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def on_starting(server: Any) -> None:
    """Before the first worker: the master's own lines in the app's log format, and an empty metrics directory
    (files of an earlier run would add old counts)."""
    from labcommons.config import get_settings
    from labcommons.ops.logs import configure_logging

    configure_logging(get_settings())
    _empty_metrics_dir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR


def on_exit(server: Any) -> None:
    """After the last worker: no metric files left behind."""
    _empty_metrics_dir()


def child_exit(server: Any, worker: Any) -> None:
    """A worker ended (stopped, crashed or killed): its requests in flight and pool connections leave the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, METRICS_DIR)
