"""What the ops tests share: reading Prometheus text, capturing the JSON log, starting `labcommons serve`."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server import Server, free_port, wait_until_serving


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition: (name, labels) → value."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value, 0 when the exposition has no such sample (a counter never incremented)."""
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def label_values(text: str, name: str, label: str) -> set[str]:
    """The values one label takes over the samples of `name`."""
    return {dict(labels)[label] for (n, labels) in samples(text) if n == name and label in dict(labels)}


class CapturedLog:
    """The JSON lines written through the production log configuration during a test."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]


@contextmanager
def json_log(level: str = "INFO") -> Iterator[CapturedLog]:
    """Logging configured as in production, JSON lines to a buffer; afterwards the loggers are as they were."""
    from labcommons.config import Settings
    from labcommons.ops.logs import configure_logging

    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    server_loggers = ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error", "gunicorn.access")
    saved = {name: (logging.getLogger(name).propagate, list(logging.getLogger(name).handlers))
             for name in server_loggers}
    stream = io.StringIO()
    real_stderr = sys.stderr
    sys.stderr = stream  # the handler writes to the stream stderr is when it is made
    try:
        configure_logging(Settings(log_format="json", log_level=level))
    finally:
        sys.stderr = real_stderr
    try:
        yield CapturedLog(stream)
    finally:
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
        root.setLevel(saved_level)
        for name, (propagate, handlers) in saved.items():
            logging.getLogger(name).propagate = propagate
            logging.getLogger(name).handlers[:] = handlers


def serve_command(*args: str) -> list[str]:
    """The `labcommons` console script of this environment with `args`."""
    script = Path(sys.executable).with_name("labcommons")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from labcommons.cli import main; main()", *args]


def client_of(server: Server, uds: Path | None = None) -> httpx.Client:
    """An HTTP client for the server, over its unix socket when it listens on one."""
    if uds is not None:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), base_url="http://labcommons", timeout=30)
    return httpx.Client(base_url=server.base, timeout=30)


def start_serve(database_url: str, *, workers: int, env: dict[str, str], timeout: float | None = None,
                uds: Path | None = None) -> Server:
    """Start `labcommons serve --workers N` on a free loopback port (or the unix socket `uds`) in its own process
    group; return it once every worker has started and /healthz answers."""
    timeout = timeout if timeout is not None else 60.0 + 30.0 * workers
    port = free_port()
    full_env = os.environ | {
        "LABCOMMONS_DATABASE_URL": database_url, "LABCOMMONS_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "LABCOMMONS_MATCHING_EMBEDDINGS": "off", "LABCOMMONS_DB_POOL_SIZE": "4",
        "LABCOMMONS_WRITE_RATE_PER_MINUTE": "0",
    } | env
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    fd, name = tempfile.mkstemp(prefix="labcommons-serve-", suffix=".log")
    os.close(fd)
    log = Path(name)
    with log.open("ab") as out:
        process = subprocess.Popen(
            serve_command("serve", *(["--uds", str(uds)] if uds else ["--host", "127.0.0.1", "--port", str(port)]),
                          "--workers", str(workers), "--graceful-timeout", "5"),
            env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(base=f"http://127.0.0.1:{port}", process=process, log=log)

    def healthy() -> bool:
        with client_of(server, uds) as probe:
            return probe.get("/healthz", timeout=1).status_code == 200

    return wait_until_serving(server, workers, timeout, healthy)


def output_once(server: Server, text: str, timeout: float = 5.0) -> str:
    """The server's output once it contains `text` (the access line is written after the answer is sent, so a
    client can read the log before it), or as it is when the timeout passes."""
    deadline = time.monotonic() + timeout
    while text not in (output := server.output()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return output


def log_lines(server: Server) -> list[dict[str, Any]]:
    """The JSON lines the server's processes wrote so far (other output skipped)."""
    found = []
    for line in server.output().splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found
