"""Signing in through upstream OpenID Connect providers (the platform as relying party)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import secrets
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError

with warnings.catch_warnings():
    # Authlib 1.9 nudges its httpx integration towards the httpx2 fork; httpx 0.28 is what the stack pins.
    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    from authlib.integrations.httpx_client import OAuth2Client
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labcommons.booking.models import Booking
from labcommons.catalog.models import Institution, Region
from labcommons.config import get_settings
from labcommons.db import utcnow
from labcommons.errors import Conflict, DomainError, InvalidInput, NotFound
from labcommons.identity.models import (
    ExternalIdentity,
    IdentityProvider,
    LoginState,
    RoleGrant,
    User,
    WebSession,
)

LOGIN_STATE_LIFETIME = timedelta(minutes=10)
METADATA_TTL_SECONDS = 3600.0
# Clock skew tolerated between the provider and us when checking exp and iat.
LEEWAY_SECONDS = 60
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")


# N_ marks a message for the catalogue; the pages translate it where they show it.
def N_(message: str) -> str:
    return message


WRONG_STATE = N_("This sign-in link is no longer valid (wrong state); start signing in again.")
WRONG_PROVIDER = N_("This answer came from a different identity service than the one the sign-in started with.")
PROVIDER_DISABLED = N_("Signing in with this identity service is switched off.")
UNKNOWN_PROVIDER = N_("There is no such identity service.")
PROVIDER_ERROR = N_("The identity service did not sign you in.")
PROVIDER_UNREACHABLE = N_("The identity service could not be reached; try again later.")
BAD_DISCOVERY = N_("The identity service's configuration is not valid (its issuer does not match).")
TOKEN_EXCHANGE_FAILED = N_("The identity service refused to complete the sign-in.")
BAD_SIGNATURE = N_("The identity service's answer has no valid signature.")
WRONG_ISSUER = N_("The identity service's answer names a different issuer.")
WRONG_AUDIENCE = N_("The identity service's answer was meant for another application.")
TOKEN_EXPIRED = N_("The identity service's answer has expired; sign in again.")
TOKEN_FROM_FUTURE = N_("The identity service's answer is dated in the future; check the clocks.")
WRONG_NONCE = N_("The identity service's answer does not belong to this sign-in (wrong nonce).")
NO_SUBJECT = N_("The identity service's answer does not say who you are.")
NO_EMAIL = N_("The identity service did not share your e-mail address, which the platform needs.")
EMAIL_UNVERIFIED = N_(
    "The identity service has not verified your e-mail address. Verify it there, then sign in again."
)
EMAIL_EXISTS = N_(
    "An account with this e-mail already exists. Sign in with it and link this identity from your account page, "
    "or ask an administrator to merge the accounts."
)
ACCOUNT_DISABLED = N_("This account is disabled.")
IDENTITY_TAKEN = N_("This identity already belongs to another account.")
LAST_SIGN_IN_METHOD = N_("This is your only way to sign in; set a password or link another identity first.")
NO_SUCH_IDENTITY = N_("There is no such linked identity.")
USERINFO_WRONG_SUBJECT = N_(
    "The identity service's profile answer is about a different person than its sign-in answer; sign-in refused."
)
# Claims taken from the userinfo endpoint when the ID token lacks them (the ID token's own win).
USERINFO_CLAIMS = ("email", "email_verified", "name", "institution")


class SignInRefused(DomainError):
    """An upstream sign-in that must not go through; `code` names the reason."""

    status_code = 400
    code = "sign_in_refused"

    def __init__(self, message: str, *, code: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status_code = status_code


# --- providers ---


def enabled_providers(session: Session) -> Sequence[IdentityProvider]:
    """The providers the sign-in page offers, by region then name."""
    return session.scalars(
        select(IdentityProvider).where(IdentityProvider.enabled.is_(True))
        .order_by(IdentityProvider.region_code, IdentityProvider.name)
    ).all()


def list_providers(session: Session) -> Sequence[IdentityProvider]:
    """Every provider, enabled or not, by region then name."""
    return session.scalars(select(IdentityProvider).order_by(IdentityProvider.region_code, IdentityProvider.name)).all()


def list_regions(session: Session) -> Sequence[Region]:
    return session.scalars(select(Region).order_by(Region.code)).all()


def get_provider(session: Session, name: str) -> IdentityProvider:
    provider = session.scalars(select(IdentityProvider).where(IdentityProvider.name == name)).first()
    if provider is None:
        raise NotFound(UNKNOWN_PROVIDER, field="name")
    return provider


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_issuer(issuer: str) -> str:
    """The issuer URL if usable: https, or plain http on loopback only (demo and tests)."""
    parts = urlsplit(issuer.strip())
    if parts.query or parts.fragment or not parts.hostname or parts.scheme not in ("https", "http"):
        raise InvalidInput(N_("The issuer must be an https URL without query or fragment."), field="issuer",
                           code="invalid_issuer")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise InvalidInput(N_("The issuer must use https (plain http is allowed on loopback only)."),
                           field="issuer", code="invalid_issuer")
    return issuer.strip()


def add_provider(
    session: Session, *, name: str, region_code: str, issuer: str, client_id: str, client_secret: str = "",
    display_name_zh: str = "", display_name_en: str = "", trusted_for_linking: bool = False,
    scopes: str = "openid email profile",
) -> IdentityProvider:
    """Register an upstream provider; its discovery document is fetched at first use, not now."""
    name = name.strip()
    if not _NAME.match(name):
        raise InvalidInput(N_("The name must be a short slug: lower-case letters, digits and hyphens."),
                           field="name", code="invalid_name")
    if session.get(Region, region_code) is None:
        raise InvalidInput(N_("There is no such region."), field="region", code="unknown_region")
    issuer = check_issuer(issuer)
    if not client_id.strip():
        raise InvalidInput(N_("A client ID is required."), field="client_id", code="missing_field")
    if "openid" not in scopes.split():
        scopes = "openid " + scopes
    provider = IdentityProvider(
        name=name, region_code=region_code, issuer=issuer, client_id=client_id.strip(), client_secret=client_secret,
        display_name_zh=display_name_zh.strip(), display_name_en=display_name_en.strip(),
        trusted_for_linking=trusted_for_linking, scopes=scopes.strip(),
    )
    try:
        with session.begin_nested():
            session.add(provider)
            session.flush()
    except IntegrityError as exc:
        raise Conflict(N_("An identity service with this name already exists."), field="name") from exc
    return provider


def set_provider_enabled(session: Session, name: str, enabled: bool) -> IdentityProvider:
    provider = get_provider(session, name)
    provider.enabled = enabled
    session.flush()
    return provider


def set_trusted_for_linking(session: Session, name: str, trusted: bool) -> IdentityProvider:
    provider = get_provider(session, name)
    provider.trusted_for_linking = trusted
    session.flush()
    return provider


# --- discovery and keys, cached per process ---


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    # None when the discovery document names none (or one that is not https, or http on loopback).
    userinfo_endpoint: str | None = None


_lock = threading.Lock()
_metadata_cache: dict[str, tuple[float, ProviderMetadata]] = {}
_jwks_cache: dict[str, tuple[float, KeySet]] = {}


def clear_caches() -> None:
    """Forget cached discovery documents and key sets (tests; a provider changed its configuration)."""
    with _lock:
        _metadata_cache.clear()
        _jwks_cache.clear()


def _get_json(url: str) -> dict[str, Any]:
    try:
        response = httpx.get(url, timeout=get_settings().oidc_http_timeout_seconds, follow_redirects=False)
        response.raise_for_status()
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise SignInRefused(PROVIDER_UNREACHABLE, code="provider_unreachable", status_code=502) from exc
    if not isinstance(body, dict):
        raise SignInRefused(PROVIDER_UNREACHABLE, code="provider_unreachable", status_code=502)
    return body


def _usable_endpoint(url: str) -> bool:
    """Whether an endpoint is one we send a bearer token to: https, or plain http on loopback only."""
    parts = urlsplit(url)
    if not parts.hostname or parts.scheme not in ("https", "http"):
        return False
    return parts.scheme == "https" or _is_loopback(parts.hostname)


def provider_metadata(issuer: str) -> ProviderMetadata:
    """The discovery document of an issuer; its own `issuer` must equal the configured one exactly."""
    now = time.monotonic()
    with _lock:
        cached = _metadata_cache.get(issuer)
    if cached and now - cached[0] < METADATA_TTL_SECONDS:
        return cached[1]
    doc = _get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
    fields = ("authorization_endpoint", "token_endpoint", "jwks_uri")
    if doc.get("issuer") != issuer or not all(isinstance(doc.get(f), str) and doc.get(f) for f in fields):
        raise SignInRefused(BAD_DISCOVERY, code="bad_discovery", status_code=502)
    userinfo = doc.get("userinfo_endpoint")
    metadata = ProviderMetadata(
        issuer, doc["authorization_endpoint"], doc["token_endpoint"], doc["jwks_uri"],
        userinfo_endpoint=userinfo if isinstance(userinfo, str) and _usable_endpoint(userinfo) else None,
    )
    with _lock:
        _metadata_cache[issuer] = (now, metadata)
    return metadata


def _key_set(jwks_uri: str, *, refresh: bool = False) -> KeySet:
    now = time.monotonic()
    with _lock:
        cached = _jwks_cache.get(jwks_uri)
    if cached and not refresh and now - cached[0] < METADATA_TTL_SECONDS:
        return cached[1]
    try:
        keys = KeySet.import_key_set(_get_json(jwks_uri))  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise SignInRefused(BAD_SIGNATURE, code="bad_signature") from exc
    with _lock:
        _jwks_cache[jwks_uri] = (now, keys)
    return keys


def _token_header(token: str) -> dict[str, Any]:
    try:
        segment = token.split(".")[0]
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, IndexError) as exc:
        raise SignInRefused(BAD_SIGNATURE, code="bad_signature") from exc
    if not isinstance(header, dict):
        raise SignInRefused(BAD_SIGNATURE, code="bad_signature")
    return header


def _signing_key(jwks_uri: str, kid: str | None) -> Any:
    keys = _key_set(jwks_uri)
    if kid is None:
        if len(keys.keys) == 1:
            return keys.keys[0]
        raise SignInRefused(BAD_SIGNATURE, code="bad_signature")
    for attempt in range(2):
        for key in keys.keys:
            if key.kid == kid:
                return key
        if attempt == 0:
            # An unknown kid usually means the provider rotated its keys: fetch them again, once.
            keys = _key_set(jwks_uri, refresh=True)
    raise SignInRefused(BAD_SIGNATURE, code="unknown_key")


def verify_id_token(
    id_token: str, *, issuer: str, client_id: str, nonce: str, jwks_uri: str, now: datetime | None = None
) -> dict[str, Any]:
    """The claims of an ID token after checking signature, iss, aud/azp, exp, iat, nonce and sub."""
    header = _token_header(id_token)
    kid = header.get("kid")
    key = _signing_key(jwks_uri, kid if isinstance(kid, str) else None)
    try:
        claims = jwt.decode(id_token, key, algorithms=ID_TOKEN_ALGORITHMS).claims
    except (JoseError, ValueError) as exc:
        raise SignInRefused(BAD_SIGNATURE, code="bad_signature") from exc
    if claims.get("iss") != issuer:
        raise SignInRefused(WRONG_ISSUER, code="wrong_issuer")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if client_id not in audiences or (len(audiences) > 1 and claims.get("azp") != client_id):
        raise SignInRefused(WRONG_AUDIENCE, code="wrong_audience")
    if "azp" in claims and claims["azp"] != client_id:
        raise SignInRefused(WRONG_AUDIENCE, code="wrong_audience")
    timestamp = (now or utcnow()).timestamp()
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or exp + LEEWAY_SECONDS <= timestamp:
        raise SignInRefused(TOKEN_EXPIRED, code="token_expired")
    if not isinstance(iat, int | float) or iat - LEEWAY_SECONDS > timestamp:
        raise SignInRefused(TOKEN_FROM_FUTURE, code="token_not_yet_valid")
    if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(claims["nonce"], nonce):
        raise SignInRefused(WRONG_NONCE, code="wrong_nonce")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise SignInRefused(NO_SUBJECT, code="no_subject")
    return dict(claims)


# --- the flow ---


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def redirect_uri(name: str) -> str:
    """Where the provider sends the browser back; registered with the provider."""
    return f"{get_settings().public_base_url.rstrip('/')}/login/oidc/{name}/callback"


def _client(provider: IdentityProvider | PendingLogin) -> OAuth2Client:
    return OAuth2Client(
        client_id=provider.client_id, client_secret=provider.client_secret,
        token_endpoint_auth_method="client_secret_basic", scope=provider.scopes,
        redirect_uri=redirect_uri(provider.name), code_challenge_method="S256",
        timeout=get_settings().oidc_http_timeout_seconds,
    )


@dataclass(frozen=True)
class AuthorizationRedirect:
    """Where to send the browser, and the browser-binding value to keep in its cookie."""

    url: str
    browser_token: str


def begin_login(
    session: Session, name: str, *, next_path: str = "/", browser_token: str | None = None,
    link_user_id: int | None = None,
) -> AuthorizationRedirect:
    """Start an authorization-code flow with PKCE at provider `name`; the caller sets the browser cookie."""
    provider = get_provider(session, name)
    if not provider.enabled:
        raise SignInRefused(PROVIDER_DISABLED, code="provider_disabled", status_code=403)
    metadata = provider_metadata(provider.issuer)
    state, nonce, verifier = generate_token(43), generate_token(43), generate_token(64)
    browser_token = browser_token or secrets.token_urlsafe(32)
    session.execute(delete(LoginState).where(LoginState.expires_at <= utcnow()))
    session.add(LoginState(
        state_hash=_digest(state), provider_id=provider.id, browser_hash=_digest(browser_token), nonce=nonce,
        code_verifier=verifier, next_path=next_path, link_user_id=link_user_id,
        expires_at=utcnow() + LOGIN_STATE_LIFETIME,
    ))
    session.flush()
    with _client(provider) as client:
        url, _state = client.create_authorization_url(
            metadata.authorization_endpoint, state=state, nonce=nonce, code_verifier=verifier,
        )
    return AuthorizationRedirect(url=url, browser_token=browser_token)


@dataclass(frozen=True)
class PendingLogin:
    """A taken login state with its provider: what the checks, the code exchange and the account step need."""

    provider_id: int
    name: str
    issuer: str
    client_id: str
    client_secret: str
    scopes: str
    provider_enabled: bool
    browser_hash: str
    expires_at: datetime
    nonce: str
    code_verifier: str
    next_path: str
    link_user_id: int | None


def take_login_state(session: Session, state: str) -> PendingLogin:
    """Find and delete (single use) the login state of a callback; WRONG_STATE if there is none.

    The caller commits the deletion before checking the state, so a refused callback cannot be replayed either.
    """
    row = session.scalars(select(LoginState).where(LoginState.state_hash == _digest(state or ""))).first()
    if row is None:
        raise SignInRefused(WRONG_STATE, code="wrong_state")
    provider = session.get(IdentityProvider, row.provider_id)
    assert provider is not None  # the foreign key cascades
    session.delete(row)
    session.flush()
    return PendingLogin(
        provider_id=provider.id, name=provider.name, issuer=provider.issuer, client_id=provider.client_id,
        client_secret=provider.client_secret, scopes=provider.scopes, provider_enabled=provider.enabled,
        browser_hash=row.browser_hash, expires_at=row.expires_at, nonce=row.nonce, code_verifier=row.code_verifier,
        next_path=row.next_path, link_user_id=row.link_user_id,
    )


def check_callback(pending: PendingLogin, name: str, *, browser_token: str | None, iss: str | None) -> None:
    """Refuse a callback from another browser, too late, on the wrong provider's address or naming another issuer."""
    if pending.expires_at <= utcnow() or not browser_token or not secrets.compare_digest(
        pending.browser_hash, _digest(browser_token)
    ):
        raise SignInRefused(WRONG_STATE, code="wrong_state")
    if pending.name != name:
        # Mix-up defence: a flight started at one provider must come back on that provider's callback.
        raise SignInRefused(WRONG_PROVIDER, code="provider_mix_up")
    if not pending.provider_enabled:
        raise SignInRefused(PROVIDER_DISABLED, code="provider_disabled", status_code=403)
    if iss is not None and iss != pending.issuer:
        # RFC 9207: the authorization response says which issuer produced it.
        raise SignInRefused(WRONG_PROVIDER, code="provider_mix_up")


