"""A small real OpenID Connect provider for tests, served over loopback HTTP, that can be told to misbehave."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from joserfc import jwt
from joserfc.jwk import RSAKey
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

DELETE = object()


def new_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})


@dataclass
class Upstream:
    """Provider state: the configured client, the user it auto-approves, its keys and what to get wrong."""

    client_id: str = "labcommons"
    client_secret: str = "upstream-secret"
    claims: dict[str, Any] = field(default_factory=lambda: {
        "sub": "cq-0001", "email": "li.ming@cq-ids.example", "email_verified": True, "name": "李明",
        "institution": "CQ-LAB",
    })
    base_url: str = ""
    # ID-token claims to replace (DELETE removes one), e.g. {"aud": "someone-else"}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # The issuer the discovery document claims, when it should lie.
    discovery_issuer: str | None = None
    # Send RFC 9207 `iss` on the authorization response (True: the real issuer; a string: that value).
    iss_param: bool | str = False
    # Answer the authorization request with this error instead of a code.
    authorize_error: str | None = None
    keys: list[RSAKey] = field(default_factory=lambda: [new_key("key-1")])
    signing_key: RSAKey | None = None
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    jwks_fetches: int = 0
    # When set, discovery names a userinfo endpoint that answers these claims for the access tokens it issued.
    userinfo: dict[str, Any] | None = None
    access_tokens: set[str] = field(default_factory=set)
    userinfo_requests: list[str] = field(default_factory=list)

    @property
    def issuer(self) -> str:
        return self.base_url

    def rotate_key(self, kid: str) -> None:
        """Publish a new key and sign with it; the old one disappears from the JWKS."""
        self.keys = [new_key(kid)]
        self.signing_key = None

    def _key(self) -> RSAKey:
        return self.signing_key or self.keys[0]

    # --- endpoints ---

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        handlers = {
            "/.well-known/openid-configuration": self._discovery, "/jwks": self._jwks,
            "/authorize": self._authorize, "/token": self._token, "/userinfo": self._userinfo,
        }
        handler = handlers.get(request.path)
        response = handler(request) if handler else Response("not found", status=404)
        return response(environ, start_response)

    def _json(self, body: dict[str, Any], status: int = 200) -> Response:
        return Response(json.dumps(body), status=status, content_type="application/json")

    def _discovery(self, request: Request) -> Response:
        extra = {"userinfo_endpoint": f"{self.base_url}/userinfo"} if self.userinfo is not None else {}
        return self._json({
            **extra,
            "issuer": self.discovery_issuer or self.issuer,
            "authorization_endpoint": f"{self.base_url}/authorize",
            "token_endpoint": f"{self.base_url}/token",
            "jwks_uri": f"{self.base_url}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
        })

    def _jwks(self, request: Request) -> Response:
        self.jwks_fetches += 1
        return self._json({"keys": [key.as_dict(private=False) for key in self.keys]})

    def _userinfo(self, request: Request) -> Response:
        authorization = request.headers.get("Authorization", "")
        self.userinfo_requests.append(authorization)
        if self.userinfo is None:
            return Response("not found", status=404)
        if authorization.removeprefix("Bearer ") not in self.access_tokens:
            return self._json({"error": "invalid_token"}, 401)
        return self._json(self.userinfo)

    def _authorize(self, request: Request) -> Response:
        args = request.args
        if args.get("client_id") != self.client_id or args.get("response_type") != "code":
            return Response("unknown client", status=400)
        if args.get("code_challenge_method") != "S256" or not args.get("code_challenge"):
            return Response("PKCE required", status=400)
        params: dict[str, str] = {"state": args.get("state", "")}
        if self.authorize_error:
            params["error"] = self.authorize_error
        else:
            code = secrets.token_urlsafe(16)
            self.codes[code] = dict(args)
            params["code"] = code
        if self.iss_param:
            params["iss"] = self.issuer if self.iss_param is True else str(self.iss_param)
        return Response(status=302, headers={"Location": f"{args['redirect_uri']}?{urlencode(params)}"})

    def _token(self, request: Request) -> Response:
        form = request.form
        self.token_requests.append({"form": dict(form), "authorization": request.headers.get("Authorization", "")})
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return self._json({"error": "invalid_client"}, 401)
        grant = self.codes.pop(form.get("code", ""), None)
        if grant is None or form.get("redirect_uri") != grant["redirect_uri"]:
            return self._json({"error": "invalid_grant"}, 400)
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if challenge != grant["code_challenge"]:
            return self._json({"error": "invalid_grant", "error_description": "PKCE verification failed"}, 400)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": self.client_id, "iat": now, "exp": now + 300, "nonce": grant.get("nonce"),
            **self.claims,
        }
        for name, value in self.overrides.items():
            if value is DELETE:
                claims.pop(name, None)
            else:
                claims[name] = value
        key = self._key()
        id_token = jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)
        access_token = secrets.token_urlsafe(16)
        self.access_tokens.add(access_token)
        return self._json({"access_token": access_token, "token_type": "Bearer", "expires_in": 300,
                           "id_token": id_token})


@contextmanager
def running(upstream: Upstream) -> Iterator[Upstream]:
    """Serve `upstream` on a free loopback port in a thread for the duration of the block."""
    server = make_server("127.0.0.1", 0, upstream, threaded=True)
    upstream.base_url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield upstream
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()
