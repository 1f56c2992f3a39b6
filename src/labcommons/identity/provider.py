"""The platform as OpenID Connect provider: signing keys, member-system clients, codes, tokens and claims.

Only the authorization-code flow with PKCE (S256) is offered. Claims by scope:
`openid` gives sub, region, institution and roles; `profile` name and locale; `email` email and email_verified.
`roles` is a list of strings "<role>" for platform roles, else "<role>:<kind>:<code>" with kind facility,
institution or region and the code of that facility, institution or region (e.g. "facility_manager:facility:SEQ-F").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

from joserfc import jwt
from joserfc.jwk import RSAKey
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labcommons.catalog.models import Facility, Institution
from labcommons.config import get_settings
from labcommons.db import utcnow
from labcommons.errors import DomainError, InvalidInput, NotFound
from labcommons.identity.models import (
    OidcAccessToken,
    OidcAuthorizationCode,
    OidcClient,
    OidcConsent,
    RoleGrant,
    SigningKey,
    User,
    WebSession,
)

SCOPES_SUPPORTED = ("openid", "profile", "email")
SCOPE_CLAIMS: dict[str, tuple[str, ...]] = {
    "openid": ("sub", "region", "institution", "roles"),
    "profile": ("name", "locale"),
    "email": ("email", "email_verified"),
}
CLAIMS_SUPPORTED = ("iss", "aud", "exp", "iat", "auth_time", "nonce", *(c for cs in SCOPE_CLAIMS.values() for c in cs))
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# RFC 7636 §4.1: the verifier is 43–128 unreserved characters; an S256 challenge is 43 base64url characters.
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_CHALLENGE = re.compile(r"^[A-Za-z0-9\-_]{43}$")
MAX_NONCE = 500


class OAuthError(DomainError):
    """An error of the OAuth protocol, reported as RFC 6749 `error` / `error_description`."""

    status_code = 400

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.code = error

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.message}


class InvalidClient(OAuthError):
    status_code = 401

    def __init__(self, description: str = "Client authentication failed.") -> None:
        super().__init__("invalid_client", description)


class InvalidToken(OAuthError):
    status_code = 401

    def __init__(self, description: str = "The access token is not valid.") -> None:
        super().__init__("invalid_token", description)


class CodeReplayed(OAuthError):
    """A code presented a second time; the caller must revoke the tokens issued from it (RFC 6749 §4.1.2)."""

    def __init__(self, code_id: int) -> None:
        super().__init__("invalid_grant", "The authorization code was already used.")
        self.code_id = code_id


class UnverifiedClient(DomainError):
    """An authorization request whose client or redirect URI cannot be trusted: shown, never redirected to."""

    status_code = 400
    code = "invalid_client"


class AuthorizationError(DomainError):
    """A protocol error of a verified authorization request: sent back to the client's redirect URI."""

    status_code = 400

    def __init__(self, error: str, description: str, *, redirect_uri: str, state: str | None) -> None:
        super().__init__(description)
        self.code = error
        self.redirect_uri = redirect_uri
        self.state = state

    def location(self) -> str:
        return with_query(self.redirect_uri, error=self.code, error_description=self.message, state=self.state,
                          iss=issuer())


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def issuer() -> str:
    """The issuer identifier: the public base URL without a trailing slash."""
    return get_settings().public_base_url.rstrip("/")


