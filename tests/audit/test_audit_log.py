"""The audit log: what is captured (with whom, where, before/after), what is never captured in clear, the hash
chain's verification against every kind of tampering, and who reads which region's entries."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import delete, select, text, update
from typer.testing import CliRunner

from labcommons.audit import chain
from labcommons.audit.capture import personal_digest
from labcommons.audit.models import AuditEntry, AuditHead
from labcommons.booking.models import Booking
from labcommons.catalog.models import Instrument
from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.api_client import client_for
from tests.factories import World, next_grid_day
from tests.web.conftest import csrf_of, sign_in

PURPOSE = "imaging the organoids of patient 7"


def entries(db: Database, **where: Any) -> list[AuditEntry]:
    with db.unit_of_work(write=False) as s:
        stmt = select(AuditEntry).order_by(AuditEntry.seq)
        for name, value in where.items():
            stmt = stmt.where(getattr(AuditEntry, name) == value)
        return list(s.scalars(stmt))


def verify(db: Database, **kw: Any) -> chain.VerifyReport:
    with db.unit_of_work(write=False) as s:
        return chain.verify(s, **kw)


def give(world: World, name: str, role: str, **scope: Any) -> None:
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, f"{name}@example.org"), role, **scope)


def book(world: World, user: str = "alice", key: str = "CONF", hours: int = 0, **extra: Any) -> dict[str, Any]:
    start = next_grid_day() + timedelta(hours=hours)
    payload = {"instrument_id": world.instruments[key], "starts_at": start.isoformat(),
               "ends_at": (start + timedelta(hours=1)).isoformat(), "purpose": PURPOSE, **extra}
    r = client_for(world.db).post("/api/v1/bookings", json=payload, headers=world.headers(user))
    assert r.status_code == 201, r.text
    return dict(r.json())


# --- capture --------------------------------------------------------------------------------------------------


def test_a_booking_and_its_cancellation_are_logged_with_actor_place_and_changes(world: World) -> None:
    booking = book(world)
    created = entries(world.db, action="booking.created")
    assert len(created) == 1
    entry = created[0]
    assert entry.entity_id == str(booking["id"])
    assert (entry.actor_id, entry.actor_kind) == (world.actors["alice"].user_id, "token")
    assert entry.client_ip == "testclient"
    assert (entry.region_code, entry.facility_id) == ("CQ", world.facilities["CQ-LAB"])
    after = json.loads(entry.changes)["after"]
    assert after["status"] == "confirmed" and after["instrument_id"] == world.instruments["CONF"]
    # The purpose is personal: only its keyed digest is kept, which still proves what it was.
    assert PURPOSE not in entry.changes
    assert after["purpose"] == personal_digest("booking", "purpose", PURPOSE)

    r = client_for(world.db).post(f"/api/v1/bookings/{booking['id']}/cancel", headers=world.headers("alice"))
    assert r.status_code == 200, r.text
    updated = entries(world.db, action="booking.updated", entity_id=str(booking["id"]))
    assert updated, "the cancellation is logged"
    changes = json.loads(updated[-1].changes)
    assert changes["before"]["status"] == "confirmed" and changes["after"]["status"] == "cancelled"
    assert "cancelled_at" in changes["after"]
    assert verify(world.db).ok


def test_a_rejected_request_leaves_no_entry(world: World) -> None:
    book(world)
    before = entries(world.db)
    start = next_grid_day()
    clash = {"instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
             "ends_at": (start + timedelta(hours=1)).isoformat()}
    r = client_for(world.db).post("/api/v1/bookings", json=clash, headers=world.headers("bob"))
    assert r.status_code == 409
    assert [e.seq for e in entries(world.db)] == [e.seq for e in before]


def test_a_rolled_back_savepoint_drops_only_its_own_entries(world: World) -> None:
    with world.db.unit_of_work() as s:
        instrument = s.get(Instrument, world.instruments["CONF"])
        assert instrument is not None
        instrument.model = "LSM 990"
        s.flush()
        savepoint = s.begin_nested()
        other = s.get(Instrument, world.instruments["SEQ"])
        assert other is not None
        other.model = "never"
        s.flush()
        savepoint.rollback()
    logged = entries(world.db, action="instrument.updated")
    assert [e.entity_id for e in logged] == [str(world.instruments["CONF"])]
    assert json.loads(logged[0].changes) == {"before": {"model": "LSM 980"}, "after": {"model": "LSM 990"}}


def test_sign_in_role_grants_and_secrets(world: World) -> None:
    client = client_for(world.db)
    sign_in(client, "alice")
    logins = entries(world.db, action="login")
    assert [e.actor_id for e in logins] == [world.actors["alice"].user_id]
    assert logins[0].actor_kind == "user"
    give(world, "bob", "region_authority", region_code="SC")
    grant = entries(world.db, action="role_grant.created")[-1]
    assert grant.region_code == "SC" and json.loads(grant.changes)["after"]["role"] == "region_authority"
    # Token and password hashes are never logged, not even as digests.
    for entry in entries(world.db):
        changes = json.loads(entry.changes)
        for side in changes.values():
            for name in ("token_hash", "password_hash"):
                assert side.get(name) in (None, "<secret>"), (entry.action, name)
    client.post("/logout", data={"csrf_token": csrf_of(client.get("/account").text)})
    assert [e.actor_id for e in entries(world.db, action="logout")] == [world.actors["alice"].user_id]


def test_commits_from_many_threads_form_one_gapless_chain(world: World) -> None:
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def rename(index: int) -> None:
        try:
            barrier.wait()
            for round_ in range(5):
                with world.db.unit_of_work() as s:
                    instrument = s.get(Instrument, world.instruments["CONF" if index % 2 else "SEQ"])
                    assert instrument is not None
                    instrument.location_en = f"room {index}-{round_}"
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=rename, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    report = verify(world.db)
    assert report.ok, report.problems
    assert len(entries(world.db, action="instrument.updated")) == 30


# --- tampering ------------------------------------------------------------------------------------------------


def _tamper(db: Database, statement: Any) -> None:
    with db.engine.begin() as conn:
        conn.execute(statement)


@pytest.fixture
def logged(world: World) -> World:
    for hours in range(3):
        book(world, hours=hours * 2)
    assert verify(world.db).ok
    return world


def test_verify_detects_a_changed_entry(logged: World) -> None:
    target = entries(logged.db, action="booking.created")[1]
    forged = target.changes.replace('"confirmed"', '"cancelled"')
    _tamper(logged.db, update(AuditEntry).where(AuditEntry.seq == target.seq).values(changes=forged))
    report = verify(logged.db)
    assert [(p.seq, p.kind) for p in report.problems] == [(target.seq, "changed")]


def test_verify_detects_a_recomputed_plain_hash(logged: World) -> None:
    # Someone who writes to the database but lacks the key cannot make a forged entry's hash fit.
    target = entries(logged.db)[2]
    other_key = chain.entry_hash(b"not the key", target.prev_hash, target.seq, target.at, target.actor_id,
                                 target.actor_kind, target.client_ip, "booking.deleted", target.entity_type,
                                 target.entity_id, target.region_code, target.institution_id, target.facility_id,
                                 target.changes)
    _tamper(logged.db, update(AuditEntry).where(AuditEntry.seq == target.seq)
            .values(action="booking.deleted", hash=other_key))
    kinds = {(p.seq, p.kind) for p in verify(logged.db).problems}
    assert (target.seq, "changed") in kinds and (target.seq + 1, "unlinked") in kinds


def test_verify_detects_a_deleted_entry_and_a_cut_tail(logged: World) -> None:
    rows = entries(logged.db)
    middle, last = rows[len(rows) // 2], rows[-1]
    _tamper(logged.db, delete(AuditEntry).where(AuditEntry.seq == middle.seq))
    kinds = {(p.seq, p.kind) for p in verify(logged.db).problems}
    assert (middle.seq, "missing") in kinds and (middle.seq + 1, "unlinked") in kinds
    _tamper(logged.db, update(AuditEntry).where(AuditEntry.seq == middle.seq + 1).values(seq=middle.seq))
    assert not verify(logged.db).ok

    # A cut tail is caught by the head; a cut tail with the head rewound only by a published anchor.
    _tamper(logged.db, text("DELETE FROM audit_entry"))
    assert [p.kind for p in verify(logged.db).problems] == ["head_mismatch"]
    _tamper(logged.db, update(AuditHead).values(seq=0, hash=chain.GENESIS))
    assert verify(logged.db).ok
    report = verify(logged.db, anchors=[(last.seq, last.hash)])
    assert [p.kind for p in report.problems] == ["anchor_missing"]


def test_a_published_anchor_must_match(logged: World) -> None:
    last = entries(logged.db)[-1]
    assert verify(logged.db, anchors=[(last.seq, last.hash)]).ok
    assert [p.kind for p in verify(logged.db, anchors=[(last.seq, "f" * 64)]).problems] == ["anchor_mismatch"]


def test_the_cli_verifies_prints_the_head_and_exits_1_on_tampering(logged: World, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    from labcommons.cli import app

    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", logged.db.engine.url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    runner = CliRunner()
    head = runner.invoke(app, ["audit", "head"])
    assert head.exit_code == 0, head.output
    seq, digest = head.output.strip().split(":")
    ok = runner.invoke(app, ["audit", "verify", "--anchor", f"{seq}:{digest}"])
    assert ok.exit_code == 0 and "audit chain ok" in ok.output, ok.output
    shown = runner.invoke(app, ["audit", "show", "--entity", "booking", "--limit", "2", "--json"])
    assert shown.exit_code == 0 and shown.output.count('"booking.created"') == 2, shown.output
    assert runner.invoke(app, ["audit", "show", "--region", "CQ"]).exit_code == 0
    _tamper(logged.db, update(AuditEntry).where(AuditEntry.seq == 1).values(actor_kind="cli"))
    broken = runner.invoke(app, ["audit", "verify"])
    assert broken.exit_code == 1 and "changed" in broken.output
    assert runner.invoke(app, ["audit", "verify", "--anchor", "x"]).exit_code == 2
    monkeypatch.delenv("LABCOMMONS_DATABASE_URL")
    get_settings.cache_clear()


def test_the_key_comes_from_the_settings(logged: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABCOMMONS_AUDIT_KEY", "another key")
    get_settings.cache_clear()
    try:
        assert {p.kind for p in verify(logged.db).problems} >= {"changed"}
    finally:
        monkeypatch.delenv("LABCOMMONS_AUDIT_KEY")
        get_settings.cache_clear()
    assert verify(logged.db).ok


# --- reading --------------------------------------------------------------------------------------------------


def test_region_authorities_read_their_region_only(world: World) -> None:
    give(world, "bob", "region_authority", region_code="CQ")
    give(world, "carol", "platform_admin")
    book(world)
    book(world, user="carol", key="SC-MS")
    client = client_for(world.db)
    mine = client.get("/api/v1/audit", headers=world.headers("bob"))
    assert mine.status_code == 200, mine.text
    listed = mine.json()["entries"]
    assert listed and {e["region_code"] for e in listed} == {"CQ"}
    assert {e["client_ip"] for e in listed} == {None}, "addresses are for platform administrators"
    assert client.get("/api/v1/audit", params={"region": "SC"}, headers=world.headers("bob")).status_code == 403
    assert client.get("/api/v1/audit", headers=world.headers("alice")).status_code == 403
    everything = client.get("/api/v1/audit", params={"limit": 200}, headers=world.headers("carol")).json()
    assert {"CQ", "SC"} <= {e["region_code"] for e in everything["entries"]}
    assert any(e["client_ip"] for e in everything["entries"])
    sc = client.get("/api/v1/audit", params={"region": "SC", "action": "booking."}, headers=world.headers("carol"))
    assert [e["action"] for e in sc.json()["entries"]] == ["booking.created"]


def test_filters_and_paging(world: World) -> None:
    give(world, "bob", "region_authority", region_code="CQ")
    first = book(world)
    for hours in (2, 4):
        book(world, hours=hours)
    client = client_for(world.db)
    seen: list[int] = []
    params: dict[str, Any] = {"action": "booking.created", "limit": 2}
    for _ in range(5):
        page = client.get("/api/v1/audit", params=params, headers=world.headers("bob")).json()
        seen += [e["seq"] for e in page["entries"]]
        if page["next_before_seq"] is None:
            break
        params["before_seq"] = page["next_before_seq"]
    assert len(seen) == 3 and seen == sorted(seen, reverse=True)
    one = client.get("/api/v1/audit", params={"entity_type": "booking", "entity_id": str(first["id"])},
                     headers=world.headers("bob")).json()["entries"]
    assert [e["action"] for e in one] == ["booking.created"]
    naive = client.get("/api/v1/audit", params={"since": "2026-01-01T00:00:00"}, headers=world.headers("bob"))
    assert naive.status_code == 422 and naive.json()["field"] == "since"
    assert client.get("/api/v1/audit", params={"limit": 0}, headers=world.headers("bob")).json()["field"] == "limit"


def test_verification_over_the_api_is_for_platform_administrators(world: World) -> None:
    give(world, "bob", "region_authority", region_code="CQ")
    give(world, "carol", "platform_admin")
    book(world)
    client = client_for(world.db)
    assert client.get("/api/v1/audit/verify", headers=world.headers("bob")).status_code == 403
    report = client.get("/api/v1/audit/verify", headers=world.headers("carol")).json()
    assert report["ok"] and report["entries"] == len(entries(world.db)) and report["problems"] == []
    bad = client.get("/api/v1/audit/verify", params={"anchor": "1:zz"}, headers=world.headers("carol"))
    assert bad.status_code == 422 and bad.json()["field"] == "anchor"


def test_a_token_without_the_audit_scope_is_refused(world: World) -> None:
    give(world, "carol", "platform_admin")
    with world.db.unit_of_work() as s:
        token = identity.create_api_token(s, identity.find_user(s, "carol@example.org"), name="stats only",
                                          scopes=["stats:read"])
    r = client_for(world.db).get("/api/v1/audit", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"


@pytest.mark.parametrize("lang", ["en", "zh-CN"])
def test_the_page_lists_the_region_in_both_languages(world: World, lang: str) -> None:
    give(world, "bob", "region_authority", region_code="CQ")
    booking = book(world)
    client = client_for(world.db)
    sign_in(client, "bob")
    page = client.get("/audit", params={"lang": lang, "entity_type": "booking"})
    assert page.status_code == 200
    assert 'data-seq="' in page.text and "booking.created" in page.text and str(booking["id"]) in page.text
    assert ("审计日志" if lang == "zh-CN" else "Audit log") in page.text
    assert 'href="/audit"' in page.text, "the nav links the log"
    assert PURPOSE not in page.text
    for bad_params in ({"since": "yesterday"}, {"actor_id": "9" * 30}, {"before_seq": "9" * 30}):
        assert client.get("/audit", params=bad_params).status_code == 422, bad_params
    assert client.get("/audit", params={"region": "SC"}).status_code == 403
    sign_in(client, "alice")
    assert client.get("/audit").status_code == 403
    assert 'href="/audit"' not in client.get("/").text


def test_guarded_update_statements_are_logged_row_by_row(world: World) -> None:
    # Balance updates and compare-and-set steps run as UPDATE statements, not through the flush.
    with world.db.unit_of_work() as s:
        s.execute(update(Instrument).where(Instrument.facility_id == world.facilities["CQ-LAB"],
                                           Instrument.code.in_(["CQ-CONF", "CQ-SEQ"])).values(model="X1"))
        s.execute(update(Instrument).where(Instrument.code == "CQ-CONF", Instrument.model == "nothing")
                  .values(model="never"))
    logged = entries(world.db, action="instrument.updated")
    assert sorted(e.entity_id for e in logged) == sorted(str(world.instruments[k]) for k in ("CONF", "SEQ"))
    assert {json.dumps(json.loads(e.changes)["after"]) for e in logged} == {'{"model": "X1"}'}
    assert {e.facility_id for e in logged} == {world.facilities["CQ-LAB"]}
    with world.db.unit_of_work() as s:
        s.execute(delete(Booking).where(Booking.id == -1))  # touches nothing, logs nothing
    assert verify(world.db).ok


def test_a_session_closed_without_commit_carries_nothing_over(world: World) -> None:
    session = world.db.session(write=True)
    instrument = session.get(Instrument, world.instruments["CONF"])
    assert instrument is not None
    instrument.model = "abandoned"
    session.flush()
    session.close()
    instrument = session.get(Instrument, world.instruments["SEQ"])
    assert instrument is not None
    instrument.model = "kept"
    session.commit()
    session.close()
    assert [e.entity_id for e in entries(world.db, action="instrument.updated")] == [str(world.instruments["SEQ"])]
