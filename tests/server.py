"""Runs the app as real server processes (uvicorn) on a loopback port for the duration of a test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

# What each uvicorn worker logs once its app has started.
STARTED = "Application startup complete."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running `uvicorn --workers N`: the master and its workers form one process group of their own."""

    base: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def processes(self) -> list[int]:
        """The ids of the live processes of the server's group (the master, its workers, their helpers)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                # The process group is the fifth field; the command in the second may hold spaces, so split after it.
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid and fields[0] != "Z":
                found.append(int(entry.name))
        return sorted(found)

    def output(self) -> str:
        """What the server processes wrote so far (warnings, tracebacks)."""
        try:
            return self.log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole process group at once, master and workers, as a crash or the OOM killer would: no
        shutdown code runs and open transactions are cut off mid-way."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        # The workers are the master's children: it is gone, so wait until none of the group is left.
        _wait_group_gone(self.process.pid)

    def stop(self) -> None:
        """Shut down gracefully (SIGTERM to the master), then kill whatever of the group is left."""
        if self.alive:
            self.process.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        self.kill()
        self.log.unlink(missing_ok=True)


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        # A worker outliving its master still holds the port and database connections: make sure it dies.
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.05)


def start_server(
    database_url: str, *, workers: int = 1, timeout: float | None = None, env: dict[str, str] | None = None,
    port: int | None = None,
) -> Server:
    """Start `uvicorn labcommons.asgi:app` with `workers` processes in a new process group; return it once healthy.

    LABCOMMONS_PUBLIC_BASE_URL is the server's own address and LABCOMMONS_MATCHING_EMBEDDINGS is off unless `env`
    says otherwise. Output goes to a temporary file (a pipe nobody reads would block a chatty server). Each worker
    imports the whole app (seconds of CPU), so the default timeout grows with their number.
    """
    timeout = timeout if timeout is not None else 60.0 + 30.0 * workers
    port = port or free_port()
    env = os.environ | {
        "LABCOMMONS_DATABASE_URL": database_url, "LABCOMMONS_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        # Servers rank demands by keywords unless a test asks for the embedding model (500 MB and ~10 s of CPU
        # to load in every server process).
        "LABCOMMONS_MATCHING_EMBEDDINGS": "off",
    } | (env or {})
    fd, name = tempfile.mkstemp(prefix="labcommons-server-", suffix=".log")
    os.close(fd)
    log = Path(name)
    # Appending: the processes' writes land at the end however the test reads the file meanwhile.
    with log.open("ab") as out:
        # Info level (without the access log) for the line each worker prints once it serves.
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "labcommons.asgi:app", "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(workers), "--log-level", "info", "--no-access-log"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(base=f"http://127.0.0.1:{port}", process=process, log=log)
    return wait_until_serving(server, workers, timeout,
                              lambda: httpx.get(f"{server.base}/api/v1/health", timeout=1).status_code == 200)


def wait_until_serving(server: Server, workers: int, timeout: float, healthy: Callable[[], bool]) -> Server:
    """`server` once all its `workers` have logged that they serve and `healthy()` holds; stopped and an error
    with its output if it exits or the timeout passes first."""
    try:
        deadline = time.monotonic() + timeout
        while True:
            if not server.alive:
                raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.output()}")
            # The first worker up answers the health check; the test wants every one of them serving.
            if server.output().count(STARTED) >= workers:
                try:
                    if healthy():
                        return server
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become healthy in time:\n{server.output()}")
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise


@contextmanager
def server_process(
    database_url: str, *, workers: int = 1, timeout: float | None = None, env: dict[str, str] | None = None,
    port: int | None = None,
) -> Iterator[Server]:
    """A started server (see start_server) that the test may kill; stopped after, whatever is left of it."""
    server = start_server(database_url, workers=workers, timeout=timeout, env=env, port=port)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_server(
    database_url: str, *, workers: int = 1, timeout: float | None = None, env: dict[str, str] | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """Start `uvicorn labcommons.asgi:app` with `workers` processes; yield its base URL; stop it after.

    LABCOMMONS_PUBLIC_BASE_URL is the server's own address and LABCOMMONS_MATCHING_EMBEDDINGS is off unless `env`
    says otherwise.
    """
    with server_process(database_url, workers=workers, timeout=timeout, env=env, port=port) as server:
        yield server.base
