"""The deployment recipes under deploy/: systemd units, nginx, the container recipe, gunicorn's settings."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.ops.support import json_log
from tests.server import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ("labcommons.service", "labcommons-worker.service")


def unit_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section → key → values (keys may repeat; backslash-newline continues a line)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    text = path.read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None and "=" in line, f"{path.name}: not a key=value line: {line!r}"
        key, _sep, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_settings(name: str) -> None:
    unit = unit_entries(DEPLOY / name)
    service = unit["Service"]
    assert service["User"] == ["labcommons"] and service["Group"] == ["labcommons"]
    assert service["EnvironmentFile"] == ["/etc/labcommons/labcommons.env"]
    assert service["Restart"][0] in ("on-failure", "always")
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "RestrictSUIDSGID"):
        assert hardening in service, f"{name} lacks {hardening}"
    assert service["CapabilityBoundingSet"] == [""], "no capabilities at all"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    command = service["ExecStart"][0].split()
    if name == "labcommons.service":
        assert command[1:3] == ["serve", "--uds"] and "--workers" in command
        assert "LABCOMMONS_JOBS_IN_PROCESS=false" in service["Environment"], "jobs run in the worker service"
        assert any(e.startswith("LABCOMMONS_METRICS_DIR=/run/labcommons/") for e in service["Environment"])
        assert service["RuntimeDirectory"] == ["labcommons"], "an empty metrics directory at every start"
    else:
        assert command[1:] == ["worker"]
        assert service["KillSignal"] == ["SIGTERM"], "the worker finishes the job in hand on SIGTERM"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd's own check; ExecStart points at this environment's `labcommons` so that it exists."""
    script = Path(sys.executable).with_name("labcommons")
    copies = []
    for name in UNITS:
        copy = tmp_path / name
        copy.write_text((DEPLOY / name).read_text().replace("/opt/labcommons/venv/bin/labcommons", str(script)))
        copies.append(str(copy))
    result = subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings (exit status 0): any line about our files fails the test.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if str(tmp_path) in line
            or any(line.startswith(f"{name}:") for name in UNITS)]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_nginx_config_keeps_metrics_internal_and_sets_the_headers_the_app_trusts() -> None:
    text = (DEPLOY / "nginx.conf").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert code.count("{") == code.count("}")
    assert re.search(r"location = /metrics \{\s*return 404;", code)
    for header in ("X-Forwarded-For $proxy_add_x_forwarded_for", "X-Forwarded-Proto $scheme",
                   "X-Request-ID $request_id"):
        assert f"proxy_set_header {header};" in code
    assert "client_max_body_size 1m;" in code and "upstream labcommons" in code and "location /static/" in code


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_config_is_valid(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "labcommons.example.org")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    text = ((DEPLOY / "nginx.conf").read_text()
            .replace("/etc/ssl/labcommons/fullchain.pem", str(tmp_path / "cert.pem"))
            .replace("/etc/ssl/labcommons/privkey.pem", str(tmp_path / "key.pem"))
            .replace("/var/log/nginx/", f"{tmp_path}/").replace("/run/nginx.pid", f"{tmp_path}/nginx.pid"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    result = subprocess.run(["nginx", "-t", "-c", str(conf), "-p", str(tmp_path), "-e", str(tmp_path / "error.log")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_container_recipe() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the server runs as a user of its own"
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    cmd = re.findall(r"^CMD (.+)$", text, re.M)[-1]
    assert "labcommons serve --host 0.0.0.0" in cmd and "--workers" in cmd


def test_gunicorn_hooks_manage_the_metrics_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"old run")
    monkeypatch.setenv("LABCOMMONS_METRICS_DIR", str(metrics_dir))
    # Set (so that monkeypatch puts back whatever was there) and then overwritten by the hook.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "not yet")
    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    assert conf["worker_class"] == "uvicorn_worker.UvicornWorker" and conf["accesslog"] is None
    with json_log():  # on_starting sets up logging as in a server; the context puts it back afterwards
        conf["on_starting"](SimpleNamespace())
    assert not list(metrics_dir.iterdir()), "a start begins with no files of an earlier run"
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(metrics_dir)
    (metrics_dir / "gauge_livesum_4242.db").write_bytes(b"")
    (metrics_dir / "histogram_4242.db").write_bytes(b"")
    conf["child_exit"](SimpleNamespace(), SimpleNamespace(pid=4242))
    assert [p.name for p in metrics_dir.iterdir()] == ["histogram_4242.db"], "counts stay, live gauges go"
    conf["on_exit"](SimpleNamespace())
    assert not list(metrics_dir.iterdir())


def test_gunicorn_serves_the_app_with_shared_metrics(db_url: str, tmp_path: Path) -> None:
    pytest.importorskip("gunicorn")
    pytest.importorskip("uvicorn_worker")
    port = free_port()
    env = os.environ | {
        "LABCOMMONS_DATABASE_URL": db_url, "LABCOMMONS_BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "2",
        "LABCOMMONS_METRICS_DIR": str(tmp_path / "metrics"), "LABCOMMONS_MATCHING_EMBEDDINGS": "off",
        "LABCOMMONS_JOBS_IN_PROCESS": "false", "LABCOMMONS_LOG_FORMAT": "json", "LABCOMMONS_DB_POOL_SIZE": "4",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("gunicorn")), "-c", str(DEPLOY / "gunicorn.conf.py"),
             "labcommons.asgi:app"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while log.read_text(errors="replace").count("Application startup complete.") < 2:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        for _ in range(10):
            with httpx.Client(base_url=base, timeout=30) as c:
                assert c.get("/api/v1/health").status_code == 200
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert ('labcommons_http_request_duration_seconds_count{method="GET",route="/api/v1/health",status="2xx"} '
                "10.0") in metrics
    finally:
        process.terminate()
        try:
            assert process.wait(timeout=40) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 9)
    assert not list((tmp_path / "metrics").glob("*.db"))