def with_query(uri: str, **params: str | None) -> str:
    """`uri` with parameters appended to its query (a registered URI may already have one)."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{uri}{'&' if urlsplit(uri).query else '?'}{query}"


def discovery() -> dict[str, Any]:
    """The OpenID Provider metadata (OpenID Connect Discovery 1.0)."""
    base = issuer()
    return {
        "issuer": base,
        "authorization_endpoint": f"{base}/oidc/authorize",
        "token_endpoint": f"{base}/oidc/token",
        "userinfo_endpoint": f"{base}/oidc/userinfo",
        "jwks_uri": f"{base}/oidc/jwks",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": list(SCOPES_SUPPORTED),
        "claims_supported": list(CLAIMS_SUPPORTED),
        "authorization_response_iss_parameter_supported": True,
    }


# --- signing keys ---


def _generate_key(session: Session) -> SigningKey:
    key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"})
    kid = key.thumbprint()
    row = SigningKey(kid=kid, algorithm="RS256", private_jwk=json.dumps(key.as_dict(private=True, kid=kid)),
                     public_jwk=json.dumps(key.as_dict(private=False, kid=kid)))
    session.add(row)
    session.flush()
    return row


def signing_key(session: Session) -> SigningKey:
    """The newest unretired key, generated on first need."""
    # Two first requests racing may both generate a key; both are published and the newer one signs.
    row = session.scalars(
        select(SigningKey).where(SigningKey.retired_at.is_(None))
        .order_by(SigningKey.created_at.desc(), SigningKey.id.desc()).limit(1)
    ).first()
    return row or _generate_key(session)


def rotate_keys(session: Session) -> SigningKey:
    """Add a new signing key and retire the others; they stay in the JWKS for the grace period."""
    now = utcnow()
    for old in session.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None))):
        old.retired_at = now
    return _generate_key(session)


def _published(now: datetime) -> Any:
    grace = timedelta(seconds=get_settings().oidc_key_grace_seconds)
    return SigningKey.retired_at.is_(None) | (SigningKey.retired_at > now - grace)


def list_keys(session: Session) -> Sequence[SigningKey]:
    return session.scalars(select(SigningKey).order_by(SigningKey.created_at, SigningKey.id)).all()


def is_published(key: SigningKey, now: datetime | None = None) -> bool:
    now = now or utcnow()
    grace = timedelta(seconds=get_settings().oidc_key_grace_seconds)
    return key.retired_at is None or key.retired_at > now - grace


def jwks(session: Session, now: datetime | None = None) -> dict[str, Any]:
    """The public keys relying parties verify ID tokens with: unretired ones and those in their grace period."""
    rows = session.scalars(select(SigningKey).where(_published(now or utcnow())).order_by(SigningKey.id)).all()
    return {"keys": [json.loads(row.public_jwk) for row in rows]}


def prune_keys(session: Session, now: datetime | None = None) -> int:
    """Delete keys retired longer ago than the grace period; returns how many."""
    grace = timedelta(seconds=get_settings().oidc_key_grace_seconds)
    rows = session.scalars(
        select(SigningKey).where(SigningKey.retired_at.is_not(None), SigningKey.retired_at <= (now or utcnow()) - grace)
    ).all()
    for row in rows:
        session.delete(row)
    session.flush()
    return len(rows)


# --- clients ---


def validate_redirect_uri(uri: str) -> str:
    """An absolute https URI, or http on loopback only, without a fragment."""
    uri = uri.strip()
    try:
        parts = urlsplit(uri)
        host = parts.hostname
    except ValueError:
        host, parts = None, None
    ok = (
        parts is not None and host is not None and "#" not in uri and len(uri) <= 2000
        and not any(c.isspace() or ord(c) < 32 for c in uri)
        and (parts.scheme == "https" or (parts.scheme == "http" and host in LOOPBACK_HOSTS))
    )
    if not ok:
        raise InvalidInput(
            f"{uri!r} is not a valid redirect URI: use an absolute https URL (http only on 127.0.0.1 or localhost) "
            "without a fragment.", field="redirect_uri", code="invalid_redirect_uri",
        )
    return uri


def register_client(
    session: Session, *, name: str, redirect_uris: Sequence[str], trusted: bool = False
) -> tuple[OidcClient, str]:
    """Register a member system; returns it and its secret, which is not stored and so shown only now."""
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidInput("A client name of at most 200 characters is required.", field="name",
                           code="missing_field")
    uris = list(dict.fromkeys(validate_redirect_uri(u) for u in redirect_uris if u.strip()))
    if not uris:
        raise InvalidInput("At least one redirect URI is required.", field="redirect_uri", code="missing_field")
    secret = secrets.token_urlsafe(32)
    # Hex after a prefix: an id starting with "-" would read as an option on the command line.
    client = OidcClient(client_id=f"lcc_{secrets.token_hex(12)}", secret_hash=_digest(secret), name=name,
                        redirect_uris="\n".join(uris), trusted=trusted, enabled=True)
    session.add(client)
    session.flush()
    return client, secret


def list_clients(session: Session) -> Sequence[OidcClient]:
    return session.scalars(select(OidcClient).order_by(OidcClient.id)).all()


def find_client(session: Session, client_id: str) -> OidcClient:
    client = session.scalars(select(OidcClient).where(OidcClient.client_id == client_id)).first()
    if client is None:
        raise NotFound(f"No client {client_id}.", field="client_id")
    return client


def set_client_enabled(session: Session, client_id: str, enabled: bool) -> OidcClient:
    client = find_client(session, client_id)
    client.enabled = enabled
    session.flush()
    return client


def set_client_trusted(session: Session, client_id: str, trusted: bool) -> OidcClient:
    client = find_client(session, client_id)
    client.trusted = trusted
    session.flush()
    return client


def redirect_uris_of(client: OidcClient) -> list[str]:
    return [u for u in client.redirect_uris.split("\n") if u]


def authenticate_client(session: Session, client_id: str, client_secret: str) -> OidcClient:
    """The enabled client whose secret this is; InvalidClient otherwise, without telling which part failed."""
    client = session.scalars(select(OidcClient).where(OidcClient.client_id == client_id)).first() \
        if client_id else None
    expected = client.secret_hash if client is not None else _digest(secrets.token_hex(16))
    if not hmac.compare_digest(expected, _digest(client_secret or "")) or client is None or not client.enabled:
        raise InvalidClient()
    return client


# --- authorization ---


@dataclass(frozen=True)
class AuthorizationRequest:
    """A checked authorization request: the client is known and enabled, the redirect URI registered."""

    client_pk: int
    client_id: str
    client_name: str
    trusted: bool
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str | None
    nonce: str | None
    code_challenge: str
    code_challenge_method: str

    @property
    def scope(self) -> str:
        return " ".join(self.scopes)

    def claims(self) -> list[str]:
        return [claim for scope in self.scopes for claim in SCOPE_CLAIMS.get(scope, ())]


def check_authorization_request(
    session: Session, *, client_id: str, redirect_uri: str, response_type: str, scope: str, state: str | None,
    nonce: str | None, code_challenge: str, code_challenge_method: str,
) -> AuthorizationRequest:
    """Check an authorization request in RFC 6749 order: client and redirect URI first, then the rest."""
    client = session.scalars(select(OidcClient).where(OidcClient.client_id == client_id)).first() \
        if client_id else None
    if client is None or not client.enabled:
        raise UnverifiedClient("The application asking you to sign in is not registered or is disabled.")
    if redirect_uri not in redirect_uris_of(client):
        raise UnverifiedClient("The application gave a return address it has not registered.")

    def fail(error: str, description: str) -> AuthorizationError:
        return AuthorizationError(error, description, redirect_uri=redirect_uri, state=state or None)

    if response_type != "code":
        raise fail("unsupported_response_type", "Only response_type=code is supported.")
    requested = scope.split()
    if "openid" not in requested:
        raise fail("invalid_scope", "The scope must include openid.")
    if not code_challenge:
        raise fail("invalid_request", "PKCE is required: send code_challenge with code_challenge_method=S256.")
    if code_challenge_method != "S256":
        raise fail("invalid_request", "Only code_challenge_method=S256 is supported.")
    if not _CHALLENGE.match(code_challenge):
        raise fail("invalid_request", "The code_challenge is not a base64url SHA-256 digest.")
    if nonce is not None and len(nonce) > MAX_NONCE:
        raise fail("invalid_request", "The nonce is too long.")
    # Unknown scopes are ignored (OpenID Connect Core §3.1.2.1); the order of the supported list is kept.
    scopes = tuple(s for s in SCOPES_SUPPORTED if s in requested)
    return AuthorizationRequest(
        client_pk=client.id, client_id=client.client_id, client_name=client.name, trusted=client.trusted,
        redirect_uri=redirect_uri, scopes=scopes, state=state or None, nonce=nonce or None,
        code_challenge=code_challenge, code_challenge_method=code_challenge_method,
    )


def needs_consent(session: Session, request: AuthorizationRequest, user_id: int) -> bool:
    """Whether the user must be asked: never for trusted clients, else unless they allowed these scopes before."""
    if request.trusted:
        return False
    consent = session.scalars(
        select(OidcConsent).where(OidcConsent.user_id == user_id, OidcConsent.client_pk == request.client_pk)
    ).first()
    return consent is None or not set(request.scopes) <= set(consent.scope.split())


def remember_consent(session: Session, request: AuthorizationRequest, user_id: int) -> None:
    """Record that the user allowed the client these scopes (added to what they allowed before)."""
    consent = session.scalars(
        select(OidcConsent).where(OidcConsent.user_id == user_id, OidcConsent.client_pk == request.client_pk)
    ).first()
    if consent is None:
        try:
            # Two tabs allowing at once: the unique key keeps one row; the loser merges into it below.
            with session.begin_nested():
                session.add(OidcConsent(user_id=user_id, client_pk=request.client_pk, scope=request.scope))
                session.flush()
            return
        except IntegrityError:
            consent = session.scalars(
                select(OidcConsent).where(OidcConsent.user_id == user_id,
                                          OidcConsent.client_pk == request.client_pk)
            ).one()
    merged = set(consent.scope.split()) | set(request.scopes)
    consent.scope = " ".join(s for s in SCOPES_SUPPORTED if s in merged)
    session.flush()


def session_auth_time(session: Session, session_token: str) -> datetime:
    """When the user of a browser session last signed in (the ID token's auth_time)."""
    auth_time = session.scalar(select(WebSession.auth_time).where(WebSession.token_hash == _digest(session_token)))
    return auth_time or utcnow()


def issue_code(session: Session, request: AuthorizationRequest, user_id: int, auth_time: datetime) -> str:
    """Issue an authorization code and return the redirect to the client carrying it."""
    code = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(OidcAuthorizationCode(
        code_hash=_digest(code), client_pk=request.client_pk, user_id=user_id, redirect_uri=request.redirect_uri,
        scope=request.scope, nonce=request.nonce, code_challenge=request.code_challenge,
        code_challenge_method=request.code_challenge_method, auth_time=auth_time, created_at=now,
        expires_at=now + timedelta(seconds=get_settings().oidc_code_lifetime_seconds),
    ))
    session.flush()
    return with_query(request.redirect_uri, code=code, state=request.state, iss=issuer())


def deny(request: AuthorizationRequest) -> str:
    """The redirect telling the client the user refused."""
    return AuthorizationError("access_denied", "The user did not allow access.", redirect_uri=request.redirect_uri,
                              state=request.state).location()


# --- tokens and claims ---


def _role_strings(session: Session, user_id: int) -> list[str]:
    rows = session.execute(
        select(RoleGrant.role, RoleGrant.region_code, Facility.code, Institution.code)
        .outerjoin(Facility, Facility.id == RoleGrant.facility_id)
        .outerjoin(Institution, Institution.id == RoleGrant.institution_id)
        .where(RoleGrant.user_id == user_id)
        .order_by(RoleGrant.id)
    ).all()
    roles = []
    for role, region, facility, institution in rows:
        if facility:
            roles.append(f"{role}:facility:{facility}")
        elif institution:
            roles.append(f"{role}:institution:{institution}")
        elif region:
            roles.append(f"{role}:region:{region}")
        else:
            roles.append(str(role))
    return roles


def user_claims(session: Session, user: User, scopes: Sequence[str]) -> dict[str, Any]:
    """The claims about a user the given scopes release."""
    claims: dict[str, Any] = {"sub": str(user.id)}
    if "openid" in scopes:
        institution = session.scalar(select(Institution.code).where(Institution.id == user.institution_id)) \
            if user.institution_id else None
        claims |= {"region": user.region_code, "institution": institution, "roles": _role_strings(session, user.id)}
    if "profile" in scopes:
        claims |= {"name": user.name, "locale": (user.locale or get_settings().default_locale).replace("_", "-")}
    if "email" in scopes:
        # Accounts are created by administrators or through federation with the e-mail the institution vouches
        # for; there is no self-service sign-up that could claim someone else's address.
        claims |= {"email": user.email, "email_verified": True}
    return claims


def exchange_code(
    session: Session, client: OidcClient, *, code: str, redirect_uri: str, code_verifier: str,
) -> dict[str, Any]:
    """Redeem an authorization code for an access token and an ID token (the token response)."""
    if not code:
        raise OAuthError("invalid_request", "The code parameter is required.")
    if not code_verifier:
        raise OAuthError("invalid_request", "PKCE is required: send code_verifier.")
    row = session.scalars(select(OidcAuthorizationCode).where(OidcAuthorizationCode.code_hash == _digest(code))).first()
    if row is None or row.client_pk != client.id:
        raise OAuthError("invalid_grant", "The authorization code is not valid.")
    now = utcnow()
    # The conditional UPDATE is the single-use guard: of two concurrent redemptions only one changes the row.
    marked = session.execute(
        update(OidcAuthorizationCode)
        .where(OidcAuthorizationCode.id == row.id, OidcAuthorizationCode.used_at.is_(None))
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    if marked.rowcount != 1:  # type: ignore[attr-defined]
        raise CodeReplayed(row.id)
    if row.expires_at <= now:
        raise OAuthError("invalid_grant", "The authorization code has expired.")
    if redirect_uri != row.redirect_uri:
        raise OAuthError("invalid_grant", "The redirect_uri does not match the authorization request.")
    digest = hashlib.sha256(code_verifier.encode("ascii", "replace")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    if not _VERIFIER.match(code_verifier) or not hmac.compare_digest(challenge, row.code_challenge):
        raise OAuthError("invalid_grant", "The code_verifier does not match the code_challenge.")
    user = session.get(User, row.user_id)
    if user is None or not user.is_active:
        raise OAuthError("invalid_grant", "The account is disabled.")

    settings = get_settings()
    lifetime = settings.oidc_token_lifetime_seconds
    access_token = secrets.token_urlsafe(32)
    session.add(OidcAccessToken(token_hash=_digest(access_token), client_pk=client.id, user_id=user.id,
                                code_id=row.id, scope=row.scope, created_at=now,
                                expires_at=now + timedelta(seconds=lifetime)))
    scopes = row.scope.split()
    claims = {
        "iss": issuer(), "aud": client.client_id, "iat": int(now.timestamp()),
        "exp": int(now.timestamp()) + lifetime, "auth_time": int(row.auth_time.timestamp()),
        **({"nonce": row.nonce} if row.nonce else {}),
        **user_claims(session, user, scopes),
    }
    key = signing_key(session)
    id_token = jwt.encode({"alg": "RS256", "kid": key.kid}, claims, RSAKey.import_key(json.loads(key.private_jwk)))
    session.flush()
    return {"access_token": access_token, "token_type": "Bearer", "expires_in": lifetime, "id_token": id_token,
            "scope": row.scope}


def revoke_tokens_of_code(session: Session, code_id: int) -> int:
    """Revoke every access token issued from a code (its replay suggests it was stolen); returns how many."""
    result = session.execute(
        update(OidcAccessToken)
        .where(OidcAccessToken.code_id == code_id, OidcAccessToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def userinfo(session: Session, access_token: str) -> dict[str, Any]:
    """The claims an access token may read; InvalidToken if it is unknown, expired or revoked."""
    if not access_token:
        raise InvalidToken("An access token is required.")
    row = session.execute(
        select(OidcAccessToken, User, OidcClient)
        .join(User, User.id == OidcAccessToken.user_id)
        .join(OidcClient, OidcClient.id == OidcAccessToken.client_pk)
        .where(OidcAccessToken.token_hash == _digest(access_token))
    ).first()
    if row is None:
        raise InvalidToken()
    token, user, client = row
    if token.revoked_at is not None or token.expires_at <= utcnow():
        raise InvalidToken("The access token has expired or was revoked.")
    if not user.is_active or not client.enabled:
        raise InvalidToken()
    return user_claims(session, user, token.scope.split())
