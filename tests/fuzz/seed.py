"""Rows for the fuzzer to hit: bookings, orders with quotes, samples, results and messages, accounts, deposits,
vouchers, charges, invoices, talent cards, demands, offers, experts, maintenance, qualifications, waitlist entries,
extra tokens. Made through the public API (so the seed itself goes through the code the fuzzer attacks), by a
platform administrator `root` and the plain users of the test world."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from fastapi.testclient import TestClient

from labcommons.billing.models import TalentCardScheme
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.billing.billing_support import COMPANY, add_company
from tests.factories import World, next_grid_day

ADMIN = "root"


def add_people(world: World, name: str = ADMIN) -> None:
    """A platform administrator `name` of CQ-LAB with an API token (no scopes: all of them), and a company with
    its user dave, and the regions' talent card schemes (which have no API)."""
    add_company(world)
    with world.db.unit_of_work() as s:
        s.add_all([
            TalentCardScheme(code="tianfu", region_code="SC", name_zh="天府人才卡", name_en="Tianfu Talent Card"),
            TalentCardScheme(code="cq_talent", region_code="CQ", name_zh="重庆英才服务卡",
                             name_en="Chongqing Talent Service Card"),
        ])
        user = identity.create_user(s, email=f"{name}@example.org", name=name.title(), institution_code="CQ-LAB",
                                    password="correct horse")
        roles.grant_role(s, None, user, roles.Role.platform_admin)
        world.tokens[name] = identity.create_api_token(s, user, name="fuzz")
    with world.db.unit_of_work(write=False) as s:
        world.actors[name] = identity.actor_for(identity.find_user(s, f"{name}@example.org"))


@dataclass(frozen=True)
class Call:
    """A request the seed made and the API accepted: a known-good starting point for generated ones."""

    method: str
    path: str
    query: dict[str, Any]
    body: Any


class _Api:
    """Calls that must succeed: a seed step that fails is a broken seed, reported with the answer."""

    def __init__(self, client: TestClient, world: World) -> None:
        self.client = client
        self.world = world
        self.calls: list[Call] = []

    def __call__(self, method: str, path: str, user: str = ADMIN, **kwargs: Any) -> Any:
        headers = {**self.world.headers(user), **kwargs.pop("headers", {})}
        answer = self.client.request(method, f"/api/v1{path}", headers=headers, **kwargs)
        assert answer.status_code < 300, f"seed: {method} {path} as {user}: {answer.status_code} {answer.text}"
        self.calls.append(Call(method, f"/api/v1{path}", dict(kwargs.get("params") or {}), kwargs.get("json")))
        return answer.json() if answer.content and "json" in answer.headers.get("content-type", "") else None


