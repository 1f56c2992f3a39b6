"""The authorisation matrix (issue 9): every route of the app x every kind of actor, generated from the route table.

For each (method, path) the app serves, each actor sends the request with real ids (tests/security/authz_support.py
builds one row of every kind, owned by user A at facility F1 of institution I1 in Chongqing) and, for writes, a
plausible body. What each actor should get is computed from labcommons.identity.roles (ROUTES says which Action a
route needs, PERMISSIONS which roles hold it over which target) and from the row the path names (its facility,
institution, region and owner):

- refused actors get 401, 403 or 404 (a page sends the anonymous to the sign-in page) and the database is unchanged;
- allowed actors never get 401 or 403 (any other answer is fine for a minimal body), and nobody gets a 5xx;
- another user's own row (a booking, an order, an account, ...) is refused to other plain users and to staff,
  administrators and authorities whose scope does not reach it (IDOR); the staff of the row's facility, the
  administrators of its institution or the authority of its region may reach it where the row's kind says so;
- an API token lacking the route's scope gets 403 insufficient_scope, whatever its owner's roles;
- a body naming what the caller may not reach (a role above their own, another facility, region or owner) is refused.

A new route without a ROUTES rule, or with a path parameter the world has no row for, fails here.
"""

from __future__ import annotations

import asyncio
import enum
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from httpx import Response
from sqlalchemy import text

from labcommons.actor import Grant
from labcommons.app import create_app
from labcommons.config import get_settings
from labcommons.db import Base, Database
from labcommons.http import SESSION_COOKIE
from labcommons.identity.models import Role
from labcommons.identity.roles import PERMISSIONS, ROUTES, SCOPES, USER, Access, Action, Target
from labcommons.matching import embeddings, index
from labcommons.pages import ANON_COOKIE, FLASH_COOKIE
from tests.conftest import REFERENCE_TABLES
from tests.security.authz_support import (
    ACTORS,
    AuthzWorld,
    Resource,
    Saved,
    build,
    changed_tables,
    digest,
    know_upstream,
    resource_names,
)

ANON = "anonymous"
NAMES = [ANON] + [name for name, _inst, _grant in ACTORS]


def _app_routes() -> dict[tuple[str, str], Any]:
    """(method, path) → the route (its dependencies name the token scope), for every route of the app."""
    found: dict[tuple[str, str], Any] = {}
    for route in create_app().routes:
        # FastAPI 0.16x keeps included routers as lazy branches; older versions copy APIRoutes into app.routes.
        contexts = getattr(route, "effective_route_contexts", None)
        for ctx in contexts() if contexts is not None else [route]:
            for method in getattr(ctx, "methods", None) or ():
                if method != "HEAD":
                    found[(method, ctx.path)] = ctx
    return found


APP_ROUTES = _app_routes()
ROUTE_IDS = sorted(APP_ROUTES)


def _params(path: str) -> list[str]:
    return re.findall(r"\{([^}]+)\}", path)


def _scope_of(route: Any) -> str | None:
    """The token scope an API route asks for, read from its dependencies (require_scope names them)."""
    names: list[str] = []

    def walk(dependant: Any) -> None:
        for dep in dependant.dependencies:
            names.append(getattr(dep.call, "__name__", ""))
            walk(dep)

    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return None
    walk(dependant)
    by_name = {f"require_scope_{s.replace(':', '_')}": s for s in SCOPES}
    found = {by_name[n] for n in names if n in by_name}
    assert len(found) <= 1, found
    return found.pop() if found else None


# --- what each route is about ---------------------------------------------------------------------------------

def _future(days: int, hour: int = 2) -> str:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return (now.replace(hour=hour) + timedelta(days=days)).isoformat()


def _day(days: int = 0) -> str:
    return (date.today() + timedelta(days=days)).isoformat()


Body = Callable[[AuthzWorld], dict[str, Any]]

# Public routes that authenticate their callers themselves, and answer 401 to anyone without what they ask for (an
# instrument's token, an OpenID client's secret or access token, a password): only "no 5xx" is asserted there.
SELF_AUTHENTICATING = {
    ("POST", "/api/v1/instrument-usage/check-in"), ("POST", "/api/v1/instrument-usage/check-out"),
    ("GET", "/api/v1/instrument-usage/current"), ("POST", "/oidc/token"), ("GET", "/oidc/userinfo"),
    ("POST", "/oidc/userinfo"), ("POST", "/login"),
}

STATS_ROUTES = (("GET", "/api/v1/stats/dashboard"), ("GET", "/api/v1/stats/instruments"),
                ("GET", "/api/v1/stats/tables/{table}.csv"), ("GET", "/api/v1/stats/export.xlsx"), ("GET", "/stats"),
                ("GET", "/stats/export.xlsx"), ("GET", "/stats/tables/{table}.csv"))

