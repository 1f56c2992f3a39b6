"""Users, bearer API tokens, local passwords and browser sessions."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Select, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor, Grant
from labcommons.catalog.models import Institution
from labcommons.config import get_settings
from labcommons.db import utcnow
from labcommons.errors import Conflict, InvalidInput, NotFound, Unauthenticated
from labcommons.identity.models import ApiToken, ExternalIdentity, IdentityProvider, User, WebSession

TOKEN_PREFIX = "lc_"
TOKEN_DEFAULT_LIFETIME = timedelta(days=90)
TOKEN_MAX_LIFETIME = timedelta(days=366)
TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)
SESSION_LIFETIME = timedelta(days=14)


@cache
def _hasher() -> PasswordHasher:
    settings = get_settings()
    return PasswordHasher(time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def actor_for(
    user: User, *, grants: tuple[Grant, ...] = (), scopes: frozenset[str] | None = None,
    token_expires_at: datetime | None = None,
) -> Actor:
    """The Actor of a user, with the role grants, token scopes and token expiry the caller loaded."""
    return Actor(
        user_id=user.id, email=user.email, name=user.name, institution_id=user.institution_id,
        region_code=user.region_code, locale=user.locale, timezone=user.timezone, grants=grants, scopes=scopes,
        token_expires_at=token_expires_at,
    )


def _normalise_email(email: str) -> str:
    email = email.strip().lower()
    local, _, domain = email.partition("@")
    if not local or "." not in domain or len(email) > 254 or any(c.isspace() for c in email):
        raise InvalidInput("That is not an e-mail address.", field="email", code="invalid_email")
    return email


def create_user(
    session: Session, *, email: str, name: str, institution_code: str, password: str | None = None
) -> User:
    """A new user of an institution; Conflict if the e-mail is taken."""
    email = _normalise_email(email)
    if not name.strip():
        raise InvalidInput("A name is required.", field="name", code="missing_field")
    institution = session.scalars(select(Institution).where(Institution.code == institution_code)).first()
    if institution is None:
        raise InvalidInput(f"Unknown institution {institution_code!r}.", field="institution",
                           code="unknown_institution")
    user = User(email=email, name=name.strip(), institution_id=institution.id, region_code=institution.region_code,
                password_hash=_hasher().hash(password) if password else None)
    try:
        with session.begin_nested():
            session.add(user)
            session.flush()
    except IntegrityError as exc:
        raise Conflict(f"A user with e-mail {email} already exists.", field="email") from exc
    return user


def find_user(session: Session, email: str) -> User:
    user = session.scalars(
        select(User).where(User.email == email.strip().lower()).options(joinedload(User.institution))
    ).first()
    if user is None:
        raise NotFound(f"No user with e-mail {email}.", field="email")
    return user


def list_users(session: Session) -> Sequence[User]:
    return session.scalars(select(User).options(joinedload(User.institution)).order_by(User.id)).all()


def create_api_token(
    session: Session,
    user: User,
    *,
    name: str = "",
    scopes: Iterable[str] | None = None,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> str:
    """Issue a bearer token and return it (only its hash is kept, so it is shown once).

    `scopes` None stores no scopes, which means all of them (demo and test tokens); `expires_at` at most a year on.
    """
    from labcommons.identity.roles import SCOPES

    now = now or utcnow()
    if len(name) > 100:
        raise InvalidInput("The name is too long (at most 100 characters).", field="name")
    stored = ""
    if scopes is not None:
        wanted = sorted(set(scopes))
        unknown = [s for s in wanted if s not in SCOPES]
        if unknown:
            raise InvalidInput(f"Unknown scope {unknown[0]!r}; known: {', '.join(SCOPES)}.", field="scopes",
                               code="unknown_scope")
        if not wanted:
            raise InvalidInput("Choose at least one scope.", field="scopes", code="missing_field")
        stored = " ".join(wanted)
    if expires_at is not None:
        if expires_at <= now:
            raise InvalidInput("The expiry date must lie in the future.", field="expires_at", code="expiry_in_past")
        if expires_at > now + TOKEN_MAX_LIFETIME:
            raise InvalidInput("A token may live at most one year.", field="expires_at", code="expiry_too_late")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, token_hash=_digest(token), name=name, scopes=stored,
                         expires_at=expires_at, created_at=now))
    session.flush()
    return token


def rotate_api_token(session: Session, user: User, *, name: str) -> str:
    """Revoke the user's live tokens of this name and issue a new one (used for the printed demo tokens)."""
    now = utcnow()
    for old in session.scalars(
        select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.name == name, ApiToken.revoked_at.is_(None))
    ):
        old.revoked_at = now
    return create_api_token(session, user, name=name)


def authenticate_token(session: Session, token: str, *, now: datetime | None = None) -> Actor:
    """The actor behind a bearer token; Unauthenticated if unknown, revoked or expired."""
    now = now or utcnow()
    row = session.execute(
        select(ApiToken, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_hash == _digest(token))
        .options(joinedload(User.institution))
    ).first()
    if row is None:
        raise Unauthenticated("The API token is not valid.")
    api_token, user = row
    if api_token.revoked_at is not None or (api_token.expires_at and api_token.expires_at <= now):
        raise Unauthenticated("The API token has expired or was revoked.")
    if not user.is_active:
        raise Unauthenticated("The account is disabled.")
    # Stamped at most once a minute so that a busy client does not turn every read into a write.
    if api_token.last_used_at is None or api_token.last_used_at <= now - TOKEN_TOUCH_INTERVAL:
        api_token.last_used_at = now
        session.flush()
    from labcommons.identity.roles import SCOPES, grants_of

    scopes = frozenset(api_token.scopes.split()) if api_token.scopes.strip() else frozenset(SCOPES)
    return actor_for(user, grants=grants_of(session, user.id), scopes=scopes, token_expires_at=api_token.expires_at)


