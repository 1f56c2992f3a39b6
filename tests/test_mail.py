"""Outgoing mail: a real SMTP server on loopback, and the outbox that sends only after a commit."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes
from email.message import Message
from email.policy import default as default_policy
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SmtpSession

from labcommons import mail
from labcommons.config import get_settings
from labcommons.db import Database
from tests.factories import build_world


class _Collector:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        self.messages.append(message_from_bytes(content, policy=default_policy))
        return "250 OK"


class SmtpSink:
    """An SMTP server on a free loopback port that keeps what it receives."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._collector = _Collector()
        self._controller = Controller(self._collector, hostname="127.0.0.1", port=self.port)

    @property
    def messages(self) -> list[Message]:
        return self._collector.messages

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Message]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.messages


@contextmanager
def settings_env(**values: Any) -> Iterator[None]:
    """Run with LABCOMMONS_<NAME> variables set, re-reading the settings on the way in and out."""
    names = {f"LABCOMMONS_{key.upper()}": str(value) for key, value in values.items()}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        get_settings.cache_clear()


@contextmanager
def smtp_backend(**more: Any) -> Iterator[SmtpSink]:
    """An SMTP sink, with the settings pointing the app's mail at it."""
    sink = SmtpSink()
    sink.start()
    try:
        with settings_env(mail_backend="smtp", smtp_host="127.0.0.1", smtp_port=sink.port,
                          public_base_url="http://labcommons.test", **more):
            yield sink
    finally:
        sink.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with smtp_backend() as sink:
        yield sink


def test_smtp_mailer_delivers_utf8_subject_and_body(smtp: SmtpSink) -> None:
    mail.get_mailer().send(mail.Mail(to="alice@example.org", subject="重置密码 / Reset", text="您好\nHello"))
    [received] = smtp.wait_for(1)
    assert received["To"] == "alice@example.org"
    assert str(received["Subject"]) == "重置密码 / Reset"
    assert "noreply@labcommons.local" in str(received["From"])
    assert received["Message-ID"]
    body = received.get_body(("plain",))
    assert body is not None
    assert "您好" in body.get_content() and "Hello" in body.get_content()


def test_mail_is_sent_after_commit_only(db: Database, smtp: SmtpSink) -> None:
    with db.unit_of_work() as session:
        mail.queue(session, mail.Mail(to="alice@example.org", subject="committed", text="x"))
        assert smtp.messages == []  # queued, not yet sent
    assert [str(m["Subject"]) for m in smtp.wait_for(1)] == ["committed"]


def test_rolled_back_unit_of_work_sends_nothing(db: Database, smtp: SmtpSink) -> None:
    build_world(db)
    with pytest.raises(RuntimeError), db.unit_of_work() as session:
        mail.queue(session, mail.Mail(to="alice@example.org", subject="never", text="x"))
        raise RuntimeError("the work failed")
    with db.unit_of_work() as session:
        # A later commit of a new session must not carry the discarded message either.
        mail.queue(session, mail.Mail(to="bob@example.org", subject="later", text="x"))
    assert [str(m["Subject"]) for m in smtp.wait_for(1)] == ["later"]
    time.sleep(0.2)
    assert len(smtp.messages) == 1


def test_savepoint_commit_does_not_send_and_savepoint_rollback_drops_its_own_mail(
    db: Database, smtp: SmtpSink
) -> None:
    build_world(db)
    with db.unit_of_work() as session:
        mail.queue(session, mail.Mail(to="alice@example.org", subject="outer", text="x"))
        with session.begin_nested():
            mail.queue(session, mail.Mail(to="alice@example.org", subject="kept", text="x"))
        assert smtp.messages == []  # releasing a savepoint is not the commit
        with pytest.raises(RuntimeError), session.begin_nested():
            mail.queue(session, mail.Mail(to="alice@example.org", subject="dropped", text="x"))
            raise RuntimeError("inner work failed")
        assert [m.subject for m in mail.pending(session)] == ["outer", "kept"]
    assert sorted(str(m["Subject"]) for m in smtp.wait_for(2)) == ["kept", "outer"]


def test_a_failing_mail_server_does_not_fail_the_commit(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    build_world(db)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with settings_env(mail_backend="smtp", smtp_port=closed_port), db.unit_of_work() as session:
        mail.queue(session, mail.Mail(to="alice@example.org", subject="lost", text="x"))
    assert "could not send mail to alice@example.org" in caplog.text


def test_console_backend_logs(caplog: pytest.LogCaptureFixture) -> None:
    with settings_env(mail_backend="console"), caplog.at_level("INFO", logger="labcommons.mail"):
        mail.get_mailer().send(mail.Mail(to="a@example.org", subject="hi", text="body"))
    assert "mail to a@example.org: hi" in caplog.text


def test_unknown_backend_is_refused() -> None:
    with settings_env(mail_backend="pigeon"), pytest.raises(ValueError, match="pigeon"):
        mail.get_mailer()
