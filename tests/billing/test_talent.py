"""Talent cards: what verified cards give (expired, revoked, other region, two cards → the best), who verifies
them, card number uniqueness, the booking horizon a card extends; on both databases. The builders here are
shared by the API and page tests."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from labcommons.actor import Actor
from labcommons.billing import talent
from labcommons.billing.models import CardStatus, EntitlementKind, TalentCard, TalentCardScheme, TalentEntitlement
from labcommons.booking import service as booking
from labcommons.catalog import demo
from labcommons.catalog.models import Service, ServiceKind
from labcommons.db import Database
from labcommons.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.orders import service as orders
from tests.factories import World, actor_of

K = EntitlementKind

# (scheme, provider region, kind, value): unlike the demo, asymmetric, so a test can tell which row applied.
ENTITLEMENTS: tuple[tuple[str, str, EntitlementKind, int], ...] = (
    ("tianfu", "SC", K.priority_window, 30), ("tianfu", "SC", K.fee_discount, 1000), ("tianfu", "SC", K.fast_track, 0),
    ("tianfu", "CQ", K.priority_window, 20), ("tianfu", "CQ", K.fee_discount, 500), ("tianfu", "CQ", K.fast_track, 0),
    ("cq_talent", "CQ", K.priority_window, 45), ("cq_talent", "CQ", K.fee_discount, 1500),
    ("cq_talent", "SC", K.fee_discount, 800),
)


def add_schemes(world: World) -> None:
    """The Tianfu card (SC) and the Chongqing card (CQ) with ENTITLEMENTS."""
    with world.db.unit_of_work() as s:
        s.add_all([TalentCardScheme(code="tianfu", region_code="SC", name_zh="天府人才卡",
                                    name_en="Tianfu Talent Card"),
                   TalentCardScheme(code="cq_talent", region_code="CQ", name_zh="重庆英才服务卡",
                                    name_en="Chongqing Talent Service Card")])
        s.flush()
        s.add_all([TalentEntitlement(scheme_code=c, provider_region_code=r, kind=k, value=v)
                   for c, r, k, v in ENTITLEMENTS])


def authority(world: World, name: str, region: str) -> Actor:
    """A new user `name` (of SC-UNI or CQ-UNI) who is `region`'s authority, with an API token in world.tokens."""
    with world.db.unit_of_work() as s:
        user = identity.create_user(s, email=f"{name}@example.org", name=name.title(),
                                    institution_code="SC-UNI" if region == "SC" else "CQ-UNI",
                                    password="correct horse")
        roles.grant_role(s, None, user, "region_authority", region_code=region)
        world.tokens[name] = identity.create_api_token(s, user, name="test")
    return actor_of(world, name)


def add_card(world: World, user: str, scheme: str = "tianfu", number: str = "TF-0001", *,
             status: CardStatus = CardStatus.verified, valid_until: date | None = None,
             holder: str | None = None) -> int:
    """A card of `user` put straight into `status` (no verification step)."""
    with world.db.unit_of_work() as s:
        card = TalentCard(user_id=world.actors[user].user_id, scheme_code=scheme, card_number=number,
                          holder_name=holder or user.title(), valid_until=valid_until, status=status, note="")
        s.add(card)
        s.flush()
        return card.id


ON = date(2030, 1, 7)


def resolve(world: World, user: str, region: str, on: date = ON) -> tuple[tuple[int, str], int, bool]:
    uid = world.actors[user].user_id
    with world.db.unit_of_work(write=False) as s:
        return (talent.fee_discount(s, uid, region, on), talent.priority_days(s, uid, region, on),
                talent.fast_track(s, uid, region, on))


# --- what cards give ------------------------------------------------------------------------------------------


def test_no_card_gives_nothing(world: World) -> None:
    add_schemes(world)
    assert resolve(world, "bob", "CQ") == ((0, ""), 0, False)


