"""A world full of hostile text: every name, purpose, title, message and note a user or manager can write holds a
script tag (and SQL-looking text), entered through the API as a client would, for the hostile-input and CSRF
tests to crawl."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route

from labcommons.app import create_app
from labcommons.catalog.models import Instrument
from labcommons.catalog.service import place_instrument
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.booking.test_usage import add_booking
from tests.factories import World, next_grid_day

# What must never reach a page unescaped: the start of a script that would run.
RAW = "<script>alert("


def hostile(tag: str) -> str:
    """A script tag naming where it was entered, followed by SQL-looking text."""
    return f'<script>alert("{tag}")</script>\'; DROP TABLE booking; --'


def escaped(tag: str) -> str:
    """How a page shows `hostile(tag)`'s script part (Jinja escapes quotes as &#34; and &#39;)."""
    return f"&lt;script&gt;alert(&#34;{tag}&#34;)&lt;/script&gt;"


# The roles the crawl signs in as: the booking and ordering user, the facility's manager, the region's authority
# and the platform administrator.
ROLES = ("owner", "manager", "authority", "admin")
USERS = {"owner": "mallory", "manager": "alice", "authority": "rita", "admin": "pat"}


@dataclass
class HostileWorld:
    world: World
    ids: dict[str, Any] = field(default_factory=dict)
    # Every tag a hostile text was entered under (each must show up escaped on some page).
    tags: set[str] = field(default_factory=set)

    def headers(self, role: str) -> dict[str, str]:
        return self.world.headers(USERS[role])


def _ok(response: Any, *statuses: int) -> dict[str, Any]:
    assert response.status_code in (statuses or (200, 201)), (response.request.url, response.text)
    body: dict[str, Any] = response.json() if response.content else {}
    return body


