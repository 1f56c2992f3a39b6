"""HTTP defences for every response: body size limits, write rate limits, security headers.

(Groundwork: the helper building issue 9's hostile-input part fills this in.)
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from labcommons.config import Settings


def client_address(request: Request, settings: Settings) -> str | None:
    """The client's address: the proxy's X-Forwarded-For first hop when trusted, else the socket peer."""
    if settings.trust_proxy_headers:
        forwarded = request.headers.get("x-forwarded-for", "")
        first = forwarded.split(",")[0].strip()
        if first:
            return first[:64]
    return request.client.host if request.client else None


def install_security(app: FastAPI, settings: Settings) -> None:
    """Add the size limit, rate limit and header middleware to `app`."""