# Routes whose target is named in the body or the query rather than the path: the resource it names.
TARGETS: dict[tuple[str, str], str] = {
    ("POST", "/api/v1/services"): "facility_id",
    ("POST", "/manage/services"): "facility_id",
    ("POST", "/api/v1/billing/rates"): "facility_id",
    ("POST", "/api/v1/billing/charges"): "facility_id",
    ("POST", "/api/v1/experts"): "facility_id",
    ("POST", "/api/v1/demands/{demand_id}/offers"): "facility_id",
    ("POST", "/admin/roles"): "facility_id",
    ("POST", "/api/v1/billing/talent-entitlements"): "@region",
    ("POST", "/manage/talent-entitlements"): "@region",
    ("POST", "/api/v1/billing/vouchers"): "@region",
    ("POST", "/manage/vouchers"): "@region",
    ("PUT", "/api/v1/billing/voucher-recognition"): "@region",
    ("POST", "/manage/vouchers/recognition"): "@region",
    ("GET", "/api/v1/billing/vouchers"): "@region",
    ("GET", "/api/v1/audit"): "@region",
    ("GET", "/audit"): "@region",
    ("POST", "/api/v1/billing/invoices/generate"): "institution_id",
    ("GET", "/api/v1/billing/charges.csv"): "account_id",
    ("GET", "/api/v1/billing/invoices"): "account_id",
    ("GET", "/billing/invoices"): "account_id",
    **{route: "facility_id" for route in STATS_ROUTES},
}
# Routes that more actions than the route's own open: any of them over the target allows. Statistics are asked
# for with scope=facility:F1, which F1's staff, I1's administrators and CQ's authority may read; a role grant is
# revoked or given by whoever may grant that role over its scope (staff of F1 here).
_F1_STATS = (Action.view_facility_statistics, Action.view_institution_statistics, Action.view_region_statistics)
ACTIONS: dict[tuple[str, str], tuple[Action, ...]] = {
    **{route: _F1_STATS for route in STATS_ROUTES},
    ("GET", "/api/v1/stats/reports/{institution_id}/{year}.pdf"): (
        Action.view_institution_statistics, Action.view_region_statistics),
    ("GET", "/stats/reports/{institution_id}/{year}.pdf"): (
        Action.view_institution_statistics, Action.view_region_statistics),
    ("POST", "/admin/roles/{grant_id}/revoke"): (Action.grant_facility_staff,),
    ("POST", "/admin/roles"): (Action.grant_facility_staff,),
}

# Pages that answer a card or entitlement of another region like one already decided or removed meanwhile: back to
# the queue with an error message (nothing changes and nothing is shown), rather than a 404 page.
FLASH_REFUSALS = {
    ("POST", "/manage/talent-cards/{card_id}/verify"), ("POST", "/manage/talent-cards/{card_id}/reject"),
    ("POST", "/manage/talent-cards/{card_id}/revoke"), ("POST", "/manage/talent-entitlements/{entitlement_id}/remove"),
}

STATS_QUERY: Body = lambda w: {"scope": f"facility:{w.facilities['F1']}"}  # noqa: E731

# Query strings, where a route needs one.
QUERIES: dict[tuple[str, str], Body] = {
    ("GET", "/api/v1/instruments/{instrument_id}/availability"): lambda w: {"from": _future(1), "to": _future(3)},
    ("GET", "/api/v1/slots/earliest"): lambda w: {"duration_minutes": 60},
    ("GET", "/api/v1/billing/settlement"): lambda w: {"period": w.ids["period"]},
    ("GET", "/api/v1/billing/settlement.{fmt}"): lambda w: {"period": w.ids["period"]},
    ("GET", "/billing/settlement"): lambda w: {"period": w.ids["period"]},
    ("GET", "/api/v1/billing/instruments/{instrument_id}/price"): lambda w: {
        "starts_at": _future(5), "ends_at": _future(5, 3)},
    ("GET", "/api/v1/billing/vouchers"): lambda w: {"region": "CQ"},
    ("GET", "/api/v1/billing/invoices"): lambda w: {"account_id": w.ids["account"]},
    ("GET", "/billing/invoices"): lambda w: {"account": w.ids["account"]},
    ("GET", "/api/v1/audit"): lambda w: {"region": "CQ"},
    ("GET", "/audit"): lambda w: {"region": "CQ"},
    ("POST", "/api/v1/orders/{order_id}/results"): lambda w: {"filename": "data.csv", "kind": "data"},
    ("GET", "/api/v1/billing/charges.csv"): lambda w: {"from": _day(-30), "to": _day(1),
                                                       "account_id": w.ids["account"]},
    **{route: STATS_QUERY for route in STATS_ROUTES},
}

