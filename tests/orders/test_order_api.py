"""The order API: shapes, listing and paging, the staff queue, transitions, quotes, messages, ratings, error bodies
(401/403/404/409/422 naming the field) and idempotent retries; on both databases."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from labcommons.identity import service as identity
from labcommons.orders.models import OrderMessage, OrderStatus, ServiceOrder
from labcommons.pagination import encode_cursor
from tests.api_client import client_for
from tests.factories import World, grant
from tests.orders.order_support import add_service, far_day, new_order, walk_to

S = OrderStatus


@pytest.fixture
def api(world: World) -> TestClient:
    grant(world, "alice")  # alice works the orders of CQ-LAB
    return client_for(world.db)


def token(world: World, name: str, *scopes: str) -> dict[str, str]:
    with world.db.unit_of_work() as s:
        secret = identity.create_api_token(s, identity.find_user(s, f"{name}@example.org"), name="t",
                                           scopes=list(scopes))
    return {"Authorization": f"Bearer {secret}"}


def place(api: TestClient, world: World, service_id: int, submit: bool = True, **fields: Any) -> dict[str, Any]:
    body = {"service_id": service_id, "title": "RNA of 2 blocks", "sample_count": 2, "submit": submit, **fields}
    answer = api.post("/api/v1/orders", json=body, headers=world.headers("bob"))
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def count(world: World, model: Any) -> int:
    with world.db.unit_of_work(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_placing_an_order_and_reading_it(api: TestClient, world: World) -> None:
    service_id = add_service(world)
    draft = place(api, world, service_id, submit=False, description="Spatial", wanted_by=far_day().isoformat(),
                  contact_phone="023-1234")
    assert draft["status"] == "draft" and draft["number"].startswith("SO-") and draft["version"] == 1
    assert draft["parties"] == ["customer"] and draft["allowed_transitions"] == ["submitted", "cancelled"]
    assert draft["counts"] == {"samples": 0, "results": 0, "messages": 0}
    assert draft["current_quote"] is None and draft["rating"] is None
    assert draft["service_name_en"] == "Single-cell sequencing" and draft["facility_code"] == "CQ-LAB-F"
    assert draft["wanted_by"] == far_day().isoformat() and draft["contact_phone"] == "023-1234"
    submitted = api.post(f"/api/v1/orders/{draft['id']}/transitions", json={"to": "submitted"},
                         headers=world.headers("bob"))
    assert submitted.status_code == 200 and submitted.json()["status"] == "submitted"
    assert submitted.json()["version"] == 2
    staff_view = api.get(f"/api/v1/orders/{draft['id']}", headers=world.headers("alice")).json()
    assert staff_view["parties"] == ["staff"] and staff_view["allowed_transitions"] == ["quoted", "rejected",
                                                                                       "on_hold"]
    events = api.get(f"/api/v1/orders/{draft['id']}/events", headers=world.headers("alice")).json()["items"]
    assert [(e["from_status"], e["to_status"], e["actor_name"]) for e in events] == [
        (None, "draft", "Bob"), ("draft", "submitted", "Bob")]


def test_a_fixed_price_order_comes_back_quoted(api: TestClient, world: World) -> None:
    order = place(api, world, add_service(world, price_fen=12_050), sample_count=3)
    assert order["status"] == "quoted"
    quote = order["current_quote"]
    assert quote["total_fen"] == 36_150 and quote["status"] == "offered" and quote["expired"] is False
    assert quote["lines"] == [{"position": 1, "description": "单细胞测序 / Single-cell sequencing", "quantity": 3,
                               "unit_price_fen": 12_050, "amount_fen": 36_150}]
    accepted = api.post(f"/api/v1/orders/{order['id']}/quotes/{quote['id']}/accept", headers=world.headers("bob"))
    assert accepted.status_code == 200 and accepted.json()["status"] == "accepted"
    assert accepted.json()["current_quote"]["status"] == "accepted"


def test_lists_of_mine_with_status_filter_and_cursor(api: TestClient, world: World) -> None:
    service_id = add_service(world)
    ids = [place(api, world, service_id, submit=i % 2 == 0)["id"] for i in range(5)]
    new_order(world, service_id, customer="carol")  # not bob's
    first = api.get("/api/v1/orders?limit=2", headers=world.headers("bob")).json()
    assert [o["id"] for o in first["items"]] == ids[::-1][:2] and first["next_cursor"]
    rest = api.get(f"/api/v1/orders?limit=10&cursor={first['next_cursor']}", headers=world.headers("bob")).json()
    assert [o["id"] for o in rest["items"]] == ids[::-1][2:] and rest["next_cursor"] is None
    drafts = api.get("/api/v1/orders?status=draft", headers=world.headers("bob")).json()["items"]
    assert [o["id"] for o in drafts] == [ids[3], ids[1]]
    bad = api.get("/api/v1/orders?cursor=nonsense", headers=world.headers("bob"))
    assert bad.status_code == 422 and bad.json()["field"] == "cursor"
    wrong = api.get("/api/v1/orders?status=lost", headers=world.headers("bob"))
    assert wrong.status_code == 422 and wrong.json()["field"] == "status"


def test_the_staff_queue(api: TestClient, world: World) -> None:
    mine, theirs = add_service(world), add_service(world, facility="SC-UNI")
    submitted = place(api, world, mine)["id"]
    place(api, world, mine, submit=False)  # drafts stay private
    place(api, world, theirs)
    queue = api.get("/api/v1/manage/orders", headers=world.headers("alice"))
    assert queue.status_code == 200
    assert [o["id"] for o in queue.json()["items"]] == [submitted]
    assert queue.json()["counts"]["submitted"] == 1 and "draft" not in queue.json()["counts"]
    assert sum(queue.json()["counts"].values()) == 1
    assert api.get("/api/v1/manage/orders?status=quoted", headers=world.headers("alice")).json()["items"] == []
    by_code = api.get("/api/v1/manage/orders?facility=CQ-LAB-F", headers=world.headers("alice")).json()
    assert [o["id"] for o in by_code["items"]] == [submitted]
    elsewhere = api.get("/api/v1/manage/orders?facility=SC-UNI-F", headers=world.headers("alice")).json()
    assert elsewhere["items"] == [] and sum(elsewhere["counts"].values()) == 0
    unknown = api.get("/api/v1/manage/orders?facility=NOPE", headers=world.headers("alice"))
    assert unknown.status_code == 404 and unknown.json()["field"] == "facility"
    refused = api.get("/api/v1/manage/orders", headers=world.headers("bob"))
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert api.get("/api/v1/manage/orders").status_code == 401


def test_error_bodies(api: TestClient, world: World) -> None:
    order = place(api, world, add_service(world))
    url = f"/api/v1/orders/{order['id']}/transitions"
    illegal = api.post(url, json={"to": "closed"}, headers=world.headers("bob"))
    assert illegal.status_code == 409
    assert illegal.json() | {"message": ""} == {"error": "illegal_transition", "message": "", "field": "to",
                                                 "status": "submitted", "allowed": ["cancelled"]}
    via = api.post(url, json={"to": "quoted"}, headers=world.headers("alice"))
    assert via.status_code == 409 and via.json()["via"] == "quote"
    theirs = api.post(url, json={"to": "rejected", "comment": "x"}, headers=world.headers("bob"))
    assert theirs.status_code == 403 and theirs.json()["error"] == "not_your_step"
    assert theirs.json()["allowed"] == ["cancelled"]
    uncommented = api.post(url, json={"to": "rejected"}, headers=world.headers("alice"))
    assert uncommented.status_code == 422
    assert (uncommented.json()["error"], uncommented.json()["field"]) == ("comment_required", "comment")
    stale = api.post(url, json={"to": "cancelled", "expected_version": 1}, headers=world.headers("bob"))
    assert stale.status_code == 409 and stale.json()["error"] == "order_changed"
    assert stale.json()["field"] == "expected_version"
    stranger = api.post(url, json={"to": "cancelled"}, headers=world.headers("carol"))
    assert stranger.status_code == 404 and stranger.json()["field"] == "order_id"
    assert api.get(f"/api/v1/orders/{order['id']}", headers=world.headers("carol")).status_code == 404
    assert api.get("/api/v1/orders/999999", headers=world.headers("bob")).status_code == 404
    missing = api.post(url, json={"comment": "x"}, headers=world.headers("bob"))
    assert missing.status_code == 422 and missing.json()["field"] == "to"
    extra = api.post(url, json={"to": "cancelled", "reason": "x"}, headers=world.headers("bob"))
    assert extra.status_code == 422 and extra.json()["field"] == "reason"
    unknown = api.post(url, json={"to": "lost"}, headers=world.headers("bob"))
    assert unknown.status_code == 422 and unknown.json()["error"] == "unknown_status"
    assert api.post(url, json={"to": "cancelled"}).status_code == 401
    read_only = api.post(url, json={"to": "cancelled"}, headers=token(world, "bob", "orders:read"))
    assert read_only.status_code == 403 and read_only.json()["error"] == "insufficient_scope"
    assert api.get(f"/api/v1/orders/{order['id']}", headers=token(world, "bob", "bookings:read")).status_code == 403
    # None of the refusals changed anything.
    again = api.get(f"/api/v1/orders/{order['id']}", headers=world.headers("bob")).json()
    assert (again["status"], again["version"]) == ("submitted", 2)


# Ids beyond the 32-bit id range failed in PostgreSQL ("integer out of range") as 500s; cursors carrying other
# types than the ones we write did too.
HUGE = 2**31


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("GET", "/api/v1/orders/{huge}", "order_id"),
        ("GET", "/api/v1/orders/{huge}/events", "order_id"),
        ("GET", "/api/v1/orders/{huge}/samples", "order_id"),
        ("GET", "/api/v1/orders/{order}/results/{huge}", "file_id"),
        ("GET", "/api/v1/samples/{huge}/label.svg", "sample_id"),
        ("POST", "/api/v1/orders/{order}/quotes/{huge}/accept", "quote_id"),
        ("POST", "/api/v1/orders/{huge}/messages", "order_id"),
        ("POST", "/api/v1/samples/{huge}/events", "sample_id"),
    ],
)
def test_ids_beyond_the_id_range_are_a_422_naming_them(api: TestClient, world: World, method: str, path: str,
                                                       field: str) -> None:
    order = place(api, world, add_service(world))
    url = path.format(huge=HUGE, order=order["id"])
    answer = api.request(method, url, headers=world.headers("bob"), json={"body": "x", "event": "received"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field


@pytest.mark.parametrize("values", [[HUGE], [2**70], ["7"], [1.5], [True], [[1]], [None]])
def test_cursors_with_other_values_than_ours_are_a_422(api: TestClient, world: World, values: list[Any]) -> None:
    grant(world, "alice")
    cursor = encode_cursor(values)
    for who, url in [("bob", "/api/v1/orders"), ("alice", "/api/v1/manage/orders")]:
        answer = api.get(url, params={"cursor": cursor}, headers=world.headers(who))
        assert answer.status_code == 422 and answer.json()["field"] == "cursor", answer.text


def test_odd_bodies_are_refused_naming_the_field(api: TestClient, world: World) -> None:
    service_id = add_service(world)
    huge = api.post("/api/v1/orders", json={"service_id": HUGE, "title": "x"}, headers=world.headers("bob"))
    assert huge.status_code == 422 and huge.json()["field"] == "service_id"
    nul = api.post("/api/v1/orders", json={"service_id": service_id, "title": "RNA\x00"},
                   headers=world.headers("bob"))
    if world.db.is_sqlite:  # SQLite stores the character; PostgreSQL cannot, which was a 500
        assert nul.status_code == 201
    else:
        assert nul.status_code == 422 and nul.json()["error"] == "invalid_text"
        assert count(world, ServiceOrder) == 0
    order = place(api, world, service_id)
    # A message's text is a field called "body": its name was dropped from the error with the body's location.
    for wrong in (1, None, ["hello"], {"text": "hello"}):
        typed = api.post(f"/api/v1/orders/{order['id']}/messages", json={"body": wrong}, headers=world.headers("bob"))
        assert typed.status_code == 422 and typed.json()["field"] == "body", typed.text


def test_quotes_through_the_api(api: TestClient, world: World) -> None:
    order = place(api, world, add_service(world))
    url = f"/api/v1/orders/{order['id']}/quotes"
    body = {"lines": [{"description": "Library prep", "quantity": 2, "unit_price_fen": 60_050},
                      {"description": "Sequencing", "quantity": 1, "unit_price_fen": 99_999}],
            "valid_until": far_day().isoformat(), "note": "incl. QC"}
    bad_quantity = api.post(url, json={**body, "lines": [{"description": "x", "quantity": 0, "unit_price_fen": 1}]},
                            headers=world.headers("alice"))
    assert bad_quantity.status_code == 422 and bad_quantity.json()["field"] == "lines.0.quantity"
    float_price = api.post(url, json={**body, "lines": [{"description": "x", "quantity": 1, "unit_price_fen": 1.5}]},
                           headers=world.headers("alice"))
    assert float_price.status_code == 422 and float_price.json()["field"] == "lines.0.unit_price_fen"
    past = api.post(url, json={**body, "valid_until": "2020-01-01"}, headers=world.headers("alice"))
    assert past.status_code == 422 and (past.json()["error"], past.json()["field"]) == ("date_in_past",
                                                                                         "valid_until")
    no_lines = api.post(url, json={**body, "lines": []}, headers=world.headers("alice"))
    assert no_lines.status_code == 422 and no_lines.json()["field"] == "lines"
    by_user = api.post(url, json=body, headers=world.headers("bob"))
    assert by_user.status_code == 403
    created = api.post(url, json=body, headers=world.headers("alice"))
    assert created.status_code == 201, created.text
    quote = created.json()
    assert (quote["version"], quote["status"], quote["total_fen"]) == (1, "offered", 2 * 60_050 + 99_999)
    assert [x["amount_fen"] for x in quote["lines"]] == [120_100, 99_999]
    second = api.post(url, json={**body, "lines": body["lines"][:1]}, headers=world.headers("alice")).json()
    listed = api.get(url, headers=world.headers("bob")).json()["items"]
    assert [(q["version"], q["status"]) for q in listed] == [(2, "offered"), (1, "superseded")]
    old = api.post(f"{url}/{quote['id']}/accept", headers=world.headers("bob"))
    assert old.status_code == 409 and old.json()["error"] == "quote_not_offered"
    staff_accept = api.post(f"{url}/{second['id']}/accept", headers=world.headers("alice"))
    assert staff_accept.status_code == 403 and staff_accept.json()["error"] == "not_your_step"
    declined = api.post(f"{url}/{second['id']}/decline", json={"reason": "too dear"}, headers=world.headers("bob"))
    assert declined.status_code == 200 and declined.json()["status"] == "submitted"
    assert declined.json()["current_quote"] is None
    third = api.post(url, json=body, headers=world.headers("alice")).json()
    accepted = api.post(f"{url}/{third['id']}/accept", headers=world.headers("bob"))
    assert accepted.status_code == 200 and accepted.json()["status"] == "accepted"
    assert accepted.json()["current_quote"]["id"] == third["id"]
    assert api.post(f"{url}/{third['id']}/decline", headers=world.headers("bob")).status_code == 409


def test_messages_and_rating_through_the_api(api: TestClient, world: World) -> None:
    order = place(api, world, add_service(world))
    url = f"/api/v1/orders/{order['id']}"
    posted = api.post(f"{url}/messages", json={"body": "When do the results come?"}, headers=world.headers("bob"))
    assert posted.status_code == 201
    assert posted.json() | {"id": 0, "created_at": ""} == {
        "id": 0, "author_id": world.actors["bob"].user_id, "author_name": "Bob", "from_staff": False,
        "body": "When do the results come?", "created_at": ""}
    api.post(f"{url}/messages", json={"body": "Next week."}, headers=world.headers("alice"))
    thread = api.get(f"{url}/messages", headers=world.headers("bob")).json()["items"]
    assert [(m["author_name"], m["from_staff"]) for m in thread] == [("Bob", False), ("Alice", True)]
    for bad in ({"body": ""}, {}, {"body": "x" * 5001}):
        refused = api.post(f"{url}/messages", json=bad, headers=world.headers("bob"))
        assert refused.status_code == 422 and refused.json()["field"] == "body", bad
    assert api.get(f"{url}/messages", headers=world.headers("carol")).status_code == 404
    assert api.get(url, headers=world.headers("bob")).json()["counts"]["messages"] == 2
    early = api.post(f"{url}/rating", json={"score": 5}, headers=world.headers("bob"))
    assert early.status_code == 409 and early.json()["error"] == "order_not_closed"
    walk_to_closed(world, order["id"])
    out_of_range = api.post(f"{url}/rating", json={"score": 6}, headers=world.headers("bob"))
    assert out_of_range.status_code == 422 and out_of_range.json()["field"] == "score"
    rated = api.post(f"{url}/rating", json={"score": 5, "comment": "great"}, headers=world.headers("bob"))
    assert rated.status_code == 201 and rated.json()["score"] == 5
    again = api.post(f"{url}/rating", json={"score": 1}, headers=world.headers("bob"))
    assert again.status_code == 409 and again.json()["error"] == "already_rated"
    assert api.get(url, headers=world.headers("bob")).json()["rating"]["comment"] == "great"


def walk_to_closed(world: World, order_id: int) -> None:
    from labcommons.orders import service

    with world.db.unit_of_work() as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        for step in (S.quoted, S.accepted, S.in_progress, S.results_delivered, S.closed):
            service.apply_transition(s, order, step, actor_id=None)


def test_idempotent_retries(api: TestClient, world: World) -> None:
    service_id = add_service(world)
    headers = world.headers("bob", **{"Idempotency-Key": "order-1"})
    body = {"service_id": service_id, "title": "RNA", "submit": True}
    first = api.post("/api/v1/orders", json=body, headers=headers)
    retry = api.post("/api/v1/orders", json=body, headers=headers)
    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json() and retry.headers.get("Idempotent-Replayed") == "true"
    assert count(world, ServiceOrder) == 1
    reused = api.post("/api/v1/orders", json={**body, "title": "other"}, headers=headers)
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"
    url = f"/api/v1/orders/{first.json()['id']}/messages"
    key = world.headers("bob", **{"Idempotency-Key": "msg-1"})
    one = api.post(url, json={"body": "hello"}, headers=key)
    two = api.post(url, json={"body": "hello"}, headers=key)
    assert one.json() == two.json() and count(world, OrderMessage) == 1
    move = world.headers("bob", **{"Idempotency-Key": "cancel-1"})
    cancelled = api.post(f"/api/v1/orders/{first.json()['id']}/transitions", json={"to": "cancelled"}, headers=move)
    replay = api.post(f"/api/v1/orders/{first.json()['id']}/transitions", json={"to": "cancelled"}, headers=move)
    assert cancelled.status_code == replay.status_code == 200 and replay.json() == cancelled.json()
    # A refused request records nothing: the same key may be used again once the problem is fixed.
    refused = world.headers("alice", **{"Idempotency-Key": "quote-1"})
    order_id = place(api, world, service_id)["id"]
    quote_url = f"/api/v1/orders/{order_id}/quotes"
    lines = [{"description": "x", "quantity": 1, "unit_price_fen": 100}]
    assert api.post(quote_url, json={"lines": lines, "valid_until": "2020-01-01"}, headers=refused).status_code == 422
    ok = api.post(quote_url, json={"lines": lines, "valid_until": far_day().isoformat()}, headers=refused)
    assert ok.status_code == 201


def test_the_counts_show_samples_and_delivered_results(api: TestClient, world: World) -> None:
    from tests.orders.order_support import add_received_sample, add_result_file

    order_id = new_order(world, add_service(world))
    walk_to(world, order_id, S.in_progress)
    add_received_sample(world, order_id)
    add_result_file(world, order_id)
    user_view = api.get(f"/api/v1/orders/{order_id}", headers=world.headers("bob")).json()
    staff_view = api.get(f"/api/v1/orders/{order_id}", headers=world.headers("alice")).json()
    assert user_view["counts"] == {"samples": 1, "results": 0, "messages": 0}  # not delivered yet
    assert staff_view["counts"] == {"samples": 1, "results": 1, "messages": 0}


def test_the_command_line_lists_and_shows_orders(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from labcommons.cli import app
    from labcommons.config import get_settings
    from labcommons.orders import quotes

    service_id = add_service(world)
    alice = grant(world, "alice")
    submitted = new_order(world, service_id, submit=True, title="Spatial")
    new_order(world, add_service(world, facility="SC-UNI"), customer="carol", title="MassSpec")
    with world.db.unit_of_work() as s:
        quotes.issue_quote(s, alice, submitted, [("Library prep", 2, 60_050)], far_day())
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", world.db.engine.url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        listed = runner.invoke(app, ["orders", "list", "--facility", "CQ-LAB-F", "--status", "quoted"])
        assert listed.exit_code == 0, listed.output
        # Rich wraps wide tables in a narrow terminal: one-word titles stay whole.
        assert "Spatial" in listed.output and "MassSpec" not in listed.output
        assert "1 order(s)" in listed.output
        with world.db.unit_of_work(write=False) as s:
            number = s.get(ServiceOrder, submitted).number  # type: ignore[union-attr]
        shown = runner.invoke(app, ["orders", "show", str(number).lower()])
        assert shown.exit_code == 0, shown.output
        assert "Spatial" in shown.output and "¥1,201.00" in shown.output and "offered" in shown.output
        assert runner.invoke(app, ["orders", "show", "SO-1999-000001"]).exit_code == 2
        assert runner.invoke(app, ["orders", "list", "--status", "lost"]).exit_code == 2
    finally:
        get_settings.cache_clear()