def build_hostile_world(world: World) -> HostileWorld:
    """Users of every role with hostile names where users choose them, and one of each thing they write."""
    hw = HostileWorld(world)
    h = hostile
    with world.db.unit_of_work() as s:
        for name, inst in (("mallory", "CQ-UNI"), ("rita", "SC-UNI"), ("pat", "CQ-LAB")):
            user = identity.create_user(s, email=f"{name}@example.org",
                                        name=h(f"name-{name}") if name == "mallory" else name.title(),
                                        institution_code=inst, password="correct horse")
            world.tokens[name] = identity.create_api_token(s, user, name=h(f"token-{name}"))
        s.flush()
        hw.tags |= {"name-mallory", "token-mallory"}
        alice = identity.find_user(s, "alice@example.org")
        roles.grant_role(s, None, alice, "facility_manager", facility_id=world.facilities["CQ-LAB"])
        roles.grant_role(s, None, identity.find_user(s, "rita@example.org"), "region_authority", region_code="CQ")
        roles.grant_role(s, None, identity.find_user(s, "pat@example.org"), "platform_admin")
        # No route renames instruments (the catalogue import does); a manager's edit is written here.
        conf = s.get(Instrument, world.instruments["CONF"])
        assert conf is not None
        conf.name_zh, conf.name_en = h("instrument-zh"), h("instrument-en")
        conf.description_en = h("instrument-description")
        place_instrument(s, conf)  # what every edit of names does: the search text follows
        hw.tags |= {"instrument-zh", "instrument-en"}
    api = TestClient(create_app(db=world.db), raise_server_exceptions=False)
    owner, manager, authority = hw.headers("owner"), hw.headers("manager"), hw.headers("authority")
    ids = hw.ids
    ids["instrument_id"] = world.instruments["CONF"]
    ids["facility_id"] = world.facilities["CQ-LAB"]
    ids["institution_id"] = world.institutions["CQ-LAB"]

    # Bookings: one confirmed with a hostile purpose, one waiting for the manager's approval.
    start = next_grid_day(days=3)
    booked = _ok(api.post("/api/v1/bookings", headers=owner, json={
        "instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=1)).isoformat(), "purpose": h("purpose")}))
    ids["booking_id"] = booked["id"]
    _ok(api.put(f"/api/v1/instruments/{world.instruments['SPATIAL']}/policy", headers=manager,
                json={"requires_approval": True}))
    _ok(api.post("/api/v1/bookings", headers=owner, json={
        "instrument_id": world.instruments["SPATIAL"], "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=1)).isoformat(), "purpose": h("pending-purpose")}))
    # A past booking, so the statistics' charts name the instrument.
    add_booking(world, "bob", starts_at=datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
                - timedelta(days=1), minutes=120)
    later = start + timedelta(days=1)
    _ok(api.post(f"/api/v1/instruments/{world.instruments['CONF']}/maintenance", headers=manager, json={
        "starts_at": later.isoformat(), "ends_at": (later + timedelta(hours=2)).isoformat(),
        "reason": h("maintenance")}))
    hw.tags |= {"purpose", "pending-purpose", "maintenance"}

    # A service of the facility, ordered, quoted, accepted, talked about, with samples.
    service = _ok(api.post("/api/v1/services", headers=manager, json={
        "facility": "CQ-LAB-F", "code": "CQ-HOSTILE-1", "kind": "testing", "category_code": "GEN.SEQ",
        "name_zh": h("service-zh"), "name_en": h("service-en"), "description_en": h("service-description"),
        "description_zh": h("service-description")}))
    ids["service_id"] = service["id"]
    order = _ok(api.post("/api/v1/orders", headers=owner, json={
        "service_id": service["id"], "title": h("order-title"), "description": h("order-description"),
        "sample_count": 1, "sample_description": h("sample-description"), "submit": True}))
    ids["order_id"] = order_id = order["id"]
    quote = _ok(api.post(f"/api/v1/orders/{order_id}/quotes", headers=manager, json={
        "lines": [{"description": h("quote-line"), "quantity": 1, "unit_price_fen": 10_000}],
        "valid_until": (date.today() + timedelta(days=30)).isoformat(), "note": h("quote-note")}))
    ids["quote_id"] = quote["id"]
    _ok(api.post(f"/api/v1/orders/{order_id}/quotes/{quote['id']}/accept", headers=owner))
    _ok(api.post(f"/api/v1/orders/{order_id}/messages", headers=owner, json={"body": h("message-owner")}))
    _ok(api.post(f"/api/v1/orders/{order_id}/messages", headers=manager, json={"body": h("message-manager")}))
    samples = _ok(api.post(f"/api/v1/orders/{order_id}/samples", headers=owner,
                           json={"descriptions": [h("sample")], "note": h("sample-note")}))
    ids["sample_id"] = samples["items"][0]["id"]
    ids["code"] = samples["items"][0]["code"]
    result = _ok(api.post(f"/api/v1/orders/{order_id}/results", headers=manager, content=b"%PDF-1.4 results",
                          params={"filename": h("file") + ".pdf", "kind": "report"}))
    ids["file_id"] = result["id"]
    hw.tags |= {"service-en", "service-zh", "order-title", "order-description", "quote-note", "message-owner",
                "message-manager", "sample"}

    # A demand of the owner and an offer of the facility.
    _ok(api.put(f"/api/v1/facilities/{world.facilities['CQ-LAB']}/demand-subscription", headers=manager,
                json={"active": True, "min_score": 0.0}), 200, 201)
    demand = _ok(api.post("/api/v1/demands", headers=owner, json={
        "text": h("demand"), "sample_type": h("demand-sample"), "share_with_providers": True}))
    ids["demand_id"] = demand["id"]
    expert = _ok(api.post("/api/v1/experts", headers=manager, json={
        "facility_id": world.facilities["CQ-LAB"], "code": "EXP-HOSTILE", "name_zh": h("expert-zh"),
        "name_en": h("expert-en"), "bio_en": h("expert-bio"), "bio_zh": h("expert-bio")}))
    ids["expert_id"] = expert["id"]
    offer = _ok(api.post(f"/api/v1/demands/{demand['id']}/offers", headers=manager, json={
        "facility_id": world.facilities["CQ-LAB"], "service_id": service["id"], "message": h("offer")}))
    ids["offer_id"] = offer["id"]
    hw.tags |= {"demand", "expert-en", "expert-zh", "offer"}

    # Billing: the owner's account, a voucher on it from the region, a talent card.
    account = _ok(api.post("/api/v1/billing/accounts", headers=owner, json={
        "code": "MAL-1", "name": h("account"), "kind": "grant"}))
    ids["account_id"] = account["id"]
    voucher = _ok(api.post("/api/v1/billing/vouchers", headers=authority, json={
        "issuer_region_code": "CQ", "account_id": account["id"], "amount_fen": 100_000,
        "valid_from": date.today().isoformat(), "valid_until": (date.today() + timedelta(days=90)).isoformat(),
        "name": h("voucher")}))
    ids["voucher_id"] = voucher["id"]
    hw.tags |= {"account", "voucher"}
    return hw


# --- the crawl ---------------------------------------------------------------------------------------------------


def page_routes(method: str = "GET") -> list[str]:
    """The page (not API, not static) routes of the app with `method`, from its route table."""
    app = create_app()
    found: set[str] = set()

    def walk(routes: list[Any]) -> Iterator[tuple[set[str] | None, str]]:
        for route in routes:
            # FastAPI 0.16x keeps included routers as lazy branches; older versions copy routes into app.routes.
            contexts = getattr(route, "effective_route_contexts", None)
            if contexts is not None:
                yield from ((ctx.methods, ctx.path) for ctx in contexts())
            elif isinstance(route, APIRoute | Route):
                yield route.methods, route.path

    for methods, path in walk(app.routes):
        if method in (methods or ()) and not path.startswith(("/api/", "/static")):
            found.add(path)
    return sorted(found)


_PARAM = re.compile(r"\{([^}:]+)(?::[^}]+)?\}")
# Parameters no object of the hostile world stands for: any value does (the page answers 404 or an error page).
ANY_VALUE = {"token": "not-a-token", "name": "cq", "table": "instruments", "year": str(datetime.now(UTC).year),
             "feed_id": "1", "identity_id": "1", "client_id": "1", "grant_id": "1", "member_id": "1",
             "charge_id": "1", "entitlement_id": "1", "card_id": "1", "block_id": "1", "qualification_id": "1",
             "entry_id": "1", "series_id": "1", "token_id": "1", "invoice_id": "1"}


def fill(path: str, ids: dict[str, Any]) -> str:
    """`path` with its parameters replaced by the hostile world's ids; an unknown parameter fails the test."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in ids:
            return str(ids[name])
        assert name in ANY_VALUE, f"no value for the path parameter {name!r} of {path}: add one to hostile_world"
        return ANY_VALUE[name]

    return _PARAM.sub(value, path)