# JSON bodies of API writes: valid, so that a check made after parsing them is reached.
BODIES: dict[tuple[str, str], Body] = {
    ("POST", "/api/v1/services"): lambda w: {
        "facility": "AZ-F1", "code": "AZ-SVC-NEW", "kind": "testing", "category_code": "GEN.SEQ",
        "name_zh": "新服务", "name_en": "New service"},
    ("PATCH", "/api/v1/services/{service_id}"): lambda w: {"name_en": "Renamed service"},
    ("POST", "/api/v1/bookings"): lambda w: {
        "instrument_id": w.ids["instrument"], "starts_at": _future(6), "ends_at": _future(6, 3), "purpose": "Test",
        "account_id": w.ids["account"]},
    ("POST", "/api/v1/instruments/{instrument_id}/maintenance"): lambda w: {
        "starts_at": _future(40), "ends_at": _future(40, 4), "reason": "Calibration"},
    ("POST", "/api/v1/bookings/series"): lambda w: {
        "instrument_id": w.ids["instrument"], "first_starts_at": _future(8), "duration_minutes": 60,
        "rrule": "FREQ=WEEKLY;COUNT=2", "account_id": w.ids["account"]},
    ("POST", "/api/v1/waitlist"): lambda w: {
        "instrument_id": w.ids["instrument"], "starts_at": w.ids["taken_from"], "ends_at": w.ids["taken_to"]},
    ("PUT", "/api/v1/me/notifications"): lambda w: {"email": {}},
    ("PUT", "/api/v1/instruments/{instrument_id}/policy"): lambda w: {"requires_approval": True},
    ("POST", "/api/v1/bookings/{booking_id}/decline"): lambda w: {"reason": "Not this week"},
    ("POST", "/api/v1/instruments/{instrument_id}/qualifications"): lambda w: {"user_email": "b@example.org"},
    ("POST", "/api/v1/orders"): lambda w: {"service_id": w.ids["service"], "title": "Another order"},
    ("POST", "/api/v1/orders/{order_id}/transitions"): lambda w: {"to": "cancelled"},
    ("POST", "/api/v1/orders/{order_id}/quotes"): lambda w: {
        "lines": [{"description": "Extra run", "quantity": 1, "unit_price_fen": 100}], "valid_until": _day(20)},
    ("POST", "/api/v1/orders/{order_id}/quotes/{quote_id}/decline"): lambda w: {"reason": "Too dear"},
    ("POST", "/api/v1/orders/{order_id}/messages"): lambda w: {"body": "Any news?"},
    ("POST", "/api/v1/orders/{order_id}/rating"): lambda w: {"score": 5},
    ("POST", "/api/v1/orders/{order_id}/samples"): lambda w: {"count": 1},
    ("POST", "/api/v1/samples/{sample_id}/events"): lambda w: {"event": "received"},
    ("POST", "/api/v1/billing/talent-entitlements"): lambda w: {
        "scheme_code": "tianfu", "provider_region_code": "CQ", "kind": "priority_window", "value": 10},
    ("POST", "/api/v1/billing/talent-cards"): lambda w: {
        "scheme_code": "tianfu", "card_number": "TF-0099", "holder_name": "Someone"},
    ("POST", "/api/v1/billing/talent-cards/{card_id}/verify"): lambda w: {"note": "Checked"},
    ("POST", "/api/v1/billing/talent-cards/{card_id}/reject"): lambda w: {"note": "Unreadable"},
    ("POST", "/api/v1/billing/talent-cards/{card_id}/revoke"): lambda w: {"note": "Withdrawn"},
    ("POST", "/api/v1/billing/invoices/generate"): lambda w: {
        "period": w.ids["period"], "account_id": w.ids["account"], "allow_open": True},
    ("PUT", "/api/v1/billing/facilities/{facility_id}/policy"): lambda w: {"charge_no_show": True},
    ("POST", "/api/v1/billing/rates"): lambda w: {
        "instrument_id": w.ids["instrument"], "category": "internal", "unit": "hour", "amount_fen": 100,
        "effective_from": _day(10)},
    ("POST", "/api/v1/billing/accounts"): lambda w: {"code": "AZ-NEW-ACC", "name": "New account"},
    ("POST", "/api/v1/billing/accounts/join"): lambda w: {"code": "AZ-GRANT-A"},
    ("PATCH", "/api/v1/billing/accounts/{account_id}"): lambda w: {"name": "Renamed account"},
    ("POST", "/api/v1/billing/accounts/{account_id}/members"): lambda w: {"email": "erin@example.org"},
    ("POST", "/api/v1/billing/members/{member_id}/decision"): lambda w: {"status": "approved"},
    ("POST", "/api/v1/billing/accounts/{account_id}/deposits"): lambda w: {"amount_fen": 100},
    ("POST", "/api/v1/billing/vouchers"): lambda w: {
        "issuer_region_code": "CQ", "account_id": w.ids["account"], "amount_fen": 100, "valid_from": _day(),
        "valid_until": _day(30)},
    ("PUT", "/api/v1/billing/voucher-recognition"): lambda w: {
        "issuer_region_code": "SC", "provider_region_code": "CQ", "accepted": False},
    ("POST", "/api/v1/billing/charges"): lambda w: {
        "facility_id": w.facilities["F1"], "account_id": w.ids["account"], "user_email": "a@example.org",
        "description": "Extra consumables", "amount_fen": 100, "service_date": _day()},
    ("POST", "/api/v1/billing/charges/{charge_id}/reversal"): lambda w: {"note": "Posted twice"},
    ("POST", "/api/v1/billing/charges/{charge_id}/correction"): lambda w: {"note": "Fewer hours", "amount_fen": 500},
    ("POST", "/api/v1/demands/match"): lambda w: {"text": "Single-cell RNA sequencing"},
    ("POST", "/api/v1/demands"): lambda w: {"text": "Spatial transcriptomics of a mouse brain section"},
    ("POST", "/api/v1/demands/{demand_id}/offers"): lambda w: {
        "facility_id": w.facilities["F1"], "service_id": w.ids["service"], "message": "A second offer"},
    ("POST", "/api/v1/offers/{offer_id}/accept"): lambda w: {"account_id": w.ids["account"]},
    ("PUT", "/api/v1/facilities/{facility_id}/demand-subscription"): lambda w: {"active": True},
    ("POST", "/api/v1/experts"): lambda w: {
        "name_zh": "专家乙", "name_en": "Expert B", "facility_id": w.facilities["F1"], "code": "AZ-EXP-NEW"},
    ("PATCH", "/api/v1/experts/{expert_id}"): lambda w: {"title_en": "Senior engineer"},
    ("POST", "/api/v1/instrument-usage/check-in"): lambda w: {"booking_id": w.ids["booking"]},
    ("POST", "/api/v1/instrument-usage/check-out"): lambda w: {"booking_id": w.ids["booking"]},
    ("POST", "/api/v1/me/tokens"): lambda w: {"name": "Another", "scopes": ["catalog:read"]},
    ("POST", "/api/v1/me/deletion"): lambda w: {"confirm": True},
}

