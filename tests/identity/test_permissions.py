"""The permission table: authorize() walks it, granting follows it, every route is classified by it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route

from labcommons.actor import Actor, Grant
from labcommons.app import create_app
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.http import SESSION_COOKIE
from labcommons.identity import roles, service
from labcommons.identity.models import Role
from labcommons.identity.roles import PERMISSIONS, ROLES, ROUTES, USER, Action, FacilityRef, Target
from tests.factories import World
from tests.web.conftest import csrf_of, sign_in

ROOT = Path(__file__).resolve().parents[2]

# Routes other helpers are adding; their absence (not yet merged) is tolerated, nothing else is.
OPTIONAL_ROUTES = {
    ("GET", "/admin/providers"), ("GET", "/admin/clients"),
    ("POST", "/account/identities/link/{name}"), ("POST", "/account/identities/{identity_id}/unlink"),
}
ADMIN_PAGES = ["/admin", "/admin/roles", "/admin/providers", "/admin/clients"]


def test_docs_are_generated_from_the_table() -> None:
    assert (ROOT / "docs" / "permissions.md").read_text("utf-8") == roles.render_permissions_markdown(), (
        "regenerate docs/permissions.md with labcommons.identity.roles.render_permissions_markdown()"
    )


# --- the table walk ----------------------------------------------------------------------------------------

INSIDE = dict(facility=FacilityRef(id=1, institution_id=10), institution_id=10, region_code="SC")
OUTSIDE = dict(facility=FacilityRef(id=2, institution_id=20), institution_id=20, region_code="CQ")


def actor_with(*grants: Grant) -> Actor:
    return Actor(user_id=99, email="x@example.org", name="X", institution_id=None, region_code="CQ", grants=grants)


def grant_inside(role: str) -> tuple[Grant, ...]:
    """A grant of `role` whose scope contains the INSIDE targets (and not the OUTSIDE ones)."""
    return {
        USER: (),
        Role.facility_staff: (Grant(role="facility_staff", facility_id=1),),
        Role.facility_manager: (Grant(role="facility_manager", facility_id=1),),
        Role.institution_admin: (Grant(role="institution_admin", institution_id=10),),
        Role.region_authority: (Grant(role="region_authority", region_code="SC"),),
        Role.platform_admin: (Grant(role="platform_admin"),),
    }[role]


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("role", ROLES)
def test_authorize_follows_the_table(action: Action, role: str) -> None:
    rule = PERMISSIONS[action]
    actor = actor_with(*grant_inside(role))
    allowed = role in rule.roles
    # Outside its scope a scoped role no longer helps; unscoped roles and targetless actions do not care.
    allowed_outside = allowed and (role in (USER, Role.platform_admin) or rule.target is Target.none)
    assert roles.authorize(actor, action, **INSIDE) is allowed  # type: ignore[arg-type]
    assert roles.authorize(actor, action, **OUTSIDE) is allowed_outside  # type: ignore[arg-type]
    assert roles.authorize(None, action, **INSIDE) is False  # type: ignore[arg-type]
    if not allowed:
        with pytest.raises(Forbidden):
            roles.require(actor, action, **INSIDE)  # type: ignore[arg-type]


def test_a_scoped_action_without_its_target_is_refused_to_scoped_roles() -> None:
    manager = actor_with(Grant(role="facility_manager", facility_id=1))
    assert not roles.authorize(manager, Action.edit_facility_catalogue)
    assert roles.authorize(actor_with(Grant(role="platform_admin")), Action.edit_facility_catalogue)


def test_every_action_is_in_the_table_and_grants_map_to_actions() -> None:
    assert set(PERMISSIONS) == set(Action)
    assert set(roles.GRANT_ACTION) == set(Role)
    roles.require_platform_admin(actor_with(Grant(role="platform_admin")))
    with pytest.raises(Forbidden):
        roles.require_platform_admin(actor_with(Grant(role="institution_admin", institution_id=1)))


# --- granting ----------------------------------------------------------------------------------------------



def _actor(world: World, name: str) -> Actor:
    with world.db.unit_of_work(write=False) as s:
        user = service.find_user(s, f"{name}@example.org")
        return service.actor_for(user, grants=roles.grants_of(s, user.id))


def _grant(world: World, granter: str | None, user: str, role: str, **scope: object) -> None:
    actor = _actor(world, granter) if granter else None
    with world.db.unit_of_work() as s:
        roles.grant_role(s, actor, service.find_user(s, f"{user}@example.org"), role, **scope)  # type: ignore[arg-type]


def test_granting_follows_the_table(world: World) -> None:
    cq_lab, cq_uni = world.facilities["CQ-LAB"], world.facilities["CQ-UNI"]
    _grant(world, None, "alice", "facility_manager", facility_id=cq_lab)
    # A facility manager may grant staff of his own facility only, and no managers.
    _grant(world, "alice", "bob", "facility_staff", facility_id=cq_lab)
    with pytest.raises(Forbidden):
        _grant(world, "alice", "carol", "facility_staff", facility_id=cq_uni)
    with pytest.raises(Forbidden):
        _grant(world, "alice", "carol", "facility_manager", facility_id=cq_lab)
    with pytest.raises(Forbidden):  # nobody grants himself anything
        _grant(world, "alice", "alice", "facility_staff", facility_id=cq_lab)
    with pytest.raises(Conflict):
        _grant(world, None, "bob", "facility_staff", facility_id=cq_lab)
    # An institution admin covers the facilities of his institution.
    _grant(world, None, "carol", "institution_admin", institution_id=world.institutions["CQ-UNI"])
    _grant(world, "carol", "bob", "facility_manager", facility_id=cq_uni)
    with pytest.raises(Forbidden):
        _grant(world, "carol", "bob", "facility_manager", facility_id=cq_lab)
    with pytest.raises(Forbidden):
        _grant(world, "carol", "bob", "institution_admin", institution_id=world.institutions["CQ-UNI"])
    # Scopes must fit the role.
    with pytest.raises(InvalidInput):
        _grant(world, None, "bob", "region_authority", facility_id=cq_lab)
    with pytest.raises(InvalidInput):
        _grant(world, None, "bob", "facility_staff")
    with pytest.raises(InvalidInput):
        _grant(world, None, "bob", "wizard")
    _grant(world, None, "alice", "platform_admin")
    _grant(world, "alice", "carol", "region_authority", region_code="SC")

    bob = _actor(world, "bob")
    assert set(bob.grants) == {Grant(role="facility_staff", facility_id=cq_lab),
                               Grant(role="facility_manager", facility_id=cq_uni)}


def test_revoking_and_listing_follow_the_table(world: World) -> None:
    cq_lab = world.facilities["CQ-LAB"]
    _grant(world, None, "alice", "facility_manager", facility_id=cq_lab)
    _grant(world, None, "bob", "facility_staff", facility_id=cq_lab)
    _grant(world, None, "carol", "institution_admin", institution_id=world.institutions["SC-UNI"])
    alice = _actor(world, "alice")
    with world.db.unit_of_work() as s:
        listed = roles.list_grants(s, alice)
        # The manager sees the staff grant of his facility, not his own manager grant nor carol's.
        assert [(g.email, g.role, g.scope_code) for g in listed] == [("bob@example.org", "facility_staff", "CQ-LAB-F")]
        carols = next(g for g in roles.list_grants(s, None) if g.email == "carol@example.org")
        with pytest.raises(NotFound):
            roles.revoke_grant(s, alice, carols.id)
        roles.revoke_role(s, alice, service.find_user(s, "bob@example.org"), "facility_staff", facility_id=cq_lab)
        assert roles.grants_of(s, world.actors["bob"].user_id) == ()
        with pytest.raises(NotFound):
            roles.revoke_role(s, None, service.find_user(s, "bob@example.org"), "facility_staff", facility_id=cq_lab)


def test_requests_carry_the_grants(world: World) -> None:
    _grant(world, None, "alice", "region_authority", region_code="SC")
    with world.db.unit_of_work() as s:
        actor = service.authenticate_token(s, world.tokens["alice"])
        cookie = service.start_web_session(s, service.find_user(s, "alice@example.org"))
    assert actor.grants == (Grant(role="region_authority", region_code="SC"),)
    with world.db.unit_of_work(write=False) as s:
        web = service.actor_for_web_session(s, cookie)
    assert web is not None and web.grants == actor.grants and web.scopes is None
    assert roles.authorize(web, Action.view_region_statistics, region_code="SC")
    assert not roles.authorize(web, Action.view_region_statistics, region_code="CQ")


# --- every route is classified and guarded -----------------------------------------------------------------


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(db=world.db)) as test_client:
        yield test_client


def _flatten(routes: list[Any]) -> Iterator[tuple[set[str] | None, str]]:
    for route in routes:
        # FastAPI 0.16x keeps included routers as lazy branches; older versions copy APIRoutes into app.routes.
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            yield from ((ctx.methods, ctx.path) for ctx in contexts())
        elif isinstance(route, APIRoute | Route):
            yield route.methods, route.path


def app_routes() -> set[tuple[str, str]]:
    return {(method, path) for methods, path in _flatten(create_app().routes) for method in methods or ()
            if method != "HEAD"}


def test_every_route_is_classified() -> None:
    routes = app_routes()
    unclassified = sorted(routes - set(ROUTES))
    assert unclassified == [], "add these routes to labcommons.identity.roles.ROUTES"
    stale = sorted(set(ROUTES) - routes - OPTIONAL_ROUTES)
    assert stale == [], "these ROUTES entries name no route"


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_anonymous_requests_to_non_public_routes_are_refused(client: TestClient) -> None:
    csrf = csrf_of(client.get("/login").text)
    checked = 0
    for method, path in sorted(app_routes()):
        if ROUTES[(method, path)] == "public":
            continue
        data = {"csrf_token": csrf} if method == "POST" and not path.startswith("/api/") else None
        response = client.request(method, _url(path), data=data, follow_redirects=False)
        if path.startswith("/api/"):
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"] == "unauthenticated"
        else:
            assert response.status_code == 303, (method, path, response.status_code)
            assert response.headers["location"].startswith("/login"), (method, path)
        checked += 1
    assert checked >= 15


def test_routes_of_actions_users_lack_are_refused_to_plain_users(client: TestClient) -> None:
    sign_in(client, "alice")
    csrf = csrf_of(client.get("/account").text)
    refused = []
    for method, path in sorted(app_routes()):
        access = ROUTES[(method, path)]
        if access in ("public", "user") or USER in PERMISSIONS[Action(access)].roles:
            continue
        data = {"csrf_token": csrf} if method == "POST" else None
        response = client.request(method, _url(path), data=data, follow_redirects=False)
        assert response.status_code == 403, (method, path, response.status_code)
        refused.append(path)
    assert "/admin" in refused and "/admin/roles" in refused
    for page in ADMIN_PAGES:
        if ("GET", page) in app_routes():
            assert client.get(page).status_code == 403


def test_signed_in_users_reach_user_routes(client: TestClient, world: World) -> None:
    sign_in(client, "alice")
    assert client.get("/account").status_code == 200
    assert client.get("/api/v1/me").status_code == 200
    assert client.get("/api/v1/me", headers=world.headers("bob")).json()["email"] == "bob@example.org"
    assert client.cookies.get(SESSION_COOKIE)


def test_admins_reach_the_admin_pages(client: TestClient, world: World) -> None:
    _grant(world, None, "alice", "facility_manager", facility_id=world.facilities["CQ-LAB"])
    sign_in(client, "alice")
    index = client.get("/admin")
    assert index.status_code == 200
    assert 'href="/admin/roles"' in index.text and 'href="/admin/providers"' not in index.text
    assert 'href="/admin"' in client.get("/").text  # the nav shows Admin
    _grant(world, None, "bob", "platform_admin")
    sign_in(client, "bob")
    index = client.get("/admin")
    assert 'href="/admin/providers"' in index.text and 'href="/admin/clients"' in index.text