def test_a_verified_card_gives_the_entitlements_of_each_region(world: World) -> None:
    add_schemes(world)
    add_card(world, "bob", "tianfu")
    assert resolve(world, "bob", "SC") == ((1000, "talent:tianfu"), 30, True)
    assert resolve(world, "bob", "CQ") == ((500, "talent:tianfu"), 20, True)
    # A region without rows for the scheme gives nothing; another user's card gives bob nothing.
    assert resolve(world, "bob", "XX") == ((0, ""), 0, False)
    assert resolve(world, "carol", "SC") == ((0, ""), 0, False)


@pytest.mark.parametrize(("status", "valid_until", "gives"), [
    (CardStatus.verified, None, True),
    (CardStatus.verified, ON, True),  # valid through its last day
    (CardStatus.verified, ON - timedelta(days=1), False),  # expired
    (CardStatus.pending, None, False),
    (CardStatus.rejected, None, False),
    (CardStatus.revoked, None, False),
])
def test_only_verified_unexpired_cards_count(world: World, status: CardStatus, valid_until: date | None,
                                             gives: bool) -> None:
    add_schemes(world)
    add_card(world, "bob", "tianfu", status=status, valid_until=valid_until)
    expected = ((1000, "talent:tianfu"), 30, True) if gives else ((0, ""), 0, False)
    assert resolve(world, "bob", "SC") == expected


def test_two_cards_give_the_best_of_each_not_the_sum(world: World) -> None:
    add_schemes(world)
    add_card(world, "bob", "tianfu", "TF-1")
    add_card(world, "bob", "cq_talent", "CQ-1")
    # CQ: tianfu 500 bp / 20 days / fast track, cq_talent 1500 bp / 45 days / none.
    assert resolve(world, "bob", "CQ") == ((1500, "talent:cq_talent"), 45, True)
    # SC: tianfu 1000 bp / 30 days, cq_talent 800 bp.
    assert resolve(world, "bob", "SC") == ((1000, "talent:tianfu"), 30, True)


def test_entitlements_are_data(world: World) -> None:
    add_schemes(world)
    add_card(world, "bob", "tianfu")
    sc = authority(world, "scauth", "SC")
    cq = authority(world, "cqauth", "CQ")
    with world.db.unit_of_work() as s:
        talent.set_entitlement(s, cq, "tianfu", "cq", "fee_discount", 2000)  # region codes are upper-cased
        row = talent.set_entitlement(s, sc, "tianfu", "SC", K.fast_track, 0)
        talent.remove_entitlement(s, sc, row.id)
    assert resolve(world, "bob", "CQ")[0] == (2000, "talent:tianfu")
    assert resolve(world, "bob", "SC")[2] is False
    with world.db.unit_of_work() as s:
        count = len(s.scalars(select(TalentEntitlement).where(TalentEntitlement.scheme_code == "tianfu")).all())
    assert count == 5  # changed in place, not added


@pytest.mark.parametrize(("args", "field", "code"), [
    (("nope", "SC", "fee_discount", 1), "scheme_code", "unknown_scheme"),
    (("tianfu", "XX", "fee_discount", 1), "provider_region_code", "unknown_region"),
    (("tianfu", "SC", "free_lunch", 1), "kind", "invalid_choice"),
    (("tianfu", "SC", "fee_discount", 10001), "value", "out_of_range"),
    (("tianfu", "SC", "priority_window", 366), "value", "out_of_range"),
])
def test_entitlement_input_is_checked(world: World, args: tuple[str, str, str, int], field: str,
                                      code: str) -> None:
    add_schemes(world)
    sc = authority(world, "scauth", "SC")
    with world.db.unit_of_work() as s, pytest.raises(InvalidInput) as caught:
        talent.set_entitlement(s, sc, *args)
    assert (caught.value.field, caught.value.code) == (field, code)