# Form fields of page posts (the CSRF token is added to every one).
FORMS: dict[tuple[str, str], Body] = {
    ("POST", "/instruments/{instrument_id}/book"): lambda w: {
        "date": _future(6)[:10], "start": "10:00", "end": "11:00", "purpose": "Test",
        "account_id": str(w.ids["account"])},
    ("POST", "/manage/instruments/{instrument_id}/maintenance"): lambda w: {
        "start": _future(41)[:16], "end": _future(41, 4)[:16], "reason": "Calibration"},
    ("POST", "/instruments/{instrument_id}/book-series"): lambda w: {
        "date": _future(9)[:10], "start": "10:00", "end": "11:00", "repeat": "weekly", "count": "2",
        "account_id": str(w.ids["account"])},
    ("POST", "/instruments/{instrument_id}/waitlist"): lambda w: {
        "date": w.ids["taken_from"][:10], "start": "13:00", "end": "14:00"},
    ("POST", "/kiosk/{instrument_id}/check-in"): lambda w: {"booking_id": str(w.ids["booking"])},
    ("POST", "/kiosk/{instrument_id}/check-out"): lambda w: {"booking_id": str(w.ids["booking"])},
    ("POST", "/account/calendars"): lambda w: {"kind": "bookings"},
    ("POST", "/manage/approvals/{booking_id}/decline"): lambda w: {"reason": "Not this week"},
    ("POST", "/manage/instruments/{instrument_id}/rules"): lambda w: {"requires_approval": "on"},
    ("POST", "/manage/instruments/{instrument_id}/qualifications"): lambda w: {
        "email": "b@example.org", "level": "independent"},
    ("POST", "/manage/qualifications/{qualification_id}/revoke"): lambda w: {
        "instrument_id": str(w.ids["instrument"])},
    ("POST", "/admin/providers"): lambda w: {
        "name": "az-new-idp", "region": "CQ", "issuer": "http://127.0.0.1:9/new", "client_id": "lc"},
    ("POST", "/admin/providers/{name}/enabled"): lambda w: {"enabled": "false"},
    ("POST", "/admin/providers/{name}/trusted"): lambda w: {"trusted": "true"},
    ("POST", "/admin/clients"): lambda w: {"name": "New system", "redirect_uris": "https://new.example.org/cb"},
    ("POST", "/admin/clients/{client_id}"): lambda w: {"action": "disable"},
    ("POST", "/account/tokens"): lambda w: {"name": "Another", "scopes": ["catalog:read"]},
    ("POST", "/admin/roles"): lambda w: {"email": "b@example.org", "role": "facility_staff", "scope": "AZ-F1"},
    ("POST", "/manage/services"): lambda w: {
        "facility": "AZ-F1", "code": "AZ-SVC-NEW", "kind": "testing", "category_code": "GEN.SEQ",
        "name_zh": "新服务", "name_en": "New service"},
    ("POST", "/manage/services/{service_id}"): lambda w: {
        "kind": "testing", "category_code": "GEN.SEQ", "name_zh": "单细胞测序", "name_en": "Renamed service"},
    ("POST", "/services/{service_id}/order"): lambda w: {"title": "Another order", "action": "draft"},
    ("POST", "/orders/{order_id}/transitions"): lambda w: {"to": "cancelled"},
    ("POST", "/orders/{order_id}/quotes"): lambda w: {
        "line_description": "Extra run", "line_quantity": "1", "line_price": "1.00", "valid_until": _day(20)},
    ("POST", "/orders/{order_id}/quotes/{quote_id}/decline"): lambda w: {"reason": "Too dear"},
    ("POST", "/orders/{order_id}/messages"): lambda w: {"body": "Any news?"},
    ("POST", "/orders/{order_id}/rating"): lambda w: {"score": "5"},
    ("POST", "/orders/{order_id}/samples"): lambda w: {"count": "1"},
    ("POST", "/samples/{sample_id}/events"): lambda w: {"event": "received"},
    ("POST", "/account/talent-cards"): lambda w: {
        "scheme_code": "tianfu", "card_number": "TF-0099", "holder_name": "Someone"},
    ("POST", "/manage/talent-cards/{card_id}/verify"): lambda w: {"note": "Checked"},
    ("POST", "/manage/talent-cards/{card_id}/reject"): lambda w: {"note": "Unreadable"},
    ("POST", "/manage/talent-cards/{card_id}/revoke"): lambda w: {"note": "Withdrawn"},
    ("POST", "/manage/talent-entitlements"): lambda w: {
        "scheme_code": "tianfu", "provider_region_code": "CQ", "kind": "priority_window", "value": "10"},
    ("POST", "/billing/accounts"): lambda w: {"code": "AZ-NEW-ACC", "name": "New account", "kind": "grant"},
    ("POST", "/billing/join"): lambda w: {"code": "AZ-GRANT-A"},
    ("POST", "/billing/accounts/{account_id}/members/{member_id}"): lambda w: {"status": "approved"},
    ("POST", "/billing/accounts/{account_id}/deposits"): lambda w: {"amount": "1.00", "reference": "Bank"},
    ("POST", "/manage/billing/facilities/{facility_id}/rates"): lambda w: {
        "target": f"instrument:{w.ids['instrument']}", "category": "internal", "unit": "hour", "amount": "1.00",
        "effective_from": _day(10)},
    ("POST", "/manage/billing/facilities/{facility_id}/policy"): lambda w: {
        "basis": "booked", "increment_minutes": "15", "rounding": "up"},
    ("POST", "/manage/billing/facilities/{facility_id}/charges/{charge_id}/correct"): lambda w: {
        "amount": "5.00", "note": "Fewer hours"},
    ("POST", "/manage/billing/facilities/{facility_id}/charges"): lambda w: {
        "account": "AZ-GRANT-A", "email": "a@example.org", "description": "Extra consumables", "amount": "1.00",
        "service_date": _day(), "item_kind": "consultation"},
    ("POST", "/manage/vouchers"): lambda w: {
        "region": "CQ", "account": "AZ-GRANT-A", "name": "Voucher", "amount": "1.00", "share": "50",
        "valid_from": _day(), "valid_until": _day(30)},
    ("POST", "/manage/vouchers/recognition"): lambda w: {"issuer": "SC", "provider": "CQ", "accepted": ""},
    ("POST", "/demands"): lambda w: {"text": "Spatial transcriptomics of a mouse brain section"},
    ("POST", "/demands/{demand_id}/offers/{offer_id}/accept"): lambda w: {"account_id": str(w.ids["account"])},
    ("POST", "/experts/{expert_id}/edit"): lambda w: {"name_zh": "专家甲", "name_en": "Expert A",
                                                      "title_en": "Senior engineer"},
    ("POST", "/manage/demands/facilities/{facility_id}/subscription"): lambda w: {
        "active": "on", "min_score": "0.1"},
    ("POST", "/manage/demands/facilities/{facility_id}/offers"): lambda w: {
        "demand_id": str(w.ids["demand"]), "service_id": str(w.ids["service"]), "message": "A second offer"},
    ("POST", "/account/privacy/delete"): lambda w: {"confirm": "on"},
}