def exchange_code(pending: PendingLogin, code: str) -> dict[str, Any]:
    """Trade the code (with the PKCE verifier) for tokens and return the verified ID-token claims."""
    metadata = provider_metadata(pending.issuer)
    try:
        with _client(pending) as client:
            token = client.fetch_token(
                metadata.token_endpoint, grant_type="authorization_code", code=code,
                code_verifier=pending.code_verifier,
            )
    except httpx.HTTPError as exc:
        raise SignInRefused(PROVIDER_UNREACHABLE, code="provider_unreachable", status_code=502) from exc
    except (OAuthError, ValueError, KeyError, TypeError) as exc:
        # Whatever a misbehaving token endpoint sends back is a refusal, never a server error.
        raise SignInRefused(TOKEN_EXCHANGE_FAILED, code="token_exchange_failed") from exc
    id_token = token.get("id_token")
    if not isinstance(id_token, str):
        raise SignInRefused(TOKEN_EXCHANGE_FAILED, code="token_exchange_failed")
    claims = verify_id_token(id_token, issuer=pending.issuer, client_id=pending.client_id, nonce=pending.nonce,
                             jwks_uri=metadata.jwks_uri)
    access_token = token.get("access_token")
    if not _claim_str(claims, "email") and metadata.userinfo_endpoint and isinstance(access_token, str):
        # Some providers put the e-mail only in the userinfo answer (OIDC Core 5.4); no database work is open here.
        claims = _with_userinfo(claims, fetch_userinfo(metadata.userinfo_endpoint, access_token, claims["sub"]))
    return claims


