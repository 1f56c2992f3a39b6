"""Order e-mails: queued with the change, sent by the job runner to a real SMTP server on loopback, in each
recipient's language; the user hears of every change, staff of new orders, quote decisions, cancellations and
messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from email.message import Message

import pytest
from sqlalchemy import select, update

from labcommons import jobs
from labcommons.identity.models import User
from labcommons.notifications.models import Job, NotificationPreference
from labcommons.orders import messages, notify, quotes, service
from labcommons.orders.models import OrderEvent, OrderStatus, ServiceOrder
from tests.factories import World, grant
from tests.orders.order_support import add_service, far_day, new_order
from tests.test_mail import SmtpSink, smtp_backend

S = OrderStatus


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with smtp_backend() as sink:
        yield sink


def body(message: Message) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def english(world: World, *names: str) -> None:
    with world.db.unit_of_work() as s:
        s.execute(update(User).where(User.email.in_([f"{n}@example.org" for n in names])).values(locale="en"))


def run(world: World, smtp: SmtpSink, expected: int) -> dict[str, list[Message]]:
    """Run the queue; the messages it sent, by recipient."""
    before = len(smtp.messages)
    assert jobs.run_pending(world.db, "w").done == expected
    sent = smtp.wait_for(before + expected)[before:]
    assert len(sent) == expected
    by: dict[str, list[Message]] = {}
    for m in sent:
        by.setdefault(str(m["To"]), []).append(m)
    return by


def order_jobs(world: World) -> list[dict[str, object]]:
    with world.db.unit_of_work(write=False) as s:
        return [json.loads(j.payload) for j in s.scalars(select(Job).where(Job.kind == "order_mail").order_by(Job.id))]


def test_the_life_of_an_order_in_mails(world: World, smtp: SmtpSink) -> None:
    english(world, "bob")
    alice = grant(world, "alice")
    grant(world, "carol", role="facility_manager")
    bob = world.actors["bob"]
    order_id = new_order(world, add_service(world), submit=True)
    with world.db.unit_of_work(write=False) as s:
        number = service.get_order(s, bob, order_id).number
    assert smtp.messages == []  # nothing is sent before the runner runs

    # Submitted: the user (English) and both staff members (Chinese) are told.
    sent = run(world, smtp, 3)
    [to_bob] = sent["bob@example.org"]
    assert str(to_bob["Subject"]) == f"Order {number}: Submitted"
    text = body(to_bob)
    assert "Hello Bob" in text and "Single-cell sequencing" in text and "Draft → Submitted" in text
    assert f"http://labcommons.test/orders/{order_id}" in text
    [to_alice] = sent["alice@example.org"]
    assert str(to_alice["Subject"]) == f"[CQ-LAB 平台] 订单 {number}：新订单"
    assert "Bob 提交了 单细胞测序 的新订单" in body(to_alice) and "草稿 → 已提交" in body(to_alice)
    assert len(sent["carol@example.org"]) == 1

    # Quoted by staff: only the user, with the total; staff took the step themselves.
    with world.db.unit_of_work() as s:
        quote_id = quotes.issue_quote(s, alice, order_id, [("Library prep", 2, 60050)], far_day(), "incl. QC").id
    sent = run(world, smtp, 1)
    text = body(sent["bob@example.org"][0])
    assert "Submitted → Quoted" in text and "Quote: ¥1,201.00" in text and "Comment: incl. QC" in text
    assert "By: Alice" in text

    # Accepted: the user and the staff.
    with world.db.unit_of_work() as s:
        quotes.accept_quote(s, bob, order_id, quote_id)
    sent = run(world, smtp, 3)
    assert "报价已接受" in str(sent["alice@example.org"][0]["Subject"])
    assert "¥1,201.00" in body(sent["carol@example.org"][0])

    # Messages go to the other side only.
    with world.db.unit_of_work() as s:
        messages.post_message(s, bob, order_id, "The samples leave on Monday.")
    sent = run(world, smtp, 2)
    assert sorted(sent) == ["alice@example.org", "carol@example.org"]
    assert str(sent["alice@example.org"][0]["Subject"]) == f"订单 {number} 有新留言"
    assert "The samples leave on Monday." in body(sent["alice@example.org"][0])
    with world.db.unit_of_work() as s:
        messages.post_message(s, alice, order_id, "Thank you.")
    sent = run(world, smtp, 1)
    assert str(sent["bob@example.org"][0]["Subject"]) == f"New message on order {number}"

    # Cancelled by the user: staff hear of it, with the reason.
    with world.db.unit_of_work() as s:
        service.transition(s, bob, order_id, S.cancelled, comment="budget cut")
    sent = run(world, smtp, 3)
    assert "用户已取消" in str(sent["alice@example.org"][0]["Subject"])
    assert "说明：budget cut" in body(sent["alice@example.org"][0])
    assert "Accepted → Cancelled" in body(sent["bob@example.org"][0])


def test_staff_are_not_told_of_their_own_steps_and_rejections_reach_the_user(world: World, smtp: SmtpSink) -> None:
    alice = grant(world, "alice")
    grant(world, "carol")
    order_id = new_order(world, add_service(world), submit=True)
    run(world, smtp, 3)
    with world.db.unit_of_work() as s:
        service.transition(s, alice, order_id, S.rejected, comment="we lack the reagent")
    sent = run(world, smtp, 1)
    [to_bob] = sent["bob@example.org"]
    assert "已拒绝" in str(to_bob["Subject"]) and "说明：we lack the reagent" in body(to_bob)


def test_the_automatic_quote_is_announced_as_the_platform(world: World, smtp: SmtpSink) -> None:
    english(world, "bob")
    grant(world, "alice")
    new_order(world, add_service(world, price_fen=12_000), submit=True, sample_count=2)
    sent = run(world, smtp, 3)  # submitted (user + staff) and quoted (user)
    subjects = sorted(str(m["Subject"]) for m in sent["bob@example.org"])
    assert subjects[0].endswith(": Quoted") and subjects[1].endswith(": Submitted")
    quoted = next(m for m in sent["bob@example.org"] if str(m["Subject"]).endswith("Quoted"))
    assert "By: LabCommons" in body(quoted) and "Quote: ¥240.00" in body(quoted)
    # Staff are told of the new order, already quoted at the list price.
    assert "send a quote" not in body(sent["alice@example.org"][0])


def test_nothing_is_queued_for_a_rolled_back_change_or_twice_for_one(world: World) -> None:
    service_id = add_service(world)
    order_id = new_order(world, service_id)
    with pytest.raises(RuntimeError), world.db.unit_of_work() as s:
        service.transition(s, world.actors["bob"], order_id, S.submitted)
        raise RuntimeError("the request failed later")
    assert order_jobs(world) == []
    with world.db.unit_of_work() as s:
        service.transition(s, world.actors["bob"], order_id, S.submitted)
    with world.db.unit_of_work() as s:
        order = s.get(ServiceOrder, order_id)
        event = s.scalars(select(OrderEvent).where(OrderEvent.order_id == order_id, OrderEvent.version == 2)).one()
        assert order is not None
        notify.order_changed(s, order, event)  # a retried announcement of the same change
    assert [(p["template"], p["recipient_id"]) for p in order_jobs(world)] == [
        ("status", world.actors["bob"].user_id)]


def test_a_switched_off_preference_is_respected(world: World) -> None:
    alice = grant(world, "alice")
    with world.db.unit_of_work() as s:
        s.add(NotificationPreference(user_id=alice.user_id, event="order_staff", email=False))
        s.add(NotificationPreference(user_id=world.actors["bob"].user_id, event="order_status", email=False))
    new_order(world, add_service(world), submit=True)
    assert order_jobs(world) == []


@pytest.mark.parametrize("locale", ["zh_CN", "en"])
@pytest.mark.parametrize(("template", "kind"), [("status", ""), ("staff", "submitted"), ("staff", "accepted"),
                                                 ("staff", "declined"), ("staff", "cancelled"), ("message", "")])
def test_every_mail_renders_in_both_languages(template: str, kind: str, locale: str) -> None:
    context = dict(name="Alice", number="SO-2026-000007", title="RNA", service="Sequencing", facility="Core",
                   customer="Bob", url="http://h/orders/7", timezone="Asia/Shanghai", kind=kind,
                   from_status="Quoted", to_status="Accepted", comment="fine", actor="Bob", when="2030-01-02 09:00",
                   quote_total="¥1.00", quote_valid_until="2030-02-01", author="Bob", body="hello there")
    message = notify.render_mail(template, locale, context, "a@example.org")
    assert "SO-2026-000007" in message.subject and "{{" not in message.text and "{%" not in message.text
    assert "http://h/orders/7" in message.text
    if template == "message":
        assert "hello there" in message.text
    else:
        assert "Accepted" in message.text and "fine" in message.text and "¥1.00" in message.text
