"""The world of the authorisation matrix: two institutions in each region, a facility each, and one real row of
every kind the routes name, owned by user A at facility F1 (institution I1, region CQ); the actors who try them;
and a snapshot of the whole database to prove that a refused request changed nothing, and to put back what an
allowed one changed."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Table, func, insert, select, text
from sqlalchemy.orm import Session

from labcommons.actor import Actor, Grant
from labcommons.billing import accounts, invoices, ledger, rates, talent, vouchers
from labcommons.billing.models import EntitlementKind, TalentCardScheme, TalentEntitlement
from labcommons.booking import calendar, maintenance, qualifications, recurrence, waitlist
from labcommons.booking import policy as booking_policy
from labcommons.booking import service as booking_service
from labcommons.catalog.models import (
    Facility,
    Institution,
    InstitutionKind,
    InstrumentStatus,
    OpenTo,
    PriceUnit,
    Region,
    Service,
    ServiceKind,
)
from labcommons.config import get_settings
from labcommons.db import Base, Database
from labcommons.identity import federation, provider, roles
from labcommons.identity import service as identity
from labcommons.identity.models import ExternalIdentity
from labcommons.identity.roles import SCOPES, FacilityRef
from labcommons.matching import demands, experts
from labcommons.matching.models import DemandMatch, DemandSubscription
from labcommons.orders import messages, quotes, results, samples
from labcommons.orders import service as orders
from labcommons.orders.models import OrderStatus, Sample
from labcommons.reporting import aggregate
from tests.factories import add_instrument, next_grid_day

PASSWORD = "correct horse"


@dataclass(frozen=True)
class Resource:
    """A row a path parameter names: its id as the URL spells it, where it lives, and whose it is.

    `owner` is the actor whose own row it is (None for catalogue rows anyone may name); `insiders` are the actions
    whose holders over the row's place may legitimately reach another user's row too (the facility's staff for an
    order, the issuing region's authority for a voucher): the matrix asserts nothing about them on "own" routes.
    """

    value: str
    facility: FacilityRef | None = None
    institution_id: int | None = None
    region_code: str | None = None
    owner: str | None = None
    insiders: tuple[roles.Action, ...] = ()


@dataclass(frozen=True)
class Caller:
    """One actor of the matrix: a token with every scope, tokens each lacking one scope, a browser session."""

    name: str
    user_id: int
    token: str
    token_without: dict[str, str]
    session_cookie: str
    csrf: str


@dataclass
class AuthzWorld:
    db: Database
    facilities: dict[str, int] = field(default_factory=dict)
    institutions: dict[str, int] = field(default_factory=dict)
    facility_refs: dict[str, FacilityRef] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)
    callers: dict[str, Caller] = field(default_factory=dict)
    grants: dict[str, tuple[Grant, ...]] = field(default_factory=dict)
    resources: dict[str, Resource] = field(default_factory=dict)
    ids: dict[str, Any] = field(default_factory=dict)
    anon_cookie: str = "authz-anonymous-browser"
    anon_csrf: str = ""

    def actor(self, name: str) -> Actor:
        """The actor `name` as services see them (with their grants and every scope)."""
        with self.db.unit_of_work(write=False) as s:
            user = identity.find_user(s, f"{name}@example.org")
            return identity.actor_for(user, grants=roles.grants_of(s, user.id))


# Institutions (code, region) with one facility each: F1..F4 by the matrix's names.
INSTITUTIONS = (("I1", "CQ", "F1"), ("I2", "CQ", "F2"), ("I3", "SC", "F3"), ("I4", "SC", "F4"))
# The actors of the matrix: (name, institution, grant). A is the owner of every row; B a plain user of the same
# institution; C a plain user of the other region; staff and managers of F1 and of F2 (another institution);
# administrators of I1 and I2; the authorities of both regions; a platform administrator.
ACTORS: tuple[tuple[str, str, tuple[str, str | None] | None], ...] = (
    ("a", "I1", None),
    ("b", "I1", None),
    ("c", "I3", None),
    ("staff_f1", "I1", ("facility_staff", "F1")),
    ("manager_f1", "I1", ("facility_manager", "F1")),
    ("staff_f2", "I2", ("facility_staff", "F2")),
    ("manager_f2", "I2", ("facility_manager", "F2")),
    ("admin_i1", "I1", ("institution_admin", "I1")),
    ("admin_i2", "I2", ("institution_admin", "I2")),
    ("authority_cq", "I2", ("region_authority", "CQ")),
    ("authority_sc", "I3", ("region_authority", "SC")),
    ("platform", "I4", ("platform_admin", None)),
)
# Users who only appear in rows: dan asks to join A's account and holds the time A waits for; erin is whom the
# matrix's requests add to A's account.
EXTRA_USERS = (("dan", "I1"), ("erin", "I2"))


def _grant_kwargs(world: AuthzWorld, role: str, scope: str | None) -> dict[str, Any]:
    if role in ("facility_staff", "facility_manager"):
        return {"facility_id": world.facilities[str(scope)]}
    if role == "institution_admin":
        return {"institution_id": world.institutions[str(scope)]}
    if role == "region_authority":
        return {"region_code": scope}
    return {}


def _catalogue(world: AuthzWorld, s: Session) -> None:
    s.add_all([Region(code="CQ", name_zh="重庆", name_en="Chongqing"),
               Region(code="SC", name_zh="四川", name_en="Sichuan")])
    s.flush()
    for code, region, fac_code in INSTITUTIONS:
        inst = Institution(code=f"AZ-{code}", region_code=region, kind=InstitutionKind.university,
                           name_zh=f"{code} 研究院", name_en=f"{code} Institute")
        s.add(inst)
        s.flush()
        fac = Facility(code=f"AZ-{fac_code}", institution_id=inst.id, name_zh=f"{fac_code} 平台",
                       name_en=f"{fac_code} Core", description_zh="", description_en="")
        s.add(fac)
        s.flush()
        world.institutions[code], world.facilities[fac_code] = inst.id, fac.id
        world.facility_refs[fac_code] = FacilityRef(id=fac.id, institution_id=inst.id)
    ins1 = add_instrument(s, world.facilities["F1"], "AZ-CONF", name_zh="激光共聚焦显微镜",
                          name_en="Confocal microscope", category_code="MIC.CONF", open_to=OpenTo.everyone,
                          status=InstrumentStatus.active)
    ins2 = add_instrument(s, world.facilities["F2"], "AZ-SEQ", name_zh="测序仪", name_en="Sequencer",
                          category_code="GEN.SEQ")
    world.ids["instrument"], world.ids["instrument_f2"] = ins1.id, ins2.id
    svc = Service(code="AZ-SVC", facility_id=world.facilities["F1"], kind=ServiceKind.testing,
                  name_zh="单细胞测序", name_en="Single-cell sequencing", category_code="GEN.SEQ",
                  list_price_fen=None, price_unit=PriceUnit.sample, is_active=True,
                  institution_id=world.institutions["I1"], turnaround_days=10, sample_requirements_zh="",
                  sample_requirements_en="")
    s.add(svc)
    s.flush()
    world.ids["service"] = svc.id


def _people(world: AuthzWorld, s: Session) -> None:
    settings = get_settings()
    for name, inst, _grant in ACTORS + tuple((n, i, None) for n, i in EXTRA_USERS):
        user = identity.create_user(s, email=f"{name}@example.org", name=name.replace("_", " ").title(),
                                    institution_code=f"AZ-{inst}", password=PASSWORD)
        world.users[name] = user.id
    for name, _inst, grant in ACTORS:
        if grant is not None:
            roles.grant_role(s, None, identity.find_user(s, f"{name}@example.org"), grant[0],
                             **_grant_kwargs(world, *grant))
    for name, _inst, _grant in ACTORS:
        user = identity.find_user(s, f"{name}@example.org")
        token = identity.create_api_token(s, user, name="matrix", scopes=list(SCOPES))
        without = {scope: identity.create_api_token(s, user, name=f"matrix without {scope}",
                                                    scopes=[x for x in SCOPES if x != scope])
                   for scope in SCOPES}
        cookie = identity.start_web_session(s, user)
        world.callers[name] = Caller(name=name, user_id=user.id, token=token, token_without=without,
                                     session_cookie=cookie,
                                     csrf=identity.csrf_token(settings.secret_key, cookie))
        world.grants[name] = roles.grants_of(s, user.id)
    world.anon_csrf = identity.csrf_token(settings.secret_key, world.anon_cookie)


def build(db: Database) -> AuthzWorld:
    """Build the world on a migrated, empty database."""
    world = AuthzWorld(db=db)
    with db.unit_of_work() as s:
        _catalogue(world, s)
        _people(world, s)
    a = world.actor("a")
    staff = world.actor("staff_f1")
    f1 = world.facility_refs["F1"]
    ins1, svc_id = world.ids["instrument"], world.ids["service"]
    today = ledger.local_day(datetime.now(ledger.platform_zone()))

    # Billing: F1 charges for its microscope; A owns a grant account of I1 with a voucher from Sichuan (the issuing
    # region, not the account's, administers it); dan asked to join the account.
    with db.unit_of_work() as s:
        rates.save_policy(s, None, f1.id)
        rates.set_rate(s, None, instrument_id=ins1, service_id=None, category="internal", assisted=False,
                       unit="hour", amount_fen=6_000, effective_from=date(2020, 1, 1))
        account = accounts.create_account(s, a, code="AZ-GRANT-A", name="A's grant")
        world.ids["account"] = account.id
        dan = world.actor("dan")
        member = accounts.request_membership(s, dan, "AZ-GRANT-A")
        accounts.create_account(s, dan, code="AZ-GRANT-D", name="Dan's grant")
        world.ids["member"] = member.id
        voucher = vouchers.issue_voucher(s, None, issuer_region_code="SC", account_id=account.id,
                                         amount_fen=100_000, valid_from=today - timedelta(days=1),
                                         valid_until=today + timedelta(days=365), code="AZ-SCV-1")
        world.ids["voucher"] = voucher.id
        invoiced = ledger.post_manual_charge(s, None, facility_id=f1.id, account_id=account.id, user_id=a.user_id,
                                             description="Consumables", amount_fen=1_000, service_date=today)
        world.ids["invoiced_charge"] = invoiced.id
    with db.unit_of_work() as s:
        period = invoices.period_of(datetime.now(UTC))
        [invoice] = invoices.generate_invoices(s, period, account_id=world.ids["account"], allow_open=True)
        world.ids["invoice"], world.ids["period"] = invoice.id, period
    with db.unit_of_work() as s:
        charge = ledger.post_manual_charge(s, None, facility_id=f1.id, account_id=world.ids["account"],
                                           user_id=a.user_id, description="Consultation hour", amount_fen=2_000,
                                           service_date=today)
        world.ids["charge"] = charge.id

    # Talent cards: A (of Chongqing) holds a pending Tianfu card, which Sichuan issues and verifies; what the card
    # entitles to at Chongqing's providers is Chongqing's to decide.
    with db.unit_of_work() as s:
        s.add(TalentCardScheme(code="tianfu", region_code="SC", name_zh="天府人才卡", name_en="Tianfu Talent Card"))
        s.flush()
        entitlement = TalentEntitlement(scheme_code="tianfu", provider_region_code="CQ",
                                        kind=EntitlementKind.fee_discount, value=1000)
        s.add(entitlement)
        s.flush()
        world.ids["entitlement"] = entitlement.id
        card = talent.submit_card(s, a, "tianfu", "TF-0001", "A", None, today=today)
        world.ids["card"] = card.id

    # Bookings: A's booking (charged to the account), a weekly series, a waitlist entry behind B's booking;
    # a maintenance block and A's qualification on the microscope; A's calendar feed.
    start = next_grid_day(days=3, hour=2)
    with db.unit_of_work() as s:
        # Bookings of the microscope wait for approval: A's can be approved or declined by whoever may.
        booking_policy.save_policy(s, world.actor("manager_f1"), ins1, requires_approval=True)
    with db.unit_of_work() as s:
        booking = booking_service.reserve_slot(s, a, ins1, start, start + timedelta(hours=1), "Imaging",
                                               account_id=world.ids["account"])
        world.ids["booking"] = booking.id
        series = recurrence.book_series(s, a, ins1, start + timedelta(days=1), 60, "FREQ=WEEKLY;COUNT=2",
                                        "Weekly imaging", keep_partial=True, timezone="Asia/Shanghai",
                                        account_id=world.ids["account"])
        assert series.series is not None, series.status
        world.ids["series"] = series.series.id
    with db.unit_of_work() as s:
        dan_booking = booking_service.reserve_slot(s, world.actor("dan"), ins1, start + timedelta(hours=3),
                                                   start + timedelta(hours=4), "Other", account_id=None)
        entry = waitlist.join(s, a, ins1, dan_booking.starts_at, dan_booking.ends_at, "Waiting")
        world.ids["taken_from"] = dan_booking.starts_at.isoformat()
        world.ids["taken_to"] = dan_booking.ends_at.isoformat()
        world.ids["entry"] = entry.id
        block, _displaced = maintenance.create_block(s, world.actor("manager_f1"), ins1, start + timedelta(days=20),
                                                     start + timedelta(days=20, hours=2), "Laser service")
        world.ids["block"] = block.id
        qualification = qualifications.grant(s, staff, "a@example.org", instrument_id=ins1)
        world.ids["qualification"] = qualification.id
        feed, feed_token = calendar.create_feed(s, a)
        world.ids["feed"], world.ids["feed_token"] = feed.id, feed_token
        spare = identity.create_api_token(s, identity.find_user(s, "a@example.org"), name="spare",
                                          scopes=["catalog:read"])
        assert spare
        world.ids["token"] = _token_id(s, world.users["a"])

    # A service order of A at F1: submitted, quoted, accepted; samples registered; a result file; a message.
    with db.unit_of_work() as s:
        order = orders.create_order(s, a, svc_id, title="RNA of 2 tissue blocks", sample_count=2,
                                    sample_description="FFPE blocks", account_id=world.ids["account"])
        orders.transition(s, a, order.id, OrderStatus.submitted)
        world.ids["order"] = order.id
    with db.unit_of_work() as s:
        quote = quotes.issue_quote(s, staff, world.ids["order"], [("Sequencing", 2, 5_000)],
                                   today + timedelta(days=30))
        world.ids["quote"] = quote.id
    with db.unit_of_work() as s:
        quotes.accept_quote(s, a, world.ids["order"], world.ids["quote"])
        [sample, *_rest] = samples.register_samples(s, a, world.ids["order"], count=2)
        world.ids["sample"] = sample.id
        messages.post_message(s, a, world.ids["order"], "When will the results be ready?")
    with db.unit_of_work() as s:
        sample_row = s.get(Sample, world.ids["sample"])
        assert sample_row is not None
        world.ids["sample_code"] = sample_row.code
        result = results.store_result(s, staff, world.ids["order"], filename="report.pdf",
                                      content_type="application/pdf", kind="report", stream=b"%PDF-1.4 report")
        world.ids["result"] = result.id

    # Matching: A's demand reaches F1 (subscribed, matched), F1 offered on it; A is an expert of F1.
    with db.unit_of_work() as s:
        # Only F1 subscribes: the demand reaches no other facility, whose staff must then not see it.
        s.add(DemandSubscription(facility_id=f1.id, active=True, min_score=0.0, notify_email=False,
                                 created_by=world.users["platform"]))
        s.flush()
        demand = demands.post_demand(s, a, text="Single-cell RNA sequencing of mouse brain tissue",
                                     share_with_providers=True)
        world.ids["demand"] = demand.id
        if not s.scalar(select(DemandMatch.id).where(DemandMatch.demand_id == demand.id,
                                                     DemandMatch.facility_id == f1.id)):
            s.add(DemandMatch(demand_id=demand.id, rank=99, kind="service", item_id=svc_id, facility_id=f1.id,
                              score=1.0, explanation=""))
        s.flush()
        offer = demands.make_offer(s, staff, demand.id, facility_id=f1.id, service_id=svc_id,
                                   message="We can do it next month.")
        world.ids["offer"] = offer.id
        expert = experts.create_expert(s, None, facility_id=f1.id, code="AZ-EXP-A", name_zh="专家甲",
                                       name_en="Expert A", user_id=world.users["a"])
        world.ids["expert"] = expert.id

    # Identity: an upstream provider A linked an identity at; a member system of the platform's OpenID provider; a
    # role grant (staff of F1) to revoke.
    with db.unit_of_work() as s:
        upstream = federation.add_provider(s, name="az-idp", region_code="CQ", issuer=UPSTREAM_ISSUER,
                                           client_id="labcommons")
        linked = ExternalIdentity(user_id=world.users["a"], provider_id=upstream.id, issuer=upstream.issuer,
                                  subject="a-at-idp", email="a@example.org", email_verified=True)
        s.add(linked)
        s.flush()
        world.ids["identity"], world.ids["provider"] = linked.id, upstream.name
        client, _secret = provider.register_client(s, name="AZ member system",
                                                   redirect_uris=["https://member.example.org/callback"])
        world.ids["client"] = client.client_id
        world.ids["grant"] = next(
            g.id for g in roles.list_grants(s, None, email="staff_f1@example.org") if g.role == "facility_staff"
        )
    # Nothing dirty in the statistics: reading them refreshes nothing, so a read changes no table.
    aggregate.ensure_current(db)
    world.resources = _resources(world)
    assert set(world.resources) == set(_RESOURCE_NAMES)
    return world


UPSTREAM_ISSUER = "http://127.0.0.1:9/az"


def know_upstream() -> None:
    """Let signing in with the world's upstream provider start without fetching its discovery document (nothing
    listens at its address): the sign-in starts, which is all the matrix needs."""
    metadata = federation.ProviderMetadata(
        UPSTREAM_ISSUER, f"{UPSTREAM_ISSUER}/authorize", f"{UPSTREAM_ISSUER}/token", f"{UPSTREAM_ISSUER}/jwks")
    with federation._lock:
        federation._metadata_cache[UPSTREAM_ISSUER] = (time.monotonic(), metadata)


def _token_id(session: Session, user_id: int) -> int:
    from labcommons.identity.models import ApiToken

    found = session.scalar(select(ApiToken.id).where(ApiToken.user_id == user_id, ApiToken.name == "spare"))
    assert found is not None
    return int(found)


def _resources(world: AuthzWorld) -> dict[str, Resource]:
    """Every path parameter of the routes, as the row it names (see Resource)."""
    A = roles.Action
    f1 = world.facility_refs["F1"]
    i1 = world.institutions["I1"]
    where = dict(facility=f1, institution_id=i1, region_code="CQ")
    order_staff = (A.manage_facility_orders,)
    account_admins = (A.manage_institution_accounts,)
    ids = world.ids
    return {
        # Catalogue rows: named by anyone, guarded (if at all) by the facility they belong to.
        "instrument_id": Resource(str(ids["instrument"]), **where),
        "service_id": Resource(str(ids["service"]), **where),
        "facility_id": Resource(str(f1.id), **where),
        "institution_id": Resource(str(i1), institution_id=i1, region_code="CQ"),
        "block_id": Resource(str(ids["block"]), **where),
        "qualification_id": Resource(str(ids["qualification"]), **where),
        # What Tianfu cards entitle to at Chongqing's providers: Chongqing's to change.
        "entitlement_id": Resource(str(ids["entitlement"]), region_code="CQ"),
        "grant_id": Resource(str(ids["grant"]), **where),
        "name": Resource(str(ids["provider"])),
        "client_id": Resource(str(ids["client"])),
        # A's own rows.
        "booking_id": Resource(str(ids["booking"]), **where, owner="a",
                               insiders=(A.manage_facility_bookings,)),
        "series_id": Resource(str(ids["series"]), **where, owner="a"),
        "entry_id": Resource(str(ids["entry"]), **where, owner="a"),
        "token_id": Resource(str(ids["token"]), owner="a"),
        "feed_id": Resource(str(ids["feed"]), owner="a"),
        "identity_id": Resource(str(ids["identity"]), owner="a"),
        "order_id": Resource(str(ids["order"]), **where, owner="a", insiders=order_staff),
        "quote_id": Resource(str(ids["quote"]), **where, owner="a", insiders=order_staff),
        "sample_id": Resource(str(ids["sample"]), **where, owner="a", insiders=order_staff),
        "code": Resource(str(ids["sample_code"]), **where, owner="a", insiders=order_staff),
        "file_id": Resource(str(ids["result"]), **where, owner="a", insiders=order_staff),
        "account_id": Resource(str(ids["account"]), **where, owner="a", insiders=account_admins),
        "member_id": Resource(str(ids["member"]), **where, owner="a", insiders=account_admins),
        "invoice_id": Resource(str(ids["invoice"]), **where, owner="a", insiders=account_admins),
        "charge_id": Resource(str(ids["charge"]), **where, owner="a",
                              insiders=(*account_admins, A.manage_facility_billing)),
        # Sichuan's voucher on A's Chongqing account: Sichuan's authority administers it, I1's admins see it.
        "voucher_id": Resource(str(ids["voucher"]), institution_id=i1, region_code="SC", owner="a",
                               insiders=(*account_admins, A.issue_vouchers)),
        "card_id": Resource(str(ids["card"]), region_code="SC", owner="a", insiders=(A.issue_vouchers,)),
        "demand_id": Resource(str(ids["demand"]), **where, owner="a", insiders=(A.answer_demands,)),
        "offer_id": Resource(str(ids["offer"]), **where, owner="a", insiders=(A.answer_demands,)),
        "expert_id": Resource(str(ids["expert"]), **where, owner="a", insiders=(A.manage_experts,)),
        # Targets named in bodies and queries rather than paths.
        "@region": Resource("CQ", region_code="CQ"),
        # Values, not rows.
        "token": Resource(str(ids["feed_token"])),
        "fmt": Resource("xlsx"),
        "period": Resource(str(ids["period"])),
        "year": Resource(str(datetime.now(UTC).year)),
        "table": Resource("totals"),
    }


def resource_names() -> set[str]:
    """The path parameters the world has a row (or a value) for."""
    return {name for name in _RESOURCE_NAMES if not name.startswith("@")}


_RESOURCE_NAMES = (
    "instrument_id", "service_id", "facility_id", "institution_id", "block_id", "qualification_id", "entitlement_id",
    "grant_id", "name", "client_id", "booking_id", "series_id", "entry_id", "token_id", "feed_id", "identity_id",
    "order_id", "quote_id", "sample_id", "code", "file_id", "account_id", "member_id", "invoice_id", "charge_id",
    "voucher_id", "card_id", "demand_id", "offer_id", "expert_id", "@region", "token", "fmt", "period", "year",
    "table",
)


# --- snapshots --------------------------------------------------------------------------------------------------

# Left out of the comparison, each for a reason:
# - audit_entry, audit_head: the audit log appends what happened (sign-ins included) and is checked by its own tests;
# - rate_limit_bucket, login_throttle: counting requests and failed sign-ins is their job, refused or not;
# - api_token.last_used_at: stamped (at most once a minute) whenever a token authenticates, refused request or not.
IGNORED_TABLES = frozenset({"audit_entry", "audit_head", "rate_limit_bucket", "login_throttle"})
IGNORED_COLUMNS = {"api_token": frozenset({"last_used_at"})}


def _tables() -> list[Table]:
    return list(Base.metadata.sorted_tables)


def _columns(table: Table) -> list[str]:
    skip = IGNORED_COLUMNS.get(table.name, frozenset())
    return [c.name for c in table.columns if c.name not in skip]


Digest = dict[str, tuple[int, str]]


def digest(db: Database) -> Digest:
    """Per compared table: its row count and a digest of its rows (in any order). Plain SQL on the driver's
    connection: it runs before and after every request of the matrix."""
    tables = [t for t in _tables() if t.name not in IGNORED_TABLES]
    with db.engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        if db.is_sqlite:
            out: Digest = {}
            for table in tables:
                cols = ", ".join(f'"{c}"' for c in _columns(table))
                rows = sorted(repr(r) for r in raw.execute(f'SELECT {cols} FROM "{table.name}"'))
                out[table.name] = (len(rows), hashlib.sha256("\n".join(rows).encode()).hexdigest())
            return out
        # One round trip: each table's rows as text, hashed in the server.
        parts = [
            f"SELECT '{t.name}', count(*), md5(coalesce(string_agg(r, '|' ORDER BY r), '')) FROM "
            f"(SELECT ROW({', '.join(chr(34) + c + chr(34) for c in _columns(t))})::text AS r FROM \"{t.name}\") x"
            for t in tables
        ]
        with raw.cursor() as cur:
            cur.execute(" UNION ALL ".join(parts))
            return {name: (int(count), str(md5)) for name, count, md5 in cur.fetchall()}


def changed_tables(before: Digest, after: Digest) -> list[str]:
    return sorted(t for t in before if before[t] != after.get(t))


class Saved:
    """The whole database as it was, to put back what an allowed request changed.

    SQLite: a copy of the file, written back with the online backup API (exact, triggers and full-text indexes
    included). PostgreSQL: every row; the tables a request changed are written back with triggers off (the
    ledger's append-only and the quotes' frozen-once-accepted triggers would refuse it, and foreign keys are checked
    by triggers, so unchanged tables stay as they are) and their id sequences reset.
    """

    def __init__(self, db: Database, copy_path: str) -> None:
        self.db = db
        self.copy_path = copy_path
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.digest = digest(db)
        with db.engine.connect() as conn:
            if db.is_sqlite:
                source = conn.connection.driver_connection
                assert isinstance(source, sqlite3.Connection)
                target = sqlite3.connect(copy_path)
                try:
                    source.backup(target)
                finally:
                    target.close()
            else:
                self.rows = {t.name: [dict(r._mapping) for r in conn.execute(select(t))] for t in _tables()}

    def restore(self, changed: Iterable[str] | None = None) -> None:
        """Put the database back: everything, or (PostgreSQL) the `changed` tables and the ignored ones."""
        if self.db.is_sqlite:
            with self.db.engine.connect() as conn:
                target = conn.connection.driver_connection
                assert isinstance(target, sqlite3.Connection)
                source = sqlite3.connect(self.copy_path)
                try:
                    source.backup(target)
                finally:
                    source.close()
            return
        names = set(changed) | IGNORED_TABLES if changed is not None else {t.name for t in _tables()}
        tables = [t for t in _tables() if t.name in names]
        with self.db.engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
            for table in tables:
                conn.execute(table.delete())
                if self.rows[table.name]:
                    conn.execute(insert(table), self.rows[table.name])
                keys = list(table.primary_key.columns)
                if len(keys) == 1 and keys[0].type.python_type is int:
                    seq = conn.scalar(text("SELECT pg_get_serial_sequence(:t, :c)"),
                                      {"t": table.name, "c": keys[0].name})
                    if seq:
                        top = conn.scalar(select(func.max(keys[0])))
                        conn.execute(text("SELECT setval(:s, :v, :called)"),
                                     {"s": seq, "v": top or 1, "called": top is not None})
