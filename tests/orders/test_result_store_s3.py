"""The S3 result store against a real S3 API over HTTP on loopback: moto's server mode (no MinIO binary can be
installed here). Round trips through the service and the API, multipart uploads, orphan clean-up and
verification — on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from labcommons.config import get_settings
from labcommons.orders import results
from labcommons.orders.models import OrderStatus
from labcommons.orders.storage import ObjectMissing, S3Store, get_store
from tests.api_client import client_for
from tests.factories import World, grant
from tests.orders.test_results import UNICODE_NAME, make_order, move, payload

MiB = 1024 * 1024
KEYS = {"access_key": "labcommons-test", "secret_key": "labcommons-test-secret", "region": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for this module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "spool"
    path.mkdir()
    monkeypatch.setenv("LABCOMMONS_RESULT_TMP_DIR", str(path))
    get_settings.cache_clear()
    yield path
    get_settings.cache_clear()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"results-{uuid.uuid4().hex[:12]}"
    S3Store(name, s3_endpoint, **KEYS).client().create_bucket(Bucket=name)
    return name


def small_parts_store(endpoint: str, bucket: str) -> S3Store:
    # S3 needs parts of at least 5 MiB; a 12 MiB file then travels in three.
    return S3Store(bucket, endpoint, prefix="lab/results", multipart_threshold=5 * MiB,
                   multipart_chunksize=5 * MiB, **KEYS)


def objects(store: S3Store) -> dict[str, dict[str, Any]]:
    listing = store.client().list_objects_v2(Bucket=store.bucket)
    return {o["Key"]: o for o in listing.get("Contents", [])}


def test_round_trip_through_s3_with_multipart(world: World, s3_endpoint: str, bucket: str, spool: Path) -> None:
    store = small_parts_store(s3_endpoint, bucket)
    staff = grant(world, "alice")
    order_id = make_order(world, customer="bob")
    small, large = payload(40_000, 1), payload(12 * MiB + 5, 2)
    with world.db.unit_of_work() as s:
        report = results.store_result(s, staff, order_id, filename=UNICODE_NAME, content_type="application/pdf",
                                      kind="report", stream=io.BytesIO(small),
                                      expected_sha256=hashlib.sha256(small).hexdigest(), store=store)
        data = results.store_result(s, staff, order_id, filename="matrix.h5", content_type=None, kind="data",
                                    stream=iter([large[:7 * MiB], large[7 * MiB:]]), store=store)
    assert list(spool.iterdir()) == []
    stored = objects(store)
    assert set(stored) == {f"lab/results/{report.storage_key}", f"lab/results/{data.storage_key}"}
    assert stored[f"lab/results/{data.storage_key}"]["Size"] == len(large)
    # A multipart object's ETag ends in the number of parts; a single PUT's does not.
    assert stored[f"lab/results/{data.storage_key}"]["ETag"].strip('"').endswith("-3")
    assert "-" not in stored[f"lab/results/{report.storage_key}"]["ETag"]

    move(world, order_id, OrderStatus.results_delivered)
    with world.db.unit_of_work(write=False) as s:
        for row, expected in ((report, small), (data, large)):
            opened, chunks = results.open_result(s, world.actors["bob"], order_id, row.id, store=store)
            got = b"".join(chunks)
            assert got == expected and hashlib.sha256(got).hexdigest() == opened.sha256 == row.sha256
        assert results.verify_results(s, store).ok

    # Damage one object and lose the other: verification reports both.
    store.client().put_object(Bucket=bucket, Key=f"lab/results/{report.storage_key}", Body=small[:-1] + b"!")
    store.delete(data.storage_key)
    assert not store.exists(data.storage_key) and store.exists(report.storage_key)
    with world.db.unit_of_work(write=False) as s:
        problems = {(p.file_id, p.problem) for p in results.verify_results(s, store).problems}
    assert problems == {(report.id, "checksum_mismatch"), (data.id, "missing")}
    with pytest.raises(ObjectMissing):
        store.open(data.storage_key)


def test_s3_objects_of_rolled_back_or_refused_uploads_are_deleted(world: World, s3_endpoint: str, bucket: str,
                                                                  spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABCOMMONS_RESULT_MAX_BYTES", str(MiB))
    get_settings.cache_clear()
    store = small_parts_store(s3_endpoint, bucket)
    staff = grant(world, "alice")
    order_id = make_order(world)
    with pytest.raises(RuntimeError), world.db.unit_of_work() as s:
        row = results.store_result(s, staff, order_id, filename="r.pdf", content_type=None, kind="report",
                                   stream=io.BytesIO(b"report"), store=store)
        assert store.exists(row.storage_key)
        raise RuntimeError("the request failed after the upload")
    assert objects(store) == {}
    with pytest.raises(results.FileTooLarge), world.db.unit_of_work() as s:
        results.store_result(s, staff, order_id, filename="big.bin", content_type=None, kind="data",
                             stream=io.BytesIO(payload(2 * MiB)), declared_size=None, store=store)
    with pytest.raises(results.InvalidInput), world.db.unit_of_work() as s:
        results.store_result(s, staff, order_id, filename="r.pdf", content_type=None, kind="report",
                             stream=io.BytesIO(b"report"), expected_sha256="f" * 64, store=store)
    assert objects(store) == {} and list(spool.iterdir()) == []


def test_api_round_trip_with_the_store_from_the_settings(world: World, s3_endpoint: str, bucket: str, spool: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"RESULT_STORE": "s3", "S3_BUCKET": bucket, "S3_ENDPOINT_URL": s3_endpoint,
                        "S3_REGION": KEYS["region"], "S3_ACCESS_KEY": KEYS["access_key"],
                        "S3_SECRET_KEY": KEYS["secret_key"], "S3_PREFIX": "api"}.items():
        monkeypatch.setenv(f"LABCOMMONS_{name}", value)
    get_settings.cache_clear()
    store = get_store()
    assert isinstance(store, S3Store) and store.bucket == bucket
    grant(world, "alice")
    order_id = make_order(world, customer="bob")
    data = payload(9 * MiB, 4)  # above the default 8 MiB threshold: two parts
    client = client_for(world.db)
    response = client.post(f"/api/v1/orders/{order_id}/results", params={"filename": "图像数据.tif", "kind": "data"},
                           content=data, headers=world.headers("alice", **{"Content-Type": "image/tiff"}))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["sha256"] == hashlib.sha256(data).hexdigest() and body["size_bytes"] == len(data)
    [(key, info)] = objects(store).items()
    assert key.startswith(f"api/orders/{order_id}/") and info["ETag"].strip('"').endswith("-2")

    assert client.get(body["download_url"], headers=world.headers("bob")).status_code == 404
    move(world, order_id, OrderStatus.results_delivered)
    download = client.get(body["download_url"], headers=world.headers("bob"))
    assert download.status_code == 200 and download.content == data
    assert download.headers["x-content-sha256"] == body["sha256"]
    assert download.headers["content-type"] == "image/tiff"
    assert list(spool.iterdir()) == []