class Expect(enum.Enum):
    REFUSE = "refused"
    ALLOW = "allowed"
    ANY = "not asserted"


def may(grants: tuple[Grant, ...], action: Action, target: Resource | None) -> bool:
    """Whether grants allow `action` over the target, read from PERMISSIONS alone (not through roles.authorize,
    which is what is under test): a facility role covers its facility, an institution administrator the
    institution and its facilities, a region authority its region, a platform administrator everything."""
    rule = PERMISSIONS[action]
    if USER in rule.roles:
        return True
    for grant in grants:
        if grant.role not in rule.roles:
            continue
        if grant.role == Role.platform_admin or rule.target is Target.none:
            return True
        if target is None:
            continue
        if rule.target is Target.facility and target.facility is not None:
            if grant.role in (Role.facility_staff, Role.facility_manager) and grant.facility_id == target.facility.id:
                return True
            if grant.role == Role.institution_admin and grant.institution_id == target.facility.institution_id:
                return True
        if (rule.target is Target.institution and grant.role == Role.institution_admin
                and grant.institution_id == target.institution_id):
            return True
        if (rule.target is Target.region and grant.role == Role.region_authority
                and grant.region_code == target.region_code):
            return True
    return False


def _path_target(world: AuthzWorld, path: str) -> Resource | None:
    """The first row of the path that has a place or an owner: what the route's action is done to."""
    for name in _params(path):
        resource = world.resources[name]
        if resource.owner or resource.facility or resource.institution_id or resource.region_code:
            return resource
    return None


