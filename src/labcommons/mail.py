"""Outgoing e-mail: a Mailer protocol with SMTP and console implementations, and an outbox sent after commit."""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Protocol

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from labcommons.config import Settings, get_settings

log = logging.getLogger("labcommons.mail")

_OUTBOX_KEY = "labcommons_outbox"
_MARKS_KEY = "labcommons_outbox_marks"


@dataclass(frozen=True)
class Mail:
    """One plain-text message to one recipient."""

    to: str
    subject: str
    text: str


class Mailer(Protocol):
    def send(self, mail: Mail) -> None: ...


class ConsoleMailer:
    """Logs messages instead of sending them (the embedded demo and development)."""

    def send(self, mail: Mail) -> None:
        log.info("mail to %s: %s\n%s", mail.to, mail.subject, mail.text)


class SmtpMailer:
    """Sends through an SMTP server with the standard library, optionally with STARTTLS and a login."""

    def __init__(self, settings: Settings, timeout: float = 30.0) -> None:
        self.settings = settings
        self.timeout = timeout

    def message(self, mail: Mail) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.settings.mail_from
        message["To"] = mail.to
        message["Subject"] = mail.subject
        message["Date"] = formatdate(localtime=False)
        domain = parseaddr(self.settings.mail_from)[1].partition("@")[2] or None
        message["Message-ID"] = make_msgid(domain=domain)
        message.set_content(mail.text)
        return message

    def send(self, mail: Mail) -> None:
        settings = self.settings
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=self.timeout) as smtp:
            if settings.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if settings.smtp_username:
                smtp.login(settings.smtp_username, settings.smtp_password)
            smtp.send_message(self.message(mail))


def get_mailer(settings: Settings | None = None) -> Mailer:
    """The mailer `mail_backend` names: "smtp" or "console"."""
    settings = settings or get_settings()
    if settings.mail_backend == "smtp":
        return SmtpMailer(settings)
    if settings.mail_backend == "console":
        return ConsoleMailer()
    raise ValueError(f"unknown mail backend {settings.mail_backend!r}")


def queue(session: Session, mail: Mail) -> None:
    """Send `mail` once the session's transaction commits; a rollback discards it."""
    if not session.in_transaction():
        # Committing a session that never began a transaction fires no commit event; begin one so the mail goes.
        session.begin()
    session.info.setdefault(_OUTBOX_KEY, []).append(mail)


def pending(session: Session) -> list[Mail]:
    """What the session will send on commit."""
    return list(session.info.get(_OUTBOX_KEY, []))


def send_now(mails: list[Mail], mailer: Mailer | None = None) -> int:
    """Send each message, logging failures so one bad address or a mail outage does not fail the request."""
    if not mails:
        return 0
    mailer = mailer or get_mailer()
    sent = 0
    for mail in mails:
        try:
            mailer.send(mail)
            sent += 1
        except Exception:  # the data is committed already; a lost mail must not turn the request into an error
            log.exception("could not send mail to %s (%s)", mail.to, mail.subject)
    return sent


@event.listens_for(Session, "after_transaction_create")
def _mark_savepoint(session: Session, transaction: SessionTransaction) -> None:
    # A savepoint that rolls back must take back only the mail queued inside it.
    if transaction.nested:
        session.info.setdefault(_MARKS_KEY, {})[transaction] = len(session.info.get(_OUTBOX_KEY, []))


@event.listens_for(Session, "after_commit")
def _send_after_commit(session: Session) -> None:
    # Also fires when a savepoint is released; only the outermost commit makes the work durable.
    if session.in_nested_transaction():
        session.info.get(_MARKS_KEY, {}).pop(session.get_nested_transaction(), None)
        return
    session.info.pop(_MARKS_KEY, None)
    send_now(session.info.pop(_OUTBOX_KEY, []))


@event.listens_for(Session, "after_rollback")
def _discard_after_rollback(session: Session) -> None:
    savepoint = session.get_nested_transaction()
    if savepoint is None:
        session.info.pop(_MARKS_KEY, None)
        session.info.pop(_OUTBOX_KEY, None)
        return
    mark = session.info.get(_MARKS_KEY, {}).pop(savepoint, None)
    if mark is not None and _OUTBOX_KEY in session.info:
        del session.info[_OUTBOX_KEY][mark:]
