"""Production observability: request ids, structured logs, Prometheus metrics, health and readiness.

One pure ASGI middleware, outermost (outside the security layer and Starlette's error middleware), does per request:
- the request id: taken from X-Request-ID when the proxy is trusted (and the id well formed), else made up; kept
  in a context variable for the log lines of the request, and sent back in the response's X-Request-ID;
- one access log line (logger `labcommons.access`) with method, path (never the query string, which may hold
  tokens; secret path parameters redacted), status, duration, client address and the request id;
- the latency histogram by method, route template and status class, and the in-flight gauge.
It answers three paths itself, before the app: GET /healthz (the process is up; no database), GET /readyz (the
database answers and its schema is at the code's migration head; else 503 naming the failing check) and GET
/metrics (Prometheus text format, unless metrics are disabled). They are for load balancers and the monitoring
system on the internal network: the proxy refuses /metrics from outside (docs/deploy.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labcommons.config import Settings
from labcommons.ops.logs import (
    accepted_request_id,
    configure_logging,
    current_request_id,
    new_request_id,
    request_id_var,
)

__all__ = ["ObservabilityMiddleware", "configure_logging", "current_request_id", "install_observability",
           "prepare_process", "use_metrics_dir"]

access_log = logging.getLogger("labcommons.access")
log = logging.getLogger("labcommons.ops")

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
REQUEST_ID_HEADER = b"x-request-id"
# The route label of requests no route matched: the raw path would make the label set unbounded.
UNMATCHED_ROUTE = "<unmatched>"
# Path parameters whose values are secrets (a password-reset link, a calendar feed's token): never logged.
SECRET_PARAMS = frozenset({"token", "secret", "key"})
_PROBE_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
_METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def use_metrics_dir(path: str | os.PathLike[str]) -> None:
    """Make this process (and the worker processes it starts) add its metrics up with others' through files in
    `path`; it must run before prometheus_client is first imported."""
    import sys

    Path(path).mkdir(parents=True, exist_ok=True)
    if "prometheus_client" in sys.modules and os.environ.get("PROMETHEUS_MULTIPROC_DIR") != str(path):
        log.warning("metrics directory %s set after prometheus_client was imported: this process keeps its "
                    "metrics to itself", path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def prepare_process(settings: Settings) -> None:
    """What a server process does before it builds the app: logging, and the shared metrics directory if set."""
    configure_logging(settings)
    if settings.metrics_enabled and settings.metrics_dir:
        use_metrics_dir(settings.metrics_dir)


def _route_template(scope: Scope, root_path: str) -> str:
    """The matched route's path template (`/api/v1/bookings/{booking_id}`), never the raw path."""
    # FastAPI 0.16x routes lazily through included routers and keeps the full template of the matched route here;
    # older versions set scope["route"] to a route whose path_format is already the full template.
    context = scope.get("fastapi", {}).get("effective_route_context")
    template = getattr(context, "path_format", None)
    if isinstance(template, str):
        return template
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    if isinstance(template, str):
        return template
    mounted = scope.get("root_path", "")
    if isinstance(mounted, str) and len(mounted) > len(root_path):  # a Mount (static files) took the request
        return f"{mounted}/{{path}}"
    return UNMATCHED_ROUTE


def _logged_path(scope: Scope) -> str:
    path: str = scope["path"]
    params = scope.get("path_params") or {}
    for name, value in params.items():
        if name in SECRET_PARAMS and isinstance(value, str) and value:
            path = path.replace(value, "[redacted]")
    return path


class ObservabilityMiddleware:
    """Request ids, the access log line, request metrics and the probes; see the module's docstring."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.trust_proxy = settings.trust_proxy_headers
        self.metrics_enabled = settings.metrics_enabled
        if self.metrics_enabled:
            from labcommons.ops import metrics

            self.metrics: Any = metrics
        else:
            self.metrics = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming_id = forwarded_for = None
        if self.trust_proxy:
            for name, value in scope["headers"]:
                if name == REQUEST_ID_HEADER:
                    incoming_id = value.decode("latin-1")
                elif name == b"x-forwarded-for":
                    forwarded_for = value.decode("latin-1")
        request_id = accepted_request_id(incoming_id) or new_request_id()
        token = request_id_var.set(request_id)
        status = 500
        id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        path: str = scope["path"]
        probe = path in (HEALTH_PATH, READY_PATH) or (path == METRICS_PATH and self.metrics_enabled)
        metrics = self.metrics
        root_path = scope.get("root_path", "")
        if metrics is not None:
            metrics.REQUESTS_IN_FLIGHT.inc()
        try:
            if probe:
                await self._probe(scope, path, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            route = path if probe else _route_template(scope, root_path)
            if metrics is not None:
                metrics.REQUESTS_IN_FLIGHT.dec()
                metrics.observe_request(scope["method"], route, status, duration)
            level = logging.DEBUG if probe else logging.INFO
            if access_log.isEnabledFor(level):
                client = self._client(scope, forwarded_for)
                logged = _logged_path(scope)
                access_log.log(
                    level, '%s "%s %s" %d %.1fms', client or "-", scope["method"], logged, status, duration * 1000,
                    extra={"fields": {"method": scope["method"], "path": logged, "route": route, "status": status,
                                      "duration_ms": round(duration * 1000, 3), "client": client}},
                )
            request_id_var.reset(token)

    def _client(self, scope: Scope, forwarded_for: str | None) -> str | None:
        """As security.middleware.client_address: the last X-Forwarded-For entry from a trusted proxy (the one it
        appended), else the socket peer."""
        if self.trust_proxy and forwarded_for:
            last = forwarded_for.split(",")[-1].strip()
            if last:
                return last[:64]
        client = scope.get("client")
        return str(client[0]) if client else None

    async def _probe(self, scope: Scope, path: str, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            refusal = {"error": "method_not_allowed", "message": "Only GET and HEAD are allowed here.", "field": None}
            await _answer(send, scope, 405, json.dumps(refusal).encode(), b"application/json",
                          extra=[(b"allow", b"GET, HEAD")])
            return
        if path == HEALTH_PATH:
            await _answer(send, scope, 200, b'{"status":"ok"}', b"application/json")
            return
        app = scope.get("app")
        db = getattr(getattr(app, "state", None), "db", None)
        if path == READY_PATH:
            from labcommons.ops.probes import readiness

            outcome = await readiness(db)
            if outcome.ready:
                payload: dict[str, Any] = {"status": "ready", "checks": outcome.checks}
            else:
                payload = {"error": "not_ready", "message": f"Failing: {', '.join(outcome.failing)}.",
                           "field": None, "checks": outcome.checks}
            await _answer(send, scope, 200 if outcome.ready else 503, json.dumps(payload).encode(),
                          b"application/json")
            return
        body = await run_in_threadpool(self.metrics.exposition, db)
        await _answer(send, scope, 200, body, _METRICS_CONTENT_TYPE)


async def _answer(send: Send, scope: Scope, status: int, body: bytes, content_type: bytes,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *_PROBE_HEADERS,
               *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def install_observability(app: FastAPI, settings: Settings) -> None:
    """Add request ids, JSON access logs, /metrics and the health/readiness probes to the app (outermost layer)."""
    if settings.metrics_enabled:
        # Now rather than at the first request: the pool gauge must see every checkout, the first ones included.
        from labcommons.ops import metrics  # noqa: F401
    build_stack = app.build_middleware_stack

    def build_with_observability() -> ASGIApp:
        return ObservabilityMiddleware(build_stack(), settings)

    app.build_middleware_stack = build_with_observability  # type: ignore[method-assign]