def test_only_the_providers_region_edits_what_its_providers_grant(world: World) -> None:
    add_schemes(world)
    cq = authority(world, "cqauth", "CQ")
    with world.db.unit_of_work() as s:
        # Chongqing cannot set what Sichuan providers give anyone, not even holders of its own card.
        with pytest.raises(Forbidden):
            talent.set_entitlement(s, cq, "cq_talent", "SC", K.fee_discount, 9000)
        sichuan_row = s.scalar(select(TalentEntitlement.id).where(TalentEntitlement.provider_region_code == "SC"))
        assert sichuan_row is not None
        with pytest.raises(NotFound):
            talent.remove_entitlement(s, cq, sichuan_row)
        talent.set_entitlement(s, cq, "tianfu", "CQ", K.priority_window, 10)


# --- submitting and verifying ---------------------------------------------------------------------------------


def submit(world: World, user: str, scheme: str = "tianfu", number: str = "TF-0001", holder: str | None = None,
           valid_until: date | None = None) -> TalentCard:
    with world.db.unit_of_work() as s:
        card = talent.submit_card(s, world.actors[user], scheme, number, holder or user.title(), valid_until,
                                  today=ON)
        s.expunge(card)
        return card


def test_a_card_number_is_unique_per_scheme(world: World) -> None:
    add_schemes(world)
    first = submit(world, "bob", number=" tf-0001 ")
    assert (first.card_number, first.status) == ("TF-0001", CardStatus.pending)
    with pytest.raises(Conflict) as caught:
        submit(world, "carol", number="TF-0001")
    assert (caught.value.code, caught.value.field) == ("card_number_taken", "card_number")
    with pytest.raises(Conflict):  # the owner too, while it is pending
        submit(world, "bob", number="TF-0001")
    # The same number in another scheme is another card.
    assert submit(world, "carol", "cq_talent", "TF-0001").status == CardStatus.pending


def test_the_database_refuses_a_duplicate_number(world: World) -> None:
    add_schemes(world)
    add_card(world, "bob", number="TF-9")
    with pytest.raises(Exception) as caught:
        add_card(world, "carol", number="TF-9")
    assert "uq_talent_card_number" in str(caught.value) or "UNIQUE" in str(caught.value)


@pytest.mark.parametrize(("kwargs", "field", "code"), [
    ({"scheme": "nope"}, "scheme_code", "unknown_scheme"),
    ({"number": "TF 1/2"}, "card_number", "invalid_card_number"),
    ({"number": "  "}, "card_number", "missing_field"),
    ({"holder": " "}, "holder_name", "missing_field"),
    ({"valid_until": ON - timedelta(days=1)}, "valid_until", "card_expired"),
])
def test_submission_input_is_checked(world: World, kwargs: dict[str, object], field: str, code: str) -> None:
    add_schemes(world)
    with pytest.raises(InvalidInput) as caught:
        submit(world, "bob", **kwargs)  # type: ignore[arg-type]
    assert (caught.value.field, caught.value.code) == (field, code)


def verify(world: World, actor: Actor, card_id: int, *, confirm_holder: bool = False, note: str = "") -> TalentCard:
    with world.db.unit_of_work() as s:
        card = talent.verify_card(s, actor, card_id, confirm_holder=confirm_holder, note=note, today=ON)
        s.expunge(card)
        return card