def fetch_userinfo(endpoint: str, access_token: str, subject: str) -> dict[str, Any]:
    """The userinfo claims for the access token; refused unless they are about `subject` (OIDC Core 5.3.2)."""
    try:
        response = httpx.get(
            endpoint, headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            timeout=get_settings().oidc_http_timeout_seconds, follow_redirects=False,
        )
    except httpx.HTTPError as exc:
        raise SignInRefused(PROVIDER_UNREACHABLE, code="provider_unreachable", status_code=502) from exc
    if response.status_code != 200:
        raise SignInRefused(TOKEN_EXCHANGE_FAILED, code="userinfo_failed")
    try:
        body = response.json()
    except ValueError as exc:  # e.g. a signed userinfo answer, which we do not ask for
        raise SignInRefused(TOKEN_EXCHANGE_FAILED, code="userinfo_failed") from exc
    if not isinstance(body, dict):
        raise SignInRefused(TOKEN_EXCHANGE_FAILED, code="userinfo_failed")
    sub = body.get("sub")
    if not isinstance(sub, str) or not secrets.compare_digest(sub.encode(), subject.encode()):
        # Token substitution: the answer is about somebody else, so none of it may be used.
        raise SignInRefused(USERINFO_WRONG_SUBJECT, code="userinfo_wrong_subject")
    return body


