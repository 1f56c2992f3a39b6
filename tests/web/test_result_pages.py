"""Result files on the pages: the multipart upload form, downloads, withdrawal and the order page's fragment."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from labcommons import i18n
from labcommons.config import get_settings
from labcommons.db import utcnow
from labcommons.orders import results_pages  # noqa: F401  (registers the template helpers)
from labcommons.orders.models import OrderStatus, ResultKind
from labcommons.pages import env
from tests.factories import World, grant
from tests.orders.test_results import (
    UNICODE_NAME,
    Stores,
    limit_uploads,
    make_order,
    move,
    payload,
    rows,
    upload,
    use_local_store,
)
from tests.web.conftest import flash_of, page_csrf, sign_in

MiB = 1024 * 1024


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stores]:
    yield use_local_store(tmp_path, monkeypatch)
    get_settings.cache_clear()


def test_staff_upload_through_the_form_and_download(client: TestClient, world: World, stores: Stores) -> None:
    grant(world, "alice")
    order_id = make_order(world)
    sign_in(client, "alice")
    data = payload(2 * MiB + 11)
    response = client.post(
        f"/orders/{order_id}/results", data={"csrf_token": page_csrf(client), "kind": "data"},
        files={"file": (UNICODE_NAME, data, "application/pdf")}, follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/orders/{order_id}#results"
    assert flash_of(response).startswith("info|") and UNICODE_NAME in flash_of(response)
    [row] = rows(world)
    assert (row.filename, row.kind, row.size_bytes, row.sha256) == (
        UNICODE_NAME, ResultKind.data, len(data), hashlib.sha256(data).hexdigest())
    assert stores.spooled() == []

    download = client.get(f"/orders/{order_id}/results/{row.id}")
    assert download.status_code == 200 and download.content == data
    assert f"filename*=UTF-8''{quote(UNICODE_NAME)}" in download.headers["content-disposition"]


def test_the_form_refuses_too_large_or_missing_files_with_a_message(client: TestClient, world: World,
                                                                    stores: Stores,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    grant(world, "alice")
    order_id = make_order(world)
    sign_in(client, "alice")
    token = page_csrf(client)
    limit_uploads(monkeypatch, MiB)
    url = f"/orders/{order_id}/results"
    # Far too large: refused on its Content-Length, before the form is read.
    big = client.post(url, data={"csrf_token": token}, files={"file": ("big.bin", payload(MiB + 200_000))},
                      follow_redirects=False)
    # Just over: the form's length passes, the file's bytes do not.
    over = client.post(url, data={"csrf_token": token}, files={"file": ("over.bin", payload(MiB + 1))},
                       follow_redirects=False)
    for response in (big, over):
        assert response.status_code == 303 and response.headers["location"] == f"{url[:-len('/results')]}#results"
        assert flash_of(response).startswith("error|") and "1.0 MB" in flash_of(response)
    empty = client.post(url, data={"csrf_token": token}, files={"file": ("", b"")}, follow_redirects=False)
    assert empty.status_code == 303 and flash_of(empty).startswith("error|")
    assert rows(world) == [] and stores.objects() == [] and stores.spooled() == []
    bad_csrf = client.post(url, data={"csrf_token": "forged"}, files={"file": ("a.txt", b"a")},
                           follow_redirects=False)
    assert bad_csrf.status_code == 403 and rows(world) == []


def test_withdraw_from_the_page(client: TestClient, world: World, stores: Stores) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world)
    row = upload(world, staff, order_id, b"wrong numbers", name="wrong.pdf")
    sign_in(client, "alice")
    token = page_csrf(client)
    url = f"/orders/{order_id}/results/{row.id}/withdraw"
    response = client.post(url, data={"csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303 and "wrong.pdf" in flash_of(response)
    assert rows(world)[0].withdrawn_at is not None
    again = client.post(url, data={"csrf_token": token}, follow_redirects=False)
    assert again.status_code == 303 and flash_of(again).startswith("error|")


def test_customers_and_strangers_on_the_pages(client: TestClient, world: World, stores: Stores) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world, customer="bob")
    row = upload(world, staff, order_id, b"the report")
    download = f"/orders/{order_id}/results/{row.id}"
    assert client.get(download, follow_redirects=False).status_code == 303  # to sign in
    sign_in(client, "bob")
    token = page_csrf(client)
    assert client.get(download).status_code == 404
    assert client.post(f"/orders/{order_id}/results", data={"csrf_token": token},
                       files={"file": ("x.pdf", b"x")}).status_code == 403
    assert client.post(f"{download}/withdraw", data={"csrf_token": token}).status_code == 403
    move(world, order_id, OrderStatus.results_delivered)
    assert client.get(download).content == b"the report"
    sign_in(client, "carol")
    assert client.get(download).status_code == 404
    assert len(rows(world)) == 1 and rows(world)[0].withdrawn_at is None


# --- the fragment ----------------------------------------------------------------------------------------------


def render_fragment(status: OrderStatus, files: list[Any], *, is_staff: bool, locale: str = "en") -> str:
    i18n.set_locale(locale)
    try:
        return env.get_template("orders/_results.html").render(
            order=SimpleNamespace(id=7, status=status), results=files, is_staff=is_staff, is_customer=not is_staff,
            csrf_token="tok", localtime=lambda moment, fmt="%Y-%m-%d %H:%M": moment.strftime(fmt),
            result_uploaders={3: "Alice Wang"},
        )
    finally:
        i18n.set_locale(i18n.DEFAULT_LOCALE)


def fake_file(file_id: int, *, withdrawn: bool = False, name: str = "报告.pdf") -> SimpleNamespace:
    return SimpleNamespace(id=file_id, filename=name, kind=ResultKind.report, size_bytes=3 * MiB, sha256="ab" * 32,
                           uploaded_at=utcnow(), uploaded_by_id=3, withdrawn_at=utcnow() if withdrawn else None)


def test_the_fragment_for_staff() -> None:
    html = render_fragment(OrderStatus.in_progress, [fake_file(1), fake_file(2, withdrawn=True, name="old.pdf")],
                           is_staff=True)
    assert 'id="results"' in html
    assert 'action="/orders/7/results" enctype="multipart/form-data"' in html
    assert 'name="csrf_token" value="tok"' in html and 'type="file" name="file"' in html
    assert 'href="/orders/7/results/1"' in html and 'href="/orders/7/results/2"' in html
    assert 'action="/orders/7/results/1/withdraw"' in html and "/results/2/withdraw" not in html
    assert "Withdrawn" in html and "3.0 MB" in html and "ab" * 32 in html and "Alice Wang" in html
    delivered = render_fragment(OrderStatus.results_delivered, [fake_file(1)], is_staff=True)
    assert 'enctype="multipart/form-data"' not in delivered and "/results/1/withdraw" in delivered
    closed = render_fragment(OrderStatus.closed, [fake_file(1)], is_staff=True)
    assert "withdraw" not in closed


def test_the_fragment_for_the_customer() -> None:
    # The page passes what orders.results.results_for gives the customer: nothing before delivery, then the live
    # files (the withdrawn old.pdf is left out).
    before = render_fragment(OrderStatus.in_progress, [], is_staff=False)
    assert "/orders/7/results/1" not in before and "appear here once the facility delivers" in before
    assert "<form" not in before
    files = [fake_file(1)]
    after = render_fragment(OrderStatus.results_delivered, files, is_staff=False)
    assert 'href="/orders/7/results/1"' in after and "old.pdf" not in after and "<form" not in after
    chinese = render_fragment(OrderStatus.results_delivered, files, is_staff=False, locale="zh_CN")
    assert "报告" in chinese and "Report" not in chinese and "Results" not in chinese


def test_the_order_page_includes_the_fragment(client: TestClient, world: World, stores: Stores) -> None:
    staff = grant(world, "alice")
    order_id = make_order(world)
    upload(world, staff, order_id, b"report", name="final.pdf")
    sign_in(client, "alice")
    page = client.get(f"/orders/{order_id}")
    assert page.status_code == 200
    assert 'id="results"' in page.text and "final.pdf" in page.text
    assert f'action="/orders/{order_id}/results" enctype="multipart/form-data"' in page.text