def test_the_issuing_region_verifies_and_no_other(world: World) -> None:
    add_schemes(world)
    sc, cq = authority(world, "scauth", "SC"), authority(world, "cqauth", "CQ")
    tianfu = submit(world, "bob", "tianfu", "TF-1")
    chongqing = submit(world, "carol", "cq_talent", "CQ-1")
    # An SC authority cannot see, let alone verify, a CQ card; a plain user is refused outright.
    with pytest.raises(NotFound):
        verify(world, sc, chongqing.id)
    with pytest.raises(NotFound):
        verify(world, cq, tianfu.id)
    with pytest.raises(Forbidden):
        verify(world, world.actors["alice"], tianfu.id)
    done = verify(world, sc, tianfu.id, note="checked")
    assert (done.status, done.decided_by_id, done.note) == (CardStatus.verified, sc.user_id, "checked")
    assert resolve(world, "bob", "CQ")[1] == 20
    with world.db.unit_of_work(write=False) as s:
        assert [r.card.id for r in talent.authority_cards(s, cq)] == [chongqing.id]
        assert talent.authority_cards(s, sc) == []
        assert [r.card.id for r in talent.authority_cards(s, sc, CardStatus.verified)] == [tianfu.id]
    # A platform admin acts for every region.
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, "alice@example.org"), "platform_admin")
    assert verify(world, actor_of(world, "alice"), chongqing.id).status == CardStatus.verified


def test_a_differing_holder_name_needs_explicit_confirmation(world: World) -> None:
    add_schemes(world)
    sc = authority(world, "scauth", "SC")
    spaced = submit(world, "bob", number="TF-1", holder="  b O b ")
    assert verify(world, sc, spaced.id).status == CardStatus.verified  # case and spaces do not matter
    other = submit(world, "carol", number="TF-2", holder="Carolyn Smith")
    with pytest.raises(InvalidInput) as caught:
        verify(world, sc, other.id)
    assert (caught.value.field, caught.value.code) == ("confirm_holder", "holder_name_mismatch")
    assert verify(world, sc, other.id, confirm_holder=True).status == CardStatus.verified


def test_reject_resubmit_revoke(world: World) -> None:
    add_schemes(world)
    sc = authority(world, "scauth", "SC")
    card = submit(world, "bob", number="TF-1", holder="Robert")
    with world.db.unit_of_work() as s, pytest.raises(InvalidInput) as caught:
        talent.reject_card(s, sc, card.id, "  ")
    assert caught.value.field == "note"
    with world.db.unit_of_work() as s:
        assert talent.reject_card(s, sc, card.id, "Name differs").status == CardStatus.rejected
    with world.db.unit_of_work() as s, pytest.raises(Conflict) as decided:
        talent.reject_card(s, sc, card.id, "again")
    assert decided.value.code == "card_not_pending"
    # The holder corrects the name and resubmits the same number: the card is pending again.
    again = submit(world, "bob", number="TF-1")
    assert (again.id, again.status, again.note) == (card.id, CardStatus.pending, "")
    verify(world, sc, card.id)
    assert resolve(world, "bob", "SC")[1] == 30
    with world.db.unit_of_work() as s:
        assert talent.revoke_card(s, sc, card.id, "Card withdrawn").status == CardStatus.revoked
    assert resolve(world, "bob", "SC") == ((0, ""), 0, False)
    with world.db.unit_of_work() as s, pytest.raises(Conflict) as revoked:
        talent.revoke_card(s, sc, card.id, "again")
    assert revoked.value.code == "card_not_verified"
    with pytest.raises(Conflict):  # a revoked number cannot be submitted again
        submit(world, "bob", number="TF-1")


# --- the booking horizon --------------------------------------------------------------------------------------

SH = ZoneInfo("Asia/Shanghai")
NOW = datetime(2030, 1, 7, 0, 0, tzinfo=SH).astimezone(UTC)


def book_outcome(world: World, user: str, days_ahead: int, key: str = "CONF") -> str:
    start = NOW + timedelta(days=days_ahead)
    try:
        with world.db.unit_of_work() as s:
            booking.reserve_slot(s, world.actors[user], world.instruments[key], start, start + timedelta(hours=1),
                                 "test", now=NOW)
    except DomainError as exc:
        return exc.code
    return "ok"