def _with_userinfo(claims: dict[str, Any], userinfo: dict[str, Any]) -> dict[str, Any]:
    """The ID-token claims completed with the userinfo's e-mail, verification, name and institution."""
    merged = dict(claims)
    for name in USERINFO_CLAIMS:
        if merged.get(name) in (None, "") and userinfo.get(name) not in (None, ""):
            merged[name] = userinfo[name]
    return merged


def _claim_str(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    return value.strip() if isinstance(value, str) else ""


def _email_of(claims: dict[str, Any]) -> str | None:
    email = _claim_str(claims, "email").lower()
    local, _, domain = email.partition("@")
    if not local or "." not in domain or len(email) > 254 or any(c.isspace() for c in email):
        return None
    return email


def _email_verified(claims: dict[str, Any]) -> bool:
    # Some providers send the boolean as a string.
    return claims.get("email_verified") in (True, "true")


def _attach(session: Session, user_id: int, pending: PendingLogin, claims: dict[str, Any]) -> ExternalIdentity:
    identity = ExternalIdentity(
        user_id=user_id, provider_id=pending.provider_id, issuer=pending.issuer, subject=claims["sub"],
        email=_email_of(claims), email_verified=_email_verified(claims), last_login_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(identity)
            session.flush()
    except IntegrityError as exc:
        # The same identity arrived twice at once and the other request attached it first.
        raise SignInRefused(IDENTITY_TAKEN, code="identity_taken", status_code=409) from exc
    return identity


def account_for(session: Session, pending: PendingLogin, claims: dict[str, Any]) -> User:
    """The user a verified identity signs in (found, linked or created); for a link flight, the linking user."""
    identity = session.scalars(
        select(ExternalIdentity).where(ExternalIdentity.issuer == pending.issuer,
                                       ExternalIdentity.subject == claims["sub"])
    ).first()
    if pending.link_user_id is not None:
        user = session.get(User, pending.link_user_id)
        if user is None or not user.is_active:
            raise SignInRefused(ACCOUNT_DISABLED, code="account_disabled", status_code=403)
        if identity is not None and identity.user_id != user.id:
            raise SignInRefused(IDENTITY_TAKEN, code="identity_taken", status_code=409)
        if identity is None:
            _attach(session, user.id, pending, claims)
        return user
    if identity is not None:
        user = session.get(User, identity.user_id)
        if user is None or not user.is_active:
            raise SignInRefused(ACCOUNT_DISABLED, code="account_disabled", status_code=403)
        identity.last_login_at = utcnow()
        identity.email = _email_of(claims) or identity.email
        identity.email_verified = _email_verified(claims)
        session.flush()
        return user
    email = _email_of(claims)
    if email is None:
        raise SignInRefused(NO_EMAIL, code="no_email")
    provider = session.get(IdentityProvider, pending.provider_id)
    assert provider is not None
    owner = session.scalars(select(User).where(User.email == email)).first()
    if owner is not None:
        # Only a provider trusted to vouch for e-mail addresses may attach itself to an account by e-mail, and
        # only to an account whose address was itself vouched for (else an early sign-up could capture it).
        if (_email_verified(claims) and provider.trusted_for_linking and owner.is_active
                and _email_vouched_for(session, owner)):
            _attach(session, owner.id, pending, claims)
            return owner
        raise SignInRefused(EMAIL_EXISTS, code="email_exists", status_code=409)
    if not _email_verified(claims):
        # Accounts carry e-mail addresses that member systems are told are verified; an unverified claim could
        # name somebody else's address.
        raise SignInRefused(EMAIL_UNVERIFIED, code="email_unverified", status_code=403)
    institution_id = None
    if code := _claim_str(claims, "institution"):
        institution_id = session.scalars(
            select(Institution.id).where(Institution.code == code, Institution.region_code == provider.region_code)
        ).first()
    name = _claim_str(claims, "name")[:200] or email.partition("@")[0]
    user = User(email=email, name=name, region_code=provider.region_code, institution_id=institution_id)
    try:
        with session.begin_nested():
            session.add(user)
            session.flush()
    except IntegrityError as exc:
        raise SignInRefused(EMAIL_EXISTS, code="email_exists", status_code=409) from exc
    _attach(session, user.id, pending, claims)
    return user


def _email_vouched_for(session: Session, user: User) -> bool:
    """Whether the account's address came from an administrator or a provider trusted for linking."""
    identities = session.execute(
        select(ExternalIdentity.email, ExternalIdentity.email_verified, IdentityProvider.trusted_for_linking)
        .join(IdentityProvider, IdentityProvider.id == ExternalIdentity.provider_id)
        .where(ExternalIdentity.user_id == user.id)
    ).all()
    if not identities:
        return True  # made by an administrator or the CLI: there is no self sign-up
    return any(trusted and verified and email == user.email for email, verified, trusted in identities)


# --- linked identities and merging ---


@dataclass(frozen=True)
class LinkedIdentity:
    """An external identity as the account page shows it."""

    id: int
    provider_name: str
    display_name_zh: str
    display_name_en: str
    region_code: str
    issuer: str
    subject: str
    email: str | None
    created_at: datetime
    last_login_at: datetime | None


def linked_identities(session: Session, user_id: int) -> list[LinkedIdentity]:
    rows = session.execute(
        select(ExternalIdentity, IdentityProvider)
        .join(IdentityProvider, IdentityProvider.id == ExternalIdentity.provider_id)
        .where(ExternalIdentity.user_id == user_id)
        .order_by(ExternalIdentity.id)
    ).all()
    return [
        LinkedIdentity(
            id=identity.id, provider_name=provider.name, display_name_zh=provider.display_name_zh,
            display_name_en=provider.display_name_en, region_code=provider.region_code, issuer=identity.issuer,
            subject=identity.subject, email=identity.email, created_at=identity.created_at,
            last_login_at=identity.last_login_at,
        )
        for identity, provider in rows
    ]


def unlink_identity(session: Session, *, user_id: int, identity_id: int) -> None:
    """Remove one of the user's identities, unless it is their last way to sign in."""
    identity = session.get(ExternalIdentity, identity_id)
    if identity is None or identity.user_id != user_id:
        raise NotFound(NO_SUCH_IDENTITY)
    # Lock the user row so two concurrent unlinks cannot both pass the "another way remains" check.
    user = session.scalars(select(User).where(User.id == user_id).with_for_update()).one()
    others = session.scalar(
        select(func.count()).select_from(ExternalIdentity)
        .where(ExternalIdentity.user_id == user_id, ExternalIdentity.id != identity_id)
    ) or 0
    if not user.password_hash and others == 0:
        raise Conflict(LAST_SIGN_IN_METHOD)
    session.delete(identity)
    session.flush()


@dataclass(frozen=True)
class MergeResult:
    identities_moved: int
    sessions_ended: int
    bookings_moved: int = 0
    roles_moved: int = 0


def merge_users(session: Session, *, from_email: str, into_email: str) -> MergeResult:
    """Move one account's identities, bookings and roles into another, end its sessions and deactivate it."""
    source = session.scalars(select(User).where(User.email == from_email.strip().lower())).first()
    target = session.scalars(select(User).where(User.email == into_email.strip().lower())).first()
    if source is None or target is None:
        raise NotFound(N_("There is no user with that e-mail."), field="email")
    if source.id == target.id:
        raise InvalidInput(N_("An account cannot be merged into itself."), field="email", code="same_account")
    identities = session.scalars(select(ExternalIdentity).where(ExternalIdentity.user_id == source.id)).all()
    for identity in identities:
        identity.user_id = target.id
    sessions = session.scalars(select(WebSession).where(WebSession.user_id == source.id)).all()
    for web_session in sessions:
        session.delete(web_session)
    # The person's history and duties follow them; a role the target already holds is simply dropped.
    bookings = session.scalars(select(Booking).where(Booking.user_id == source.id)).all()
    for booking in bookings:
        booking.user_id = target.id
    held = {(role, scope) for role, scope in session.execute(
        select(RoleGrant.role, RoleGrant.scope_key).where(RoleGrant.user_id == target.id)
    )}
    roles_moved = 0
    for grant in session.scalars(select(RoleGrant).where(RoleGrant.user_id == source.id)).all():
        if (grant.role, grant.scope_key) in held:
            session.delete(grant)
        else:
            grant.user_id = target.id
            roles_moved += 1
    source.is_active = False
    session.flush()
    return MergeResult(identities_moved=len(identities), sessions_ended=len(sessions),
                       bookings_moved=len(bookings), roles_moved=roles_moved)