def expectation(world: AuthzWorld, route: tuple[str, str], name: str) -> Expect:
    """What `name` should get from the route, from ROUTES, PERMISSIONS and the row the route names."""
    access: Access = ROUTES[route]
    if access == "public":
        return Expect.ANY if route in SELF_AUTHENTICATING else Expect.ALLOW
    if name == ANON:
        return Expect.REFUSE
    grants = world.grants[name]
    target = world.resources[TARGETS[route]] if route in TARGETS else _path_target(world, route[1])
    if access == "user" or USER in PERMISSIONS[Action(access)].roles:
        # Anyone signed in, for their own rows: another user's row is refused but to its insiders.
        if target is None or target.owner is None or name == target.owner:
            return Expect.ALLOW
        if any(may(grants, action, target) for action in target.insiders):
            return Expect.ANY
        return Expect.REFUSE
    actions = ACTIONS.get(route, (Action(access),))
    if target is None or all(PERMISSIONS[a].target is Target.none for a in actions):
        # Lists and forms without a target: holding the role over some scope opens them (each shows its own).
        allowed = any(g.role in PERMISSIONS[a].roles for a in actions for g in grants)
    else:
        allowed = any(may(grants, action, target) for action in actions)
    return Expect.ALLOW if allowed else Expect.REFUSE


# --- sending ----------------------------------------------------------------------------------------------------

@dataclass
class Matrix:
    """The world, the app over it (called in-process on an event loop of the module's own: no server thread and no
    portal between test and app), and the snapshot every test puts the database back to."""

    world: AuthzWorld
    client: httpx.AsyncClient
    loop: asyncio.AbstractEventLoop
    saved: Saved

    def url(self, path: str) -> str:
        return re.sub(r"\{([^}]+)\}", lambda m: self.world.resources[m.group(1)].value, path)

    def send(self, route: tuple[str, str], name: str, *, token: str | None = None,
             payload: dict[str, Any] | None = None) -> Response:
        """The route's request as `name` (a token for the API, the browser session for pages), with the body of
        BODIES or FORMS unless a `payload` is given."""
        method, path = route
        world = self.world
        is_api = path.startswith("/api/")
        headers: dict[str, str] = {}
        caller = world.callers.get(name)
        kwargs: dict[str, Any] = {}
        query = QUERIES.get(route)
        if query is not None:
            kwargs["params"] = query(world)
        if is_api:
            if caller is not None:
                headers["Authorization"] = f"Bearer {token or caller.token}"
            if route == ("POST", "/api/v1/orders/{order_id}/results"):
                kwargs["content"] = b"sample,reads\nS01,1000\n"
                headers["Content-Type"] = "text/csv"
            elif method in ("POST", "PUT", "PATCH"):
                body = BODIES.get(route)
                kwargs["json"] = payload if payload is not None else body(world) if body is not None else {}
        else:
            cookie = f"{SESSION_COOKIE}={caller.session_cookie}" if caller else f"{ANON_COOKIE}={world.anon_cookie}"
            headers["Cookie"] = cookie
            if method == "POST":
                form = FORMS.get(route)
                fields = payload if payload is not None else form(world) if form is not None else {}
                data = {**fields,
                        "csrf_token": caller.csrf if caller else world.anon_csrf}
                if route == ("POST", "/orders/{order_id}/results"):
                    kwargs["files"] = {"file": ("data.csv", b"sample,reads\nS01,1000\n", "text/csv")}
                    kwargs["data"] = {"csrf_token": data["csrf_token"], "kind": "data"}
                else:
                    kwargs["data"] = data
        self.client.cookies.clear()
        return self.loop.run_until_complete(
            self.client.request(method, self.url(path), headers=headers, follow_redirects=False, **kwargs))


def _flash_error(response: Response) -> bool:
    return unquote((response.cookies.get(FLASH_COOKIE) or "").strip('"')).startswith("error|")


def _refused(route: tuple[str, str], response: Response, *, anonymous: bool) -> bool:
    """401/403/404; a page sends the anonymous to sign in (and FLASH_REFUSALS answer with an error message)."""
    if response.status_code in (401, 403, 404):
        return True
    if route[1].startswith("/api/") or response.status_code != 303:
        return False
    if anonymous:
        return response.headers.get("location", "").startswith("/login?")
    return route in FLASH_REFUSALS and _flash_error(response)


def _allowed(response: Response, *, is_api: bool) -> bool:
    """Not 401/403, and for a page not sent to sign in."""
    if response.status_code in (401, 403):
        return False
    return is_api or not (response.status_code == 303
                          and response.headers.get("location", "").startswith("/login?"))


def _describe(response: Response) -> str:
    return f"{response.status_code} {response.text[:160]!r}"


# --- the world, once per database --------------------------------------------------------------------------------

def _emptied_postgres(request: pytest.FixtureRequest) -> str:
    """The session's PostgreSQL database, emptied as the `db` fixture does (reference data kept). Nothing else runs
    on this worker while the module's tests do: xdist hands each worker its tests in collection order."""
    url: str = request.getfixturevalue("postgres_url")
    database = Database.from_url(url)
    try:
        tables = [t.name for t in Base.metadata.sorted_tables if t.name not in REFERENCE_TABLES]
        with database.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    finally:
        database.dispose()
    return url


@contextmanager
def _keyword_matching() -> Iterator[None]:
    """Matching without the embedding model: keywords match A's demand, and loading the model costs seconds."""
    embeddings.simulate_missing("the authorisation matrix matches by keywords")
    index.clear_cache()
    try:
        yield
    finally:
        embeddings.simulate_missing(None)
        index.clear_cache()


