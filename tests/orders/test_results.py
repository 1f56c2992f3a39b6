"""Result files: streamed upload and download with size and SHA-256 checks, limits, who sees what, withdrawal,
verification of the store, and the CLI — on SQLite and PostgreSQL, with the local store."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from labcommons.actor import Actor
from labcommons.catalog.models import Service, ServiceKind
from labcommons.cli import app as cli_app
from labcommons.config import get_settings
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import service as identity
from labcommons.orders import results
from labcommons.orders.models import OrderStatus, ResultFile
from labcommons.orders.results_api import content_length
from labcommons.orders.service import apply_transition, create_order, transition
from labcommons.orders.storage import LocalStore, ObjectMissing, check_key
from tests.api_client import client_for
from tests.factories import World, grant

S = OrderStatus
PATH_TO = {
    S.quoted: [S.quoted],
    S.accepted: [S.quoted, S.accepted],
    S.in_progress: [S.quoted, S.accepted, S.in_progress],
}
UNICODE_NAME = "检测报告.pdf"


# --- shared helpers (the page tests import these) ------------------------------------------------------------


@dataclass
class Stores:
    """The local store the app uses in a test, and the directory uploads are spooled in."""

    store: LocalStore
    spool: Path

    def objects(self) -> list[Path]:
        return [p for p in self.store.root.rglob("*") if p.is_file()] if self.store.root.exists() else []

    def spooled(self) -> list[Path]:
        return list(self.spool.iterdir())


def use_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Stores:
    """Point the settings at a local store and a spool directory under `tmp_path` (for this test)."""
    root, spool = tmp_path / "results", tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setenv("LABCOMMONS_RESULT_STORE", "local")
    monkeypatch.setenv("LABCOMMONS_RESULT_DIR", str(root))
    monkeypatch.setenv("LABCOMMONS_RESULT_TMP_DIR", str(spool))
    get_settings.cache_clear()
    return Stores(LocalStore(root), spool)


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stores]:
    yield use_local_store(tmp_path, monkeypatch)
    get_settings.cache_clear()


def limit_uploads(monkeypatch: pytest.MonkeyPatch, max_bytes: int) -> None:
    monkeypatch.setenv("LABCOMMONS_RESULT_MAX_BYTES", str(max_bytes))
    get_settings.cache_clear()


def make_order(world: World, status: OrderStatus = S.in_progress, customer: str = "bob") -> int:
    """An order of a quote-on-request testing service of CQ-LAB by `customer`, moved to `status`."""
    with world.db.unit_of_work() as s:
        number = (s.scalar(select(func.count()).select_from(Service)) or 0) + 1
        service = Service(code=f"CQ-T{number:03d}", facility_id=world.facilities["CQ-LAB"], kind=ServiceKind.testing,
                          name_zh="土壤重金属检测", name_en="Heavy metals in soil", category_code="ANA.MS",
                          list_price_fen=None, institution_id=world.institutions["CQ-LAB"], region_code="CQ")
        s.add(service)
        s.flush()
        order = create_order(s, world.actors[customer], service.id, title="土壤样品重金属", sample_count=2)
        transition(s, world.actors[customer], order.id, "submitted")
        s.refresh(order)
        for step in PATH_TO.get(status, []):
            if order.status != step:
                apply_transition(s, order, step, actor_id=None)
        return order.id


def move(world: World, order_id: int, *steps: OrderStatus) -> None:
    from labcommons.orders.models import ServiceOrder

    with world.db.unit_of_work() as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        for step in steps:
            apply_transition(s, order, step, actor_id=None)


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def upload(world: World, staff: Actor, order_id: int, data: bytes, name: str = "report.pdf",
           kind: str = "report") -> ResultFile:
    with world.db.unit_of_work() as s:
        return results.store_result(s, staff, order_id, filename=name, content_type="application/pdf", kind=kind,
                                    stream=io.BytesIO(data))


def rows(world: World) -> list[ResultFile]:
    with world.db.unit_of_work(write=False) as s:
        return list(s.scalars(select(ResultFile).order_by(ResultFile.id)))


# --- round trips ---------------------------------------------------------------------------------------------


def test_api_round_trip_of_a_large_file_with_a_unicode_name(world: World, stores: Stores) -> None:
    grant(world, "alice")
    order_id = make_order(world)
    data = payload(6 * 1024 * 1024 + 123)
    sha = hashlib.sha256(data).hexdigest()
    client = client_for(world.db)
    response = client.post(
        f"/api/v1/orders/{order_id}/results", params={"filename": UNICODE_NAME, "kind": "report"}, content=data,
        headers=world.headers("alice", **{"Content-Type": "application/pdf", "X-Content-SHA256": sha.upper()}),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["filename"], body["kind"], body["size_bytes"], body["sha256"], body["content_type"]) == (
        UNICODE_NAME, "report", len(data), sha, "application/pdf")
    assert response.headers["location"] == body["download_url"] == f"/api/v1/orders/{order_id}/results/{body['id']}"
    [row] = rows(world)
    assert stores.store.path(row.storage_key).read_bytes() == data
    assert UNICODE_NAME not in row.storage_key and stores.spooled() == []

    download = client.get(body["download_url"], headers=world.headers("alice"))
    assert download.status_code == 200
    assert download.content == data and hashlib.sha256(download.content).hexdigest() == sha
    assert download.headers["content-length"] == str(len(data))
    assert download.headers["x-content-sha256"] == sha and download.headers["etag"] == f'"{sha}"'
    disposition = download.headers["content-disposition"]
    assert disposition.startswith("attachment;") and f"filename*=UTF-8''{quote(UNICODE_NAME)}" in disposition
    assert f'filename="result-{body["id"]}.pdf"' in disposition
    assert download.headers["content-type"] == "application/pdf"
    assert download.headers["x-content-type-options"] == "nosniff"

    listed = client.get(f"/api/v1/orders/{order_id}/results", headers=world.headers("alice")).json()["items"]
    assert [item["id"] for item in listed] == [body["id"]]


def test_chunked_api_upload_without_length_and_a_type_guessed_from_the_name(world: World, stores: Stores) -> None:
    grant(world, "alice")
    order_id = make_order(world, S.accepted)
    parts = [payload(300_000, seed) for seed in range(5)]
    response = client_for(world.db).post(
        f"/api/v1/orders/{order_id}/results", params={"filename": "raw/plate 1.csv", "kind": "data"},
        content=iter(parts), headers=world.headers("alice"),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["filename"], body["kind"], body["content_type"]) == ("plate 1.csv", "data", "text/csv")
    assert body["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


def test_service_round_trip_strips_paths_and_keeps_unicode(world: World, stores: Stores) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world)
    data = payload(3 * 1024 * 1024 + 7, seed=3)
    with world.db.unit_of_work() as s:
        row = results.store_result(
            s, staff, order_id, filename="C:\\Users\\实验员\\" + UNICODE_NAME, content_type=None, kind="data",
            stream=io.BytesIO(data), declared_size=len(data), expected_sha256=hashlib.sha256(data).hexdigest(),
        )
        assert (row.filename, row.kind.value, row.size_bytes, row.uploaded_by_id) == (
            UNICODE_NAME, "data", len(data), staff.user_id)
        assert row.content_type == "application/pdf"
    with world.db.unit_of_work(write=False) as s:
        opened, chunks = results.open_result(s, staff, order_id, row.id)
        assert b"".join(chunks) == data and opened.sha256 == hashlib.sha256(data).hexdigest()


# --- limits and checks ---------------------------------------------------------------------------------------


def test_a_content_length_above_the_limit_is_refused_before_reading(world: World, stores: Stores,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    grant(world, "alice")
    order_id = make_order(world)
    limit_uploads(monkeypatch, 1024 * 1024)
    client = client_for(world.db)
    response = client.post(f"/api/v1/orders/{order_id}/results", params={"filename": "big.bin"},
                           content=payload(1024 * 1024 + 1), headers=world.headers("alice"))
    assert response.status_code == 413
    assert response.json()["error"] == "file_too_large" and response.json()["field"] == "file"
    assert response.json()["max_bytes"] == 1024 * 1024
    # Chunked, the limit is found while reading.
    chunked = client.post(f"/api/v1/orders/{order_id}/results", params={"filename": "big.bin"},
                          content=iter([payload(600_000, 1), payload(600_000, 2)]), headers=world.headers("alice"))
    assert chunked.status_code == 413 and chunked.json()["error"] == "file_too_large"
    # Exactly the limit is fine.
    exact = client.post(f"/api/v1/orders/{order_id}/results", params={"filename": "ok.bin"},
                        content=payload(1024 * 1024), headers=world.headers("alice"))
    assert exact.status_code == 201
    assert [r.filename for r in rows(world)] == ["ok.bin"]
    assert len(stores.objects()) == 1 and stores.spooled() == []


@pytest.mark.parametrize("raw", ["\u00b2", "12a", "-1", "9" * 5000])
def test_a_content_length_that_is_not_a_number_is_a_422(raw: str) -> None:
    # "²" (which a latin-1 header can carry) passes str.isdigit but not int(): it was a 500.
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": [
        (b"content-length", raw.encode("latin-1"))]})
    with pytest.raises(InvalidInput) as refused:
        content_length(request)
    assert refused.value.field == "Content-Length"


def test_reading_stops_at_the_first_chunk_past_the_limit(world: World, stores: Stores,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world)
    limit_uploads(monkeypatch, 100_000)
    pulled: list[int] = []

    def endless() -> Iterator[bytes]:
        while True:
            pulled.append(1)
            yield b"x" * 30_000

    with pytest.raises(results.FileTooLarge) as caught, world.db.unit_of_work() as s:
        results.store_result(s, staff, order_id, filename="endless.bin", content_type=None, kind="data",
                             stream=endless())
    assert caught.value.status_code == 413 and caught.value.field == "file"
    assert len(pulled) == 4  # 90 000 bytes kept, the fourth chunk crosses 100 000: nothing more is read
    assert rows(world) == [] and stores.objects() == [] and stores.spooled() == []


def test_checksum_mismatch_and_empty_files_are_refused(world: World, stores: Stores) -> None:
    grant(world, "alice")
    order_id = make_order(world)
    client = client_for(world.db)
    url = f"/api/v1/orders/{order_id}/results"
    data = payload(2048)
    wrong = client.post(url, params={"filename": "a.bin"}, content=data,
                        headers=world.headers("alice", **{"X-Content-SHA256": "0" * 64}))
    assert wrong.status_code == 422
    assert (wrong.json()["error"], wrong.json()["field"]) == ("checksum_mismatch", "expected_sha256")
    assert wrong.json()["sha256"] == hashlib.sha256(data).hexdigest()
    malformed = client.post(url, params={"filename": "a.bin"}, content=data,
                            headers=world.headers("alice", **{"X-Content-SHA256": "abc"}))
    assert (malformed.status_code, malformed.json()["error"]) == (422, "invalid_checksum")
    empty = client.post(url, params={"filename": "a.bin"}, content=b"", headers=world.headers("alice"))
    assert (empty.status_code, empty.json()["error"], empty.json()["field"]) == (422, "empty_file", "file")
    nameless = client.post(url, content=data, headers=world.headers("alice"))
    assert (nameless.status_code, nameless.json()["field"]) == (422, "filename")
    bad_kind = client.post(url, params={"filename": "a.bin", "kind": "photo"}, content=data,
                           headers=world.headers("alice"))
    assert (bad_kind.status_code, bad_kind.json()["field"]) == (422, "kind")
    assert rows(world) == [] and stores.objects() == [] and stores.spooled() == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("检测报告.pdf", "检测报告.pdf"),
        ("C:\\Users\\lab\\report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("  spaced name.txt  ", "spaced name.txt"),
        ("cafe\u0301.txt", "caf\u00e9.txt"),  # NFC
        ("x" * 251 + ".pdf", "x" * 251 + ".pdf"),
        ("", "missing_field"),
        ("dir/", "invalid_filename"),
        ("..", "invalid_filename"),
        ("bad\nname.txt", "invalid_filename"),
        ("invoice\u202efdp.exe", "invalid_filename"),
        ("x" * 256, "too_long"),
    ],
)
def test_file_names(raw: str, expected: str) -> None:
    if expected in ("missing_field", "invalid_filename", "too_long"):
        with pytest.raises(InvalidInput) as caught:
            results.clean_filename(raw)
        assert (caught.value.code, caught.value.field) == (expected, "filename")
    else:
        assert results.clean_filename(raw) == expected


@pytest.mark.parametrize(
    ("given", "name", "expected"),
    [
        (None, "a.csv", "text/csv"),
        ("application/x-www-form-urlencoded", "a.bin", "application/octet-stream"),
        ("Text/Plain; charset=utf-8", "a.txt", "text/plain; charset=utf-8"),
        ("image/tiff", "x", "image/tiff"),
        ("not a type", "a", "invalid_content_type"),
        ("text/html\r\nX-Evil: 1", "a", "invalid_content_type"),
    ],
)
def test_content_types(given: str | None, name: str, expected: str) -> None:
    if expected == "invalid_content_type":
        with pytest.raises(InvalidInput) as caught:
            results.upload_meta(filename=name, content_type=given, kind="data")
        assert caught.value.field == "content_type"
    else:
        assert results.upload_meta(filename=name, content_type=given, kind="data").content_type == expected


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "a\\b", "", "a//b", "orders/./x", "a/"])
def test_local_store_refuses_unsafe_keys(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        store.put(key, io.BytesIO(b"x"), 1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "store").exists()


def test_local_store_puts_whole_files_only(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("orders/1/abc", io.BytesIO(b"hello"), 5)
    assert b"".join(store.open("orders/1/abc")) == b"hello" and store.exists("orders/1/abc")
    with pytest.raises(ValueError):  # fewer bytes than announced: nothing replaces the old file
        store.put("orders/1/abc", io.BytesIO(b"bye"), 10)
    assert b"".join(store.open("orders/1/abc")) == b"hello"
    assert sorted(p.name for p in (tmp_path / "orders" / "1").iterdir()) == ["abc"]
    store.delete("orders/1/abc")
    store.delete("orders/1/abc")  # deleting twice is fine
    assert not store.exists("orders/1/abc")
    with pytest.raises(ObjectMissing):
        store.open("orders/1/abc")


# --- orphans ---------------------------------------------------------------------------------------------------


def test_a_failed_insert_deletes_the_stored_object(world: World, stores: Stores,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world)
    # A row already holds the key the upload will get, without bytes: the insert hits the unique storage key.
    with world.db.unit_of_work() as s:
        s.add(ResultFile(order_id=order_id, filename="x", size_bytes=1, sha256="0" * 64,
                         storage_key=f"orders/{order_id}/taken"))
    monkeypatch.setattr(results, "new_key", lambda oid: f"orders/{oid}/taken")
    with pytest.raises(IntegrityError), world.db.unit_of_work() as s:
        results.store_result(s, staff, order_id, filename="r.pdf", content_type=None, kind="report",
                             stream=io.BytesIO(b"report bytes"))
    assert not stores.store.exists(f"orders/{order_id}/taken") and stores.spooled() == []


def test_a_rolled_back_transaction_deletes_the_stored_object(world: World, stores: Stores) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world)
    with pytest.raises(RuntimeError), world.db.unit_of_work() as s:
        row = results.store_result(s, staff, order_id, filename="r.pdf", content_type=None, kind="report",
                                   stream=io.BytesIO(b"report bytes"))
        key = row.storage_key
        assert stores.store.exists(key)
        raise RuntimeError("something later in the request failed")
    assert not stores.store.exists(key) and rows(world) == []
    # A committed upload stays.
    kept = upload(world, staff, order_id, b"kept")
    assert stores.store.exists(kept.storage_key)


def test_an_order_that_left_work_meanwhile_gets_no_row_and_keeps_no_object(world: World, stores: Stores) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world)
    first = upload(world, staff, order_id, b"first")
    meta = results.upload_meta(filename="late.pdf", content_type=None, kind="report")
    stored = results.put_upload(stores.store, meta, io.BytesIO(b"late"), order_id=order_id)
    assert stores.store.exists(stored.key)
    move(world, order_id, S.results_delivered)
    with pytest.raises(Conflict) as caught, world.db.unit_of_work() as s:
        results.record_upload(s, staff, order_id, stored, stores.store)
    assert caught.value.code == "upload_not_allowed"
    assert not stores.store.exists(stored.key) and [r.id for r in rows(world)] == [first.id]


# --- who may do what -------------------------------------------------------------------------------------------


def test_customers_see_results_once_delivered_and_others_never(world: World, stores: Stores) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world, customer="bob")
    data = payload(10_000)
    row = upload(world, staff, order_id, data)
    client = client_for(world.db)
    listing, url = f"/api/v1/orders/{order_id}/results", f"/api/v1/orders/{order_id}/results/{row.id}"

    # Before delivery the customer sees nothing, as if there were nothing.
    assert client.get(listing, headers=world.headers("bob")).json() == {"items": []}
    assert client.get(url, headers=world.headers("bob")).status_code == 404
    assert client.get(url, headers=world.headers("alice")).content == data
    # Someone else, and staff of another facility, never.
    carol_sc = grant(world, "carol", facility="SC-UNI")
    for name in ("carol",):
        assert client.get(listing, headers=world.headers(name)).status_code == 404
        assert client.get(url, headers=world.headers(name)).status_code == 404
    with world.db.unit_of_work(write=False) as s, pytest.raises(NotFound):
        results.open_result(s, carol_sc, order_id, row.id)

    move(world, order_id, S.results_delivered)
    got = client.get(url, headers=world.headers("bob"))
    assert got.status_code == 200 and got.content == data
    assert [i["id"] for i in client.get(listing, headers=world.headers("bob")).json()["items"]] == [row.id]
    # A file of another order is not reachable through this one.
    other = make_order(world, customer="bob")
    other_row = upload(world, staff, other, b"other")
    assert client.get(f"/api/v1/orders/{order_id}/results/{other_row.id}",
                      headers=world.headers("alice")).status_code == 404


def test_only_the_facility_staff_upload_and_withdraw(world: World, stores: Stores) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world, customer="bob")
    row = upload(world, staff, order_id, b"data")
    client = client_for(world.db)
    up = f"/api/v1/orders/{order_id}/results"
    withdraw = f"/api/v1/orders/{order_id}/results/{row.id}/withdraw"
    for name in ("bob", "carol"):  # the customer and a stranger are staff nowhere: 403
        assert client.post(up, params={"filename": "x.pdf"}, content=b"x",
                           headers=world.headers(name)).status_code == 403
        assert client.post(withdraw, headers=world.headers(name)).status_code == 403
    grant(world, "carol", facility="SC-UNI")  # staff, but of another facility: the order does not exist for her
    assert client.post(up, params={"filename": "x.pdf"}, content=b"x",
                       headers=world.headers("carol")).status_code == 404
    assert client.post(withdraw, headers=world.headers("carol")).status_code == 404
    # A token without orders:write may not upload even for staff.
    with world.db.unit_of_work() as s:
        read_only = identity.create_api_token(s, identity.find_user(s, "alice@example.org"), name="ro",
                                              scopes=["orders:read"])
    refused = client.post(up, params={"filename": "x.pdf"}, content=b"x",
                          headers={"Authorization": f"Bearer {read_only}"})
    assert (refused.status_code, refused.json()["error"]) == (403, "insufficient_scope")
    assert len(rows(world)) == 1 and len(stores.objects()) == 1


@pytest.mark.parametrize("status", [S.quoted, S.results_delivered])
def test_uploads_only_while_the_work_is_under_way(world: World, stores: Stores, status: OrderStatus) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world, S.in_progress)
    upload(world, staff, order_id, b"first")
    if status == S.quoted:
        order_id = make_order(world, S.quoted)
    else:
        move(world, order_id, S.results_delivered)
    response = client_for(world.db).post(f"/api/v1/orders/{order_id}/results", params={"filename": "late.pdf"},
                                         content=b"late", headers=world.headers("alice"))
    assert response.status_code == 409
    assert response.json()["error"] == "upload_not_allowed" and response.json()["status"] == status.value
    assert len(rows(world)) == 1 and len(stores.objects()) == 1 and stores.spooled() == []


def test_withdrawing_hides_a_file_from_the_customer_and_keeps_the_record(world: World, stores: Stores) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world, customer="bob")
    kept = upload(world, staff, order_id, b"good report")
    wrong = upload(world, staff, order_id, b"wrong report", name="wrong.pdf")
    client = client_for(world.db)
    response = client.post(f"/api/v1/orders/{order_id}/results/{wrong.id}/withdraw", headers=world.headers("alice"))
    assert response.status_code == 200 and response.json()["withdrawn_at"] is not None
    again = client.post(f"/api/v1/orders/{order_id}/results/{wrong.id}/withdraw", headers=world.headers("alice"))
    assert (again.status_code, again.json()["error"]) == (409, "already_withdrawn")

    move(world, order_id, S.results_delivered)
    listing = f"/api/v1/orders/{order_id}/results"
    assert [i["id"] for i in client.get(listing, headers=world.headers("bob")).json()["items"]] == [kept.id]
    assert client.get(f"{listing}/{wrong.id}", headers=world.headers("bob")).status_code == 404
    staff_view = client.get(listing, headers=world.headers("alice")).json()["items"]
    assert {i["id"]: bool(i["withdrawn_at"]) for i in staff_view} == {kept.id: False, wrong.id: True}
    assert client.get(f"{listing}/{wrong.id}", headers=world.headers("alice")).content == b"wrong report"
    assert stores.store.exists(wrong.storage_key)

    with world.db.unit_of_work(write=False) as s:
        from labcommons.orders.models import ServiceOrder

        order = s.get(ServiceOrder, order_id)
        assert order is not None and results.has_deliverable(s, order)
    move(world, order_id, S.closed)
    closed = client.post(f"/api/v1/orders/{order_id}/results/{kept.id}/withdraw", headers=world.headers("alice"))
    assert (closed.status_code, closed.json()["error"]) == (409, "order_finished")
    with world.db.unit_of_work(write=False) as s, pytest.raises(Forbidden):
        results.withdraw_result(s, world.actors["bob"], order_id, kept.id)


def test_withdrawing_the_only_file_leaves_nothing_to_deliver(world: World, stores: Stores) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world)
    row = upload(world, staff, order_id, b"only")
    with world.db.unit_of_work() as s:
        results.withdraw_result(s, staff, order_id, row.id)
    with world.db.unit_of_work() as s, pytest.raises(Conflict) as caught:
        transition(s, staff, order_id, S.results_delivered)
    assert caught.value.code == "no_results"


# --- verification -----------------------------------------------------------------------------------------------


def test_verify_finds_corrupted_and_missing_objects(world: World, stores: Stores,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world)
    intact, corrupted, missing, truncated = (upload(world, staff, order_id, payload(5000, n), name=f"{n}.bin")
                                             for n in range(4))
    with world.db.unit_of_work(write=False) as s:
        assert results.verify_results(s, stores.store).ok
    path = stores.store.path(corrupted.storage_key)
    damaged = bytearray(path.read_bytes())
    damaged[100] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(damaged))
    stores.store.path(missing.storage_key).unlink()
    trunc = stores.store.path(truncated.storage_key)
    trunc.write_bytes(trunc.read_bytes()[:-1])

    seen: list[tuple[int, int]] = []
    with world.db.unit_of_work(write=False) as s:
        report = results.verify_results(s, stores.store, progress=lambda done, total: seen.append((done, total)))
    assert report.checked == 4 and not report.ok and seen[-1] == (4, 4)
    assert {(p.file_id, p.problem) for p in report.problems} == {
        (corrupted.id, "checksum_mismatch"), (missing.id, "missing"), (truncated.id, "size_mismatch")}
    assert intact.id not in {p.file_id for p in report.problems}

    # The missing object gives a clear 410 on download, not a server error.
    response = client_for(world.db).get(f"/api/v1/orders/{order_id}/results/{missing.id}",
                                        headers=world.headers("alice"))
    assert (response.status_code, response.json()["error"]) == (410, "result_bytes_missing")

    # The CLI exits 1 and names the problems.
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", world.db.engine.url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    outcome = CliRunner().invoke(cli_app, ["results", "verify"])
    assert outcome.exit_code == 1, outcome.output
    assert "checksum_mismatch" in outcome.output and "missing" in outcome.output
    assert "3 of 4 result files have problems" in outcome.output
    with world.db.unit_of_work() as s:
        for row in (corrupted, missing, truncated):
            s.delete(s.get(ResultFile, row.id))
    healthy = CliRunner().invoke(cli_app, ["results", "verify"])
    assert healthy.exit_code == 0 and "all 1 result files are intact" in healthy.output


def test_settings_choose_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from labcommons.config import Settings
    from labcommons.orders.storage import S3Store, get_store

    local = get_store(Settings(result_store="local", result_dir=str(tmp_path)))
    assert isinstance(local, LocalStore) and local.root == tmp_path
    s3 = get_store(Settings(result_store="s3", s3_bucket="results", s3_endpoint_url="http://127.0.0.1:9",
                            s3_prefix="/lab/"))
    assert isinstance(s3, S3Store) and s3.object_key("orders/1/x") == "lab/orders/1/x"
    with pytest.raises(ValueError):
        get_store(Settings(result_store="s3", s3_bucket=""))
    assert Settings().result_max_bytes == 2 * 1024**3


@pytest.mark.slow
def test_streamed_uploads_over_real_http(world: World, stores: Stores, db_url: str) -> None:
    """Through uvicorn: a chunked body of unknown length is streamed in, and one that grows past the limit is cut
    off with 413 and leaves nothing behind."""
    import httpx

    from tests.server import running_server

    grant(world, "alice")
    order_id = make_order(world)
    env = {"LABCOMMONS_RESULT_DIR": str(stores.store.root), "LABCOMMONS_RESULT_TMP_DIR": str(stores.spool),
           "LABCOMMONS_RESULT_MAX_BYTES": str(16 * 1024 * 1024)}
    digest = hashlib.sha256()

    def body(megabytes: int) -> Iterator[bytes]:
        for n in range(megabytes):
            chunk = payload(1024 * 1024, seed=n)
            digest.update(chunk)
            yield chunk

    with running_server(db_url, env=env) as base, httpx.Client(base_url=base, timeout=60) as http:
        url = f"/api/v1/orders/{order_id}/results"
        ok = http.post(url, params={"filename": "序列数据.fastq.gz", "kind": "data"}, content=body(12),
                       headers=world.headers("alice"))
        assert ok.status_code == 201, ok.text
        assert ok.json()["sha256"] == digest.hexdigest() and ok.json()["size_bytes"] == 12 * 1024 * 1024
        download = http.get(ok.json()["download_url"], headers=world.headers("alice"))
        assert hashlib.sha256(download.content).hexdigest() == digest.hexdigest()
        try:
            refused = http.post(url, params={"filename": "too-big.bin"}, content=body(17),
                                headers=world.headers("alice"))
            assert (refused.status_code, refused.json()["error"]) == (413, "file_too_large")
        except httpx.TransportError:
            pass  # the server may close the connection before the client has finished sending
    assert len(rows(world)) == 1 and len(stores.objects()) == 1 and stores.spooled() == []
