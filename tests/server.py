"""Runs the app as real server processes (uvicorn) on a loopback port for the duration of a test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(
    database_url: str, *, workers: int = 1, timeout: float = 60.0, env: dict[str, str] | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """Start `uvicorn labcommons.asgi:app` with `workers` processes; yield its base URL; stop it after.

    LABCOMMONS_PUBLIC_BASE_URL is the server's own address and LABCOMMONS_MATCHING_EMBEDDINGS is off unless `env`
    says otherwise.
    """
    port = port or free_port()
    env = os.environ | {
        "LABCOMMONS_DATABASE_URL": database_url, "LABCOMMONS_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        # Servers rank demands by keywords unless a test asks for the embedding model (500 MB and ~10 s of CPU
        # to load in every server process).
        "LABCOMMONS_MATCHING_EMBEDDINGS": "off",
    } | (env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "labcommons.asgi:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"server exited with {proc.returncode}:\n{output}")
            try:
                if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in time")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
