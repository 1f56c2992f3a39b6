"""Local passwords: the sign-in throttle, reset links sent by e-mail, and the password rules."""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import case, delete, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from labcommons import jobs, mail
from labcommons.config import get_settings
from labcommons.db import UTCDateTime, utcnow
from labcommons.errors import DomainError, InvalidInput, NotFound, TooManyAttempts
from labcommons.identity.models import LoginThrottle, PasswordReset, User, WebSession
from labcommons.identity.service import hash_password

MIN_PASSWORD_LENGTH = 10
# The address of a shared office or campus NAT carries many users, so it gets a larger budget.
ADDRESS_FACTOR = 4


def N_(message: str) -> str:
    """Mark a message for the catalogue; pages translate it where they show it."""
    return message


TOO_SHORT = N_("The password must have at least 10 characters.")
MISMATCH = N_("The two passwords differ.")
SAME_AS_EMAIL = N_("The password must not be your e-mail address.")
LINK_INVALID = N_("This link has expired or was already used. Ask for a new one.")
LOCAL_LOGIN_OFF = N_("Sign-in with a platform password is switched off here.")


class ResetLinkInvalid(DomainError):
    """A reset link that is unknown, expired or used."""

    status_code = 410
    code = "reset_link_invalid"


def normalise_email(email: str) -> str:
    """The throttle's spelling of an e-mail: no validation, so unknown and malformed ones count too."""
    return email.strip().lower()[:254]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- throttle ------------------------------------------------------------------------------------------------


def email_key(email: str) -> str:
    return f"email:{normalise_email(email)}"


def login_keys(email: str, address: str) -> dict[str, int]:
    """The throttle keys of a sign-in and how many failures each tolerates."""
    limit = get_settings().login_max_failures
    return {email_key(email): limit, f"addr:{address}": limit * ADDRESS_FACTOR}


def forgot_keys(email: str, address: str) -> dict[str, int]:
    """The throttle keys of a reset request, kept apart so asking for links cannot lock anyone's sign-in."""
    limit = get_settings().login_max_failures
    return {f"forgot:email:{normalise_email(email)}": limit, f"forgot:addr:{address}": limit * ADDRESS_FACTOR}


def check_not_locked(session: Session, keys: Iterable[str], *, now: datetime | None = None) -> None:
    """TooManyAttempts while any of the keys is locked out."""
    now = now or utcnow()
    until = session.scalar(
        select(LoginThrottle.locked_until)
        .where(LoginThrottle.key.in_(list(keys)), LoginThrottle.locked_until > now)
        .order_by(LoginThrottle.locked_until.desc())
        .limit(1)
    )
    if until is not None:
        seconds = max(1, math.ceil((until - now).total_seconds()))
        raise TooManyAttempts("Too many failed attempts; try again later.", retry_after=seconds)


def record_failure(session: Session, keys: dict[str, int], *, now: datetime | None = None) -> dict[str, int]:
    """Count one failure against each key, locking those that reach their limit; returns the new counts.

    One upsert per key, so concurrent failures from any number of processes are all counted.
    """
    settings = get_settings()
    now = now or utcnow()
    window_cutoff = now - timedelta(seconds=settings.login_window_seconds)
    lock_until = now + timedelta(seconds=settings.login_lockout_seconds)
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = LoginThrottle
    now_value = literal(now, UTCDateTime())
    # A window that ran out, or a lock that ended, starts the count afresh.
    fresh = (table.window_start <= window_cutoff) | (
        table.locked_until.is_not(None) & (table.locked_until <= now)
    )
    counts: dict[str, int] = {}
    for key, limit in sorted(keys.items()):  # a fixed order, so two requests never wait on each other's rows
        upsert = insert(table).values(key=key, failures=1, window_start=now, locked_until=None)
        statement = upsert.on_conflict_do_update(
            index_elements=[table.key],
            set_={
                "failures": case((fresh, 1), else_=table.failures + 1),
                "window_start": case((fresh, now_value), else_=table.window_start),
                "locked_until": case((fresh, literal(None, UTCDateTime())), else_=table.locked_until),
            },
        ).returning(table.failures)
        failures = int(session.execute(statement).scalar_one())
        if failures >= limit:
            session.execute(update(LoginThrottle).where(LoginThrottle.key == key).values(locked_until=lock_until))
        counts[key] = failures
    return counts


def reserve_attempt(session: Session, keys: dict[str, int], *, now: datetime | None = None) -> None:
    """Count a sign-in attempt as a failure before the password is checked; TooManyAttempts past the limit.

    Counting first means parallel guesses cannot all pass the check before any of them is counted: at most
    `limit` attempts per key are ever checked in a window. A success gives the count back (attempt_succeeded).
    """
    now = now or utcnow()
    check_not_locked(session, keys, now=now)
    counts = record_failure(session, keys, now=now)
    if any(counts[key] > limit for key, limit in keys.items()):
        raise TooManyAttempts("Too many failed attempts; try again later.",
                              retry_after=get_settings().login_lockout_seconds)


def attempt_succeeded(session: Session, keys: dict[str, int], email: str) -> None:
    """Forget the e-mail's failures and give back the attempt reserved on the other keys."""
    clear(session, [email_key(email)])
    for key, limit in keys.items():
        if key == email_key(email):
            continue
        session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key == key, LoginThrottle.failures > 0)
            .values(
                failures=LoginThrottle.failures - 1,
                # The reservation of a successful sign-in must not be what locked a shared address.
                locked_until=case((LoginThrottle.failures - 1 < limit, None), else_=LoginThrottle.locked_until),
            )
        )