def seed(world: World, client: TestClient) -> list[Call]:
    """Fill the test world through the API (the caller made `root` and the company with add_people); the calls."""
    api = _Api(client, world)
    cq_lab, sc_uni = world.facilities["CQ-LAB"], world.facilities["SC-UNI"]
    conf, spatial, seq = (world.instruments[k] for k in ("CONF", "SPATIAL", "SEQ"))
    today = date.today()

    # Catalogue: a priced service and one quoted on request; prices and a charging facility.
    priced = api("POST", "/services", json={
        "facility": "CQ-LAB-F", "code": "FUZZ-SEQ", "kind": "testing", "name_zh": "单细胞测序",
        "name_en": "Single-cell sequencing", "category_code": "GEN.SEQ", "list_price_fen": 80_000,
        "price_unit": "sample", "turnaround_days": 10, "instrument_ids": [seq]})
    quoted = api("POST", "/services", json={
        "facility": "CQ-LAB-F", "code": "FUZZ-CONSULT", "kind": "consultation", "name_zh": "类器官培养咨询",
        "name_en": "Organoid culture consultation", "category_code": "GEN.SEQ"})
    api("PUT", f"/billing/facilities/{cq_lab}/policy", json={"basis": "booked", "increment_minutes": 30})
    for category in ("internal", "academic_region", "academic_other", "industry"):
        api("POST", "/billing/rates", json={
            "instrument_id": conf, "category": category, "unit": "hour", "amount_fen": 12_345,
            "effective_from": today.isoformat()})
    api("POST", "/billing/rates", json={
        "service_id": priced["id"], "category": "academic_other", "unit": "sample", "amount_fen": 80_000,
        "effective_from": today.isoformat()})

    # Money: alice's grant with bob and carol as members, dave's company account with a deposit and a voucher of
    # each region, manual charges (one corrected), this month's invoices.
    grant = api("POST", "/billing/accounts", "alice", json={
        "code": "NSFC-FUZZ-1", "name": "Organoid grant", "kind": "grant"})
    company = api("POST", "/billing/accounts", json={
        "code": "CO-FUZZ-1", "name": "Prepaid company account", "kind": "company", "prepaid": True,
        "institution_id": world.institutions[COMPANY], "owner_id": world.actors["dave"].user_id})
    api("POST", f"/billing/accounts/{grant['id']}/members", "alice", json={"email": "bob@example.org",
                                                                        "limit_fen": 500_000})
    joined = api("POST", "/billing/accounts/join", "carol", json={"code": "NSFC-FUZZ-1"})
    api("POST", f"/billing/members/{joined['id']}/decision", "alice", json={"status": "approved"})
    api("POST", f"/billing/accounts/{company['id']}/deposits", json={"amount_fen": 1_000_000,
                                                                   "reference": "bank transfer 42"})
    for region in ("CQ", "SC"):
        api("POST", "/billing/vouchers", json={
            "issuer_region_code": region, "account_id": company["id"], "amount_fen": 300_000,
            "valid_from": (today - timedelta(days=30)).isoformat(),
            "valid_until": (today + timedelta(days=300)).isoformat(), "share_bp": 5000,
            "name": f"Innovation voucher {region}"})
    charge = api("POST", "/billing/charges", json={
        "facility_id": cq_lab, "account_id": grant["id"], "user_email": "alice@example.org",
        "description": "Consumables", "amount_fen": 4_321, "service_date": today.isoformat()})
    api("POST", "/billing/charges", json={
        "facility_id": cq_lab, "account_id": company["id"], "user_email": "dave@example.org",
        "description": "Sample preparation", "amount_fen": 9_900,
        "service_date": (today - timedelta(days=40)).isoformat()})
    api("POST", f"/billing/charges/{charge['id']}/correction", json={"note": "wrong amount", "amount_fen": 4_000})
    api("POST", "/billing/invoices/generate", json={"period": today.strftime("%Y-%m"), "allow_open": True})

    # Talent cards: an entitlement of the first scheme, a card verified, one waiting.
    schemes = api("GET", "/billing/talent-schemes")["items"]
    scheme = next(s["code"] for s in schemes if s["code"] == "cq_talent")
    api("POST", "/billing/talent-entitlements", json={"scheme_code": scheme, "provider_region_code": "CQ",
                                                       "kind": "fee_discount", "value": 2000})
    card = api("POST", "/billing/talent-cards", "alice", json={
        "scheme_code": scheme, "card_number": "TC-0001", "holder_name": "Alice",
        "valid_until": (today + timedelta(days=365)).isoformat()})
    api("POST", f"/billing/talent-cards/{card['id']}/verify", json={"note": "seen the card"})
    api("POST", "/billing/talent-cards", "bob", json={
        "scheme_code": scheme, "card_number": "TC-0002", "holder_name": "Bob"})

    # Instrument time: bookings (one cancelled, one waiting for approval), a series, maintenance, a waitlist entry,
    # a qualification.
    start = next_grid_day(days=3)
    paying = {"alice": grant["id"], "bob": grant["id"], "dave": company["id"]}
    booked = []
    for i, (user, instrument) in enumerate((("alice", conf), ("bob", conf), ("alice", spatial), ("dave", conf))):
        at = start + timedelta(hours=2 * i)
        booked.append(api("POST", "/bookings", user, json={
            "instrument_id": instrument, "starts_at": at.isoformat(), "ends_at": (at + timedelta(hours=1)).isoformat(),
            "purpose": "imaging organoids", "account_id": paying[user]}))
    api("POST", f"/bookings/{booked[1]['id']}/cancel", "bob")
    api("PUT", f"/instruments/{spatial}/policy", json={"requires_approval": True})
    at = start + timedelta(days=1)
    api("POST", "/bookings", "bob", json={
        "instrument_id": spatial, "starts_at": at.isoformat(), "ends_at": (at + timedelta(hours=1)).isoformat(),
        "purpose": "spatial transcriptomics", "account_id": grant["id"]})
    at = start + timedelta(days=2)
    api("POST", "/bookings/series", "alice", json={
        "instrument_id": conf, "first_starts_at": at.isoformat(), "duration_minutes": 60,
        "rrule": "FREQ=WEEKLY;COUNT=3", "purpose": "weekly imaging", "account_id": grant["id"]})
    at = start + timedelta(days=5)
    api("POST", f"/instruments/{conf}/maintenance", json={
        "starts_at": at.isoformat(), "ends_at": (at + timedelta(hours=4)).isoformat(), "reason": "laser alignment"})
    at = start
    api("POST", "/waitlist", "bob", json={
        "instrument_id": conf, "starts_at": at.isoformat(), "ends_at": (at + timedelta(hours=1)).isoformat(),
        "purpose": "if it frees up"})
    api("POST", f"/instruments/{conf}/qualifications", json={"user_email": "bob@example.org",
                                                              "level": "independent"})

    # Orders: one walked to results with a quote, samples, a result file and messages; a draft; a rejected one.
    order = api("POST", "/orders", "bob", json={
        "service_id": priced["id"], "title": "RNA of 2 tissue blocks", "sample_count": 2, "submit": True,
        "account_id": grant["id"]})
    url = f"/orders/{order['id']}"
    quote = api("POST", f"{url}/quotes", json={
        "lines": [{"description": "Library preparation", "quantity": 2, "unit_price_fen": 30_000},
                  {"description": "Sequencing", "quantity": 1, "unit_price_fen": 50_000}],
        "valid_until": (today + timedelta(days=30)).isoformat(), "note": "two blocks"})
    api("POST", f"{url}/quotes/{quote['id']}/accept", "bob")
    api("POST", f"{url}/samples", json={"count": 2, "receive": True, "location": "freezer A"})
    api("POST", f"{url}/messages", "bob", json={"body": "When do the results come?"})
    api("POST", f"{url}/messages", json={"body": "Next week."})
    api("POST", f"{url}/transitions", json={"to": "in_progress"})
    api("POST", f"{url}/results", params={"filename": "检测报告.txt"}, content=b"all good\n",
        headers={"Content-Type": "text/plain"})
    draft = api("POST", "/orders", "alice", json={
        "service_id": quoted["id"], "title": "Organoid protocol", "description": "colon organoids",
        "account_id": grant["id"]})
    api("POST", f"/orders/{draft['id']}/transitions", "alice", json={"to": "submitted"})
    other = api("POST", "/orders", "carol", json={
        "service_id": priced["id"], "title": "Mass spectrometry of serum", "submit": True,
        "account_id": grant["id"]})
    api("POST", f"/orders/{other['id']}/transitions", json={"to": "rejected", "comment": "not our field"})

    # Matching: an expert, the facilities' subscriptions, a demand shared with providers, an offer on it.
    expert = api("POST", "/experts", json={
        "facility_id": cq_lab, "code": "EXP-FUZZ", "name_zh": "王研究员", "name_en": "Dr Wang",
        "fields": ["GEN.SEQ"], "skills_en": ["single-cell sequencing"], "consultation_service_id": quoted["id"]})
    for facility in (cq_lab, sc_uni):
        api("PUT", f"/facilities/{facility}/demand-subscription", json={"active": True, "min_score": 0.0})
    demand = api("POST", "/demands", "alice", json={
        "text": "Need single-cell sequencing of 20 organoid samples", "budget_fen": 2_000_000,
        "share_with_providers": True})
    api("POST", f"/demands/{demand['id']}/offers", json={
        "facility_id": cq_lab, "service_id": priced["id"], "message": "We can do it next month",
        "price_fen": 1_600_000, "expert_id": expert["id"]})

    # Tokens beside the ones the callers use, so a fuzzed revocation usually hits one of these.
    for user in ("alice", "bob"):
        api("POST", "/me/tokens", user, json={"name": "spare", "scopes": ["bookings:read"]})
    return api.calls