# One world per database and worker; the groups would keep each database's tests on one worker (with pytest-xdist
# versions that honour xdist_group marks under --dist loadgroup).
@pytest.fixture(scope="module", params=[
    pytest.param("sqlite", marks=pytest.mark.xdist_group("authz-sqlite")),
    pytest.param("postgresql", marks=pytest.mark.xdist_group("authz-postgresql")),
])
def matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    """The world on one database, an app over it, and the snapshot every test puts the database back to."""
    tmp = tmp_path_factory.mktemp("authz")
    with ExitStack() as stack:
        if request.param == "sqlite":
            template: Path = request.getfixturevalue("sqlite_template")
            shutil.copy(template, tmp / "authz.db")
            url = f"sqlite:///{tmp / 'authz.db'}"
        else:
            url = _emptied_postgres(request)
        db = Database.from_url(url)
        stack.callback(db.dispose)
        stack.enter_context(_keyword_matching())
        world = build(db)
        # Thousands of writes within minutes: the write rate limit (0: off) is not what this module tests.
        settings = get_settings().model_copy(update={"write_rate_per_minute": 0})
        transport = httpx.ASGITransport(app=create_app(settings, db=db), raise_app_exceptions=False)
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)
        client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        stack.callback(lambda: loop.run_until_complete(client.aclose()))
        yield Matrix(world=world, client=client, loop=loop, saved=Saved(db, str(tmp / "saved.db")))


# --- the tests --------------------------------------------------------------------------------------------------

def test_every_route_has_a_rule_and_every_parameter_a_row() -> None:
    """A new route needs a ROUTES rule; a new path parameter needs a row in authz_support._resources."""
    assert sorted(set(APP_ROUTES) - set(ROUTES)) == [], "add these routes to labcommons.identity.roles.ROUTES"
    names = {p for _m, path in APP_ROUTES for p in _params(path)}
    assert sorted(names - resource_names()) == [], "give these path parameters a row in authz_support._resources"
    for route, target in TARGETS.items():
        assert target in resource_names() or target.startswith("@"), route
    api_writes = {r for r in APP_ROUTES if r[1].startswith("/api/") and r[0] in ("POST", "PUT", "PATCH")}
    assert sorted(set(BODIES) - api_writes - set(ROUTES)) == []


@pytest.mark.parametrize("route", ROUTE_IDS, ids=[f"{m} {p}" for m, p in ROUTE_IDS])
def test_route_refuses_whom_the_table_refuses(matrix: Matrix, route: tuple[str, str]) -> None:
    """Refused actors get 401/403/404 and change nothing; allowed ones get no 401/403; nobody gets a 5xx."""
    method, path = route
    assert route in ROUTES, "add the route to labcommons.identity.roles.ROUTES"
    world = matrix.world
    missing = [p for p in _params(path) if p not in world.resources]
    assert missing == [], f"give the path parameters {missing} a row in authz_support._resources"
    is_api = path.startswith("/api/")
    know_upstream()
    expected = {name: expectation(world, route, name) for name in NAMES}
    problems: list[str] = []
    refused_requests: list[tuple[str, str | None]] = []

    for name in NAMES:
        if expected[name] is not Expect.REFUSE:
            continue
        response = matrix.send(route, name)
        refused_requests.append((name, None))
        if not _refused(route, response, anonymous=name == ANON):
            problems.append(f"{name} should be refused, got {_describe(response)}")

    scope = _scope_of(APP_ROUTES[route]) if is_api else None
    allowed = [n for n in NAMES if expected[n] is Expect.ALLOW and n != ANON]
    if is_api and ROUTES[route] != "public":
        assert scope is not None, "an API route that needs a caller must ask for a token scope (require_scope)"
        holder = allowed[0] if allowed else "platform"
        response = matrix.send(route, holder, token=world.callers[holder].token_without[scope])
        refused_requests.append((holder, scope))
        if response.status_code != 403 or response.json().get("error") != "insufficient_scope":
            problems.append(f"{holder}'s token without {scope} should get 403 insufficient_scope, "
                            f"got {_describe(response)}")

    # Before any allowed write changes the database: did a refused one?
    if method != "GET" and refused_requests and changed_tables(matrix.saved.digest, digest(world.db)):
        problems += _who_changed(matrix, route, refused_requests) or [
            "the refused requests changed the database, though none of them alone"]

    for name in NAMES:
        if expected[name] is Expect.REFUSE:
            continue
        response = matrix.send(route, name)
        if response.status_code >= 500:
            problems.append(f"{name} got {_describe(response)}")
        elif expected[name] is Expect.ALLOW and not _allowed(response, is_api=is_api):
            problems.append(f"{name} should be allowed, got {_describe(response)}")

    changed = changed_tables(matrix.saved.digest, digest(world.db))
    if changed and method == "GET" and refused_requests:
        # One check for reads: only when something changed is each refused read replayed alone.
        problems += _who_changed(matrix, route, refused_requests)
    elif changed:
        matrix.saved.restore(changed)
    assert problems == [], f"{method} {path}:\n" + "\n".join(problems)