def clear(session: Session, keys: Iterable[str]) -> None:
    session.execute(delete(LoginThrottle).where(LoginThrottle.key.in_(list(keys))))


def retry_minutes(seconds: int) -> int:
    return max(1, math.ceil(seconds / 60))


# --- passwords and reset links -------------------------------------------------------------------------------


def check_new_password(email: str, password: str, confirmation: str | None = None) -> None:
    """InvalidInput unless the password follows the rules (length, confirmation, not the e-mail)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(TOO_SHORT, field="password", code="password_too_short")
    if confirmation is not None and not secrets.compare_digest(password.encode(), confirmation.encode()):
        raise InvalidInput(MISMATCH, field="confirmation", code="password_mismatch")
    if password.strip().lower() == email.strip().lower():
        raise InvalidInput(SAME_AS_EMAIL, field="password", code="password_is_email")


def set_password(session: Session, user: User, password: str, *, confirmation: str | None = None) -> None:
    """Give a user a new local password, end every browser session they had and cancel open reset links."""
    check_new_password(user.email, password, confirmation)
    user.password_hash = hash_password(password)
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    session.execute(
        update(PasswordReset)
        .where(PasswordReset.user_id == user.id, PasswordReset.used_at.is_(None))
        .values(used_at=utcnow())
    )
    clear(session, [email_key(user.email)])
    session.flush()


def _reset_mail(user: User, link: str, minutes: int) -> mail.Mail:
    # Bilingual on purpose: the reader may not be signed in, so we do not know which language they read.
    text = (
        f"{user.name}，您好：\n\n"
        f"有人（希望是您本人）请求重置您在 LabCommons 平台的密码。请在 {minutes} 分钟内打开以下链接设置新密码：\n\n"
        f"{link}\n\n"
        "该链接只能使用一次。如果不是您本人的请求，请忽略本邮件，您的密码不会改变。\n\n"
        "----------------------------------------\n\n"
        f"Hello {user.name},\n\n"
        "Someone (hopefully you) asked to reset your LabCommons password. Open this link within "
        f"{minutes} minutes to choose a new one:\n\n"
        f"{link}\n\n"
        "The link works once. If you did not ask for it, ignore this message; your password stays as it is.\n"
    )
    return mail.Mail(to=user.email, subject="重置 LabCommons 密码 / Reset your LabCommons password", text=text)


def request_reset(session: Session, email: str, *, now: datetime | None = None) -> str | None:
    """Create a reset link for an active local account and queue its e-mail job; None (and no mail) otherwise.

    Returns the token for the CLI and tests; pages must not show it.
    """
    settings = get_settings()
    now = now or utcnow()
    user = session.scalars(select(User).where(User.email == normalise_email(email))).first()
    if user is None or not user.is_active or not user.password_hash:
        return None
    token = secrets.token_urlsafe(32)
    lifetime = timedelta(seconds=settings.password_reset_lifetime_seconds)
    session.add(PasswordReset(user_id=user.id, token_hash=_digest(token), created_at=now, expires_at=now + lifetime))
    session.flush()
    link = f"{settings.public_base_url.rstrip('/')}/password/reset/{token}"
    message = _reset_mail(user, link, retry_minutes(settings.password_reset_lifetime_seconds))
    # Sent by the job runner, so the answer does not wait for SMTP (nor reveal by its timing that the account exists).
    jobs.enqueue(session, "send_mail", {"to": message.to, "subject": message.subject, "text": message.text})
    return token


def _live_reset(session: Session, token: str, now: datetime) -> tuple[PasswordReset, User]:
    row = session.execute(
        select(PasswordReset, User)
        .join(User, User.id == PasswordReset.user_id)
        .where(PasswordReset.token_hash == _digest(token))
    ).first()
    if row is None or row[0].used_at is not None or row[0].expires_at <= now or not row[1].is_active:
        raise ResetLinkInvalid(LINK_INVALID)
    return row[0], row[1]


def check_reset_token(session: Session, token: str, *, now: datetime | None = None) -> User:
    """The user a live reset link belongs to; ResetLinkInvalid otherwise."""
    return _live_reset(session, token, now or utcnow())[1]


def complete_reset(
    session: Session, token: str, password: str, confirmation: str, *, now: datetime | None = None
) -> User:
    """Set the new password through a live link, use the link up and cancel the user's other links."""
    now = now or utcnow()
    reset, user = _live_reset(session, token, now)
    check_new_password(user.email, password, confirmation)
    # The conditional update is what makes the link single-use when two requests race.
    claimed = session.execute(
        update(PasswordReset).where(PasswordReset.id == reset.id, PasswordReset.used_at.is_(None)).values(used_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise ResetLinkInvalid(LINK_INVALID)
    set_password(session, user, password)  # which also cancels the user's other links
    return user


def set_password_for_email(session: Session, email: str, password: str) -> User:
    """The administrators' way in (CLI): set a user's password by e-mail; NotFound if there is none."""
    user = session.scalars(select(User).where(User.email == normalise_email(email))).first()
    if user is None:
        raise NotFound(f"No user with e-mail {email}.", field="email")
    set_password(session, user, password)
    return user