def verify_password(session: Session, email: str, password: str) -> User:
    """The user whose local password this is; Unauthenticated otherwise, without telling which part failed."""
    if not get_settings().local_login_enabled:
        raise Unauthenticated("Sign-in with a platform password is switched off here.")
    try:
        user = find_user(session, email)
    except (NotFound, InvalidInput):
        user = None
    if user is None or not user.password_hash or not user.is_active:
        _hasher().hash(password)  # spend the same time as a real check, so the answer does not reveal accounts
        raise Unauthenticated("Wrong e-mail or password.")
    try:
        _hasher().verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        raise Unauthenticated("Wrong e-mail or password.") from None
    # Hashes made with older cost settings are upgraded while the plain password is at hand.
    if _hasher().check_needs_rehash(user.password_hash):
        user.password_hash = _hasher().hash(password)
        session.flush()
    return user


def start_web_session(session: Session, user: User, *, method: str = "password") -> str:
    """Open a browser session and return the cookie value; `method` records how the user signed in."""
    token = secrets.token_urlsafe(32)
    session.add(WebSession(user_id=user.id, token_hash=_digest(token), expires_at=utcnow() + SESSION_LIFETIME,
                           method=method))
    session.flush()
    return token


def actor_for_web_session(session: Session, token: str) -> Actor | None:
    """The actor of a live browser session, or None."""
    row = session.execute(
        select(WebSession, User)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.token_hash == _digest(token), WebSession.expires_at > utcnow())
        .options(joinedload(User.institution))
    ).first()
    if row is None or not row[1].is_active:
        return None
    from labcommons.identity.roles import grants_of

    return actor_for(row[1], grants=grants_of(session, row[1].id))


def credential_owner(*, bearer: str | None = None, session_token: str | None = None) -> Select[int] | None:
    """A query of the user id behind a live API token (else a browser-session cookie), None for neither: it lets
    the write rate limit name its caller inside its one counting statement, without loading the actor."""
    now = utcnow()
    if bearer:
        return select(ApiToken.user_id).where(
            ApiToken.token_hash == _digest(bearer), ApiToken.revoked_at.is_(None),
            or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now),
        )
    if session_token:
        return select(WebSession.user_id).where(WebSession.token_hash == _digest(session_token),
                                                WebSession.expires_at > now)
    return None


def end_web_session(session: Session, token: str) -> None:
    """Sign one browser out (its cookie's session row goes)."""
    for web_session in session.scalars(select(WebSession).where(WebSession.token_hash == _digest(token))):
        session.delete(web_session)
    session.flush()


def csrf_token(secret: str, session_token: str) -> str:
    """The CSRF token for forms of one browser session (HMAC of the session cookie)."""
    return hmac.new(secret.encode(), b"csrf:" + session_token.encode(), hashlib.sha256).hexdigest()


def check_csrf(secret: str, session_token: str, given: str) -> bool:
    return hmac.compare_digest(csrf_token(secret, session_token), given or "")


# --- the account page: tokens, sessions, linked identities ---------------------------------------------------


def list_api_tokens(session: Session, user_id: int) -> Sequence[ApiToken]:
    """The user's tokens that are not revoked (expired ones too, so the user sees why one stopped), newest first."""
    return session.scalars(
        select(ApiToken).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
        .order_by(ApiToken.id.desc())
    ).all()


def revoke_api_token(session: Session, user_id: int, token_id: int) -> ApiToken:
    """Revoke one of the user's own tokens; anyone else's, or an already revoked one, is NotFound."""
    token = session.get(ApiToken, token_id)
    if token is None or token.user_id != user_id or token.revoked_at is not None:
        raise NotFound("No such API token.", field="token_id")
    token.revoked_at = utcnow()
    session.flush()
    return token


def active_web_sessions(session: Session, user_id: int) -> Sequence[WebSession]:
    return session.scalars(
        select(WebSession).where(WebSession.user_id == user_id, WebSession.expires_at > utcnow())
        .order_by(WebSession.created_at.desc())
    ).all()


def end_all_web_sessions(session: Session, user_id: int) -> int:
    """Sign the user out of every browser; returns how many sessions ended."""
    rows = session.scalars(select(WebSession).where(WebSession.user_id == user_id)).all()
    for row in rows:
        session.delete(row)
    session.flush()
    return len(rows)


def external_identities(session: Session, user_id: int) -> list[tuple[ExternalIdentity, IdentityProvider]]:
    """The user's linked upstream identities with their providers."""
    rows = session.execute(
        select(ExternalIdentity, IdentityProvider)
        .join(IdentityProvider, IdentityProvider.id == ExternalIdentity.provider_id)
        .where(ExternalIdentity.user_id == user_id)
        .order_by(ExternalIdentity.id)
    ).all()
    return [(identity, provider) for identity, provider in rows]


def linkable_providers(session: Session, user_id: int) -> Sequence[IdentityProvider]:
    """Enabled providers the user has no identity at yet."""
    linked = select(ExternalIdentity.provider_id).where(ExternalIdentity.user_id == user_id)
    return session.scalars(
        select(IdentityProvider).where(IdentityProvider.enabled.is_(True), IdentityProvider.id.not_in(linked))
        .order_by(IdentityProvider.name)
    ).all()


def hash_password(password: str) -> str:
    """An argon2id hash of a password with the configured cost."""
    return _hasher().hash(password)
