"""Structured logs: one JSON object (or one plain line) per record, each carrying the request id it belongs to.

The request id lives in a context variable set by the observability middleware; Starlette runs sync routes and
dependencies in worker threads with a copy of the context, so every line the app logs while it serves a request
names that request. Lines logged outside a request carry no id.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from labcommons.config import Settings

request_id_var: ContextVar[str | None] = ContextVar("labcommons_request_id", default=None)

# An id taken from a trusted proxy must still be safe to put in a header and a log line (nginx's $request_id is
# 32 hex digits; other proxies use UUIDs).
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+/=-]{1,128}")
# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON object.
# (uvicorn adds a copy of each message with terminal colours.)
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id",
                                                                  "color_message"}
# Servers' own access logs would repeat the middleware's access line; their other loggers join ours.
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "gunicorn.error")
_SERVER_ACCESS_LOGGERS = ("uvicorn.access", "gunicorn.access")
_OURS = "_labcommons_handler"


def new_request_id() -> str:
    """A fresh request id: 16 random hex digits."""
    return secrets.token_hex(8)


def accepted_request_id(value: str | None) -> str | None:
    """`value` when it is a well-formed id (from a trusted proxy), else None."""
    if value and _VALID_REQUEST_ID.fullmatch(value):
        return value
    return None


def current_request_id() -> str | None:
    """The id of the request being served in this context, if any."""
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Puts the current request id and the process id on every record that passes the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC ISO 8601), level, logger, message, request_id, pid, and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # the access line's fields, in one attribute: no scan of the record
            entry.update(fields)
        else:
            for key, value in vars(record).items():
                if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                    entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message` with the time in UTC."""

    def __init__(self) -> None:
        super().__init__("%(asctime)sZ %(levelname)s %(name)s [%(request_id)s] %(message)s",
                         datefmt="%Y-%m-%dT%H:%M:%S")
        self.converter = time.gmtime


def configure_logging(settings: Settings) -> None:
    """Send every logger's records to stderr in `settings.log_format` at `settings.log_level`.

    Idempotent: calling it again replaces the handler it installed before (and nothing else on the root logger).
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _OURS, True)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in _SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.propagate = True
    for name in _SERVER_ACCESS_LOGGERS:
        access_logger = logging.getLogger(name)
        access_logger.handlers.clear()
        access_logger.propagate = False
    logging.captureWarnings(True)
    # Every request writes an access line, so a record's cost counts (the logging HOWTO's "Optimization"): no
    # caller lookup, thread or process names, which no line of ours shows. The pid stays.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