def test_priority_days_extend_the_booking_horizon_in_the_cards_regions(world: World) -> None:
    add_schemes(world)
    # CONF is a CQ instrument with the default 90-day horizon; tianfu gives 20 more days in CQ.
    assert book_outcome(world, "bob", 100) == "beyond_horizon"
    card = add_card(world, "bob", "tianfu", valid_until=ON)
    assert book_outcome(world, "bob", 100) == "ok"
    assert book_outcome(world, "bob", 111) == "beyond_horizon"
    assert book_outcome(world, "carol", 101) == "beyond_horizon"  # someone without a card
    with world.db.unit_of_work() as s:
        row = s.get(TalentCard, card)
        assert row is not None
        row.status = CardStatus.revoked
    assert book_outcome(world, "bob", 102) == "beyond_horizon"


def test_an_expired_card_no_longer_extends_the_horizon(world: World) -> None:
    add_schemes(world)
    add_card(world, "bob", "tianfu", valid_until=ON - timedelta(days=1))
    assert book_outcome(world, "bob", 100) == "beyond_horizon"


# --- fast track -----------------------------------------------------------------------------------------------


def test_fast_tracked_orders_are_consultations_of_holders(world: World) -> None:
    add_schemes(world)
    with world.db.unit_of_work() as s:
        ids = {}
        for kind in (ServiceKind.consultation, ServiceKind.testing):
            svc = Service(code=f"SVC-{kind.value}", facility_id=world.facilities["SC-UNI"], kind=kind,
                          name_zh="咨询", name_en="Consulting", category_code="GEN.SEQ",
                          institution_id=world.institutions["SC-UNI"], region_code="SC")
            s.add(svc)
            s.flush()
            ids[kind] = svc.id
    made = {}
    with world.db.unit_of_work() as s:
        for user in ("bob", "alice"):
            for kind, sid in ids.items():
                made[(user, kind)] = orders.create_order(s, world.actors[user], sid, title="t", description="",
                                                         sample_count=0, sample_description="").id
    add_card(world, "bob", "cq_talent", "CQ-1")  # no fast track in SC
    with world.db.unit_of_work(write=False) as s:
        rows = [orders.get_order(s, world.actors[u], made[(u, k)]) for u, k in made]
        assert talent.fast_tracked_orders(s, rows, ON) == set()
    add_card(world, "bob", "tianfu", "TF-1")
    with world.db.unit_of_work(write=False) as s:
        rows = [orders.get_order(s, world.actors[u], made[(u, k)]) for u, k in made]
        assert talent.fast_tracked_orders(s, rows, ON) == {made[("bob", ServiceKind.consultation)]}


# --- demo data ------------------------------------------------------------------------------------------------


def test_demo_schemes_are_symmetric_and_seeding_twice_adds_nothing(world: World) -> None:
    with world.db.unit_of_work() as s:
        assert talent.seed_talent(s) == 0  # the demo users are not in the test world
        talent.seed_talent(s)
        rows = s.scalars(select(TalentEntitlement)).all()
        by_scheme: dict[str, set[tuple[str, str, int]]] = {}
        for r in rows:
            by_scheme.setdefault(r.scheme_code, set()).add((r.provider_region_code, r.kind.value, r.value))
    assert set(by_scheme) == {"tianfu", "cq_talent"}
    assert by_scheme["tianfu"] == by_scheme["cq_talent"]
    assert {region for region, _k, _v in by_scheme["tianfu"]} == {"SC", "CQ"}
    assert len(rows) == 2 * 2 * 3


def test_the_demo_holder_gets_the_recognised_entitlements(db: Database) -> None:
    with db.unit_of_work() as s:
        demo.seed_demo(s, bookings=0)
        assert talent.seed_talent(s) == 1
        assert talent.seed_talent(s) == 0
        holder = identity.find_user(s, "liu.zimo@xlut.example.cn")
        today = talent.today()
        # A Sichuan card honoured by Chongqing providers, as by Sichuan's.
        for region in ("CQ", "SC"):
            assert talent.fee_discount(s, holder.id, region, today) == (1000, "talent:tianfu")
            assert talent.priority_days(s, holder.id, region, today) == 30
            assert talent.fast_track(s, holder.id, region, today)