def _who_changed(matrix: Matrix, route: tuple[str, str], requests: list[tuple[str, str | None]]) -> list[str]:
    """Replay the refused requests one at a time from the saved state: which of them changed what. Leaves the
    database as saved."""
    found = []
    for name, scope in requests:
        matrix.saved.restore()
        caller = matrix.world.callers.get(name)
        token = caller.token_without[scope] if caller is not None and scope is not None else None
        matrix.send(route, name, token=token)
        changed = changed_tables(matrix.saved.digest, digest(matrix.world.db))
        if changed:
            found.append(f"{name}{' (token without ' + scope + ')' if scope else ''} was refused but changed "
                         f"{', '.join(changed)}")
    matrix.saved.restore()
    return found


# --- what the body names -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reach:
    """A request whose body (not its path) names what the caller may not reach: refused, and nothing changes."""

    route: tuple[str, str]
    caller: str
    body: Body
    without_scope: str | None = None


REACHES: dict[str, Reach] = {
    "a manager grants a manager": Reach(("POST", "/admin/roles"), "manager_f1", lambda w: {
        "email": "b@example.org", "role": "facility_manager", "scope": "AZ-F1"}),
    "an institution admin grants an institution admin": Reach(("POST", "/admin/roles"), "admin_i1", lambda w: {
        "email": "b@example.org", "role": "institution_admin", "scope": "AZ-I1"}),
    "a manager grants himself": Reach(("POST", "/admin/roles"), "manager_f1", lambda w: {
        "email": "manager_f1@example.org", "role": "facility_staff", "scope": "AZ-F1"}),
    "a manager grants staff of another facility": Reach(("POST", "/admin/roles"), "manager_f1", lambda w: {
        "email": "b@example.org", "role": "facility_staff", "scope": "AZ-F2"}),
    "a user opens an account owned by another": Reach(("POST", "/api/v1/billing/accounts"), "b", lambda w: {
        "code": "AZ-B-FOR-A", "name": "For A", "owner_id": w.users["a"]}),
    "a user opens an account of another institution": Reach(("POST", "/api/v1/billing/accounts"), "b", lambda w: {
        "code": "AZ-B-AT-I2", "name": "At I2", "institution_id": w.institutions["I2"]}),
    "an expert hands their profile to another user": Reach(("PATCH", "/api/v1/experts/{expert_id}"), "a", lambda w: {
        "user_id": w.users["b"]}),
    "a token mints a token with a scope it lacks": Reach(("POST", "/api/v1/me/tokens"), "b", lambda w: {
        "name": "Wider", "scopes": ["admin"]}, without_scope="admin"),
    "an issuing region sets what another region's providers accept": Reach(
        ("PUT", "/api/v1/billing/voucher-recognition"), "authority_cq", lambda w: {
            "issuer_region_code": "CQ", "provider_region_code": "SC", "accepted": False}),
    "a region issues another region's voucher": Reach(("POST", "/api/v1/billing/vouchers"), "authority_cq", lambda w: {
        "issuer_region_code": "SC", "account_id": w.ids["account"], "amount_fen": 100, "valid_from": _day(),
        "valid_until": _day(30)}),
    "a card's issuing region sets entitlements at another region's providers": Reach(
        ("POST", "/api/v1/billing/talent-entitlements"), "authority_sc", lambda w: {
            "scheme_code": "tianfu", "provider_region_code": "CQ", "kind": "priority_window", "value": 10}),
    "staff offer in another facility's name": Reach(("POST", "/api/v1/demands/{demand_id}/offers"), "staff_f1",
                                                    lambda w: {"facility_id": w.facilities["F2"],
                                                               "service_id": w.ids["service"], "message": "Us"}),
    "a manager prices another facility's instrument": Reach(("POST", "/api/v1/billing/rates"), "manager_f1", lambda w: {
        "instrument_id": w.ids["instrument_f2"], "category": "internal", "unit": "hour", "amount_fen": 1,
        "effective_from": _day(10)}),
    "a manager adds a service to another facility": Reach(("POST", "/api/v1/services"), "manager_f1", lambda w: {
        "facility": "AZ-F2", "code": "AZ-SVC-F2", "kind": "testing", "category_code": "GEN.SEQ", "name_zh": "服务",
        "name_en": "Service"}),
    "staff charge in another facility's name": Reach(("POST", "/api/v1/billing/charges"), "staff_f1", lambda w: {
        "facility_id": w.facilities["F2"], "account_id": w.ids["account"], "user_email": "a@example.org",
        "description": "Consumables", "amount_fen": 100, "service_date": _day()}),
    "an institution admin invoices another institution's account": Reach(
        ("POST", "/api/v1/billing/invoices/generate"), "admin_i2", lambda w: {
            "period": w.ids["period"], "account_id": w.ids["account"], "allow_open": True}),
}


@pytest.mark.parametrize("case", list(REACHES))
def test_a_body_cannot_reach_past_the_callers_scope(matrix: Matrix, case: str) -> None:
    """Role escalation and cross-scope writes through body fields are refused and change nothing."""
    reach = REACHES[case]
    world = matrix.world
    caller = world.callers[reach.caller]
    token = caller.token_without[reach.without_scope] if reach.without_scope else None
    response = matrix.send(reach.route, reach.caller, token=token, payload=reach.body(world))
    changed = changed_tables(matrix.saved.digest, digest(world.db))
    if changed:
        matrix.saved.restore(changed)
    assert response.status_code in (403, 404), _describe(response)
    assert changed == []
