"""Result file endpoints under /api/v1: streamed upload, listing, download, withdrawal."""

from __future__ import annotations

import base64
import re
import unicodedata
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote

import anyio.from_thread
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from labcommons.actor import Actor
from labcommons.db import Database
from labcommons.errors import InvalidInput
from labcommons.http import Id, request_db, require_scope
from labcommons.identity import roles
from labcommons.identity.roles import Action
from labcommons.orders import results
from labcommons.orders.models import ResultFile, ResultKind
from labcommons.orders.storage import ResultStore, get_store

router = APIRouter(tags=["orders"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "Not the facility's staff, or the token lacks the scope (`insufficient_scope`)"},
    404: {"description": "Unknown order or file, or not yours to see (customers see results once delivered)"},
    409: {"description": "The order's status does not allow this now (`upload_not_allowed`, `order_finished`, "
                         "`already_withdrawn`)"},
    410: {"description": "The file's bytes are missing from the store (`result_bytes_missing`)"},
    413: {"description": "The file is larger than the limit (`file_too_large`)"},
    422: {"description": "Invalid input; `field` names it (`empty_file`, `checksum_mismatch`, `invalid_filename`)"},
}
Reader = Annotated[Actor, Depends(require_scope("orders:read"))]
Writer = Annotated[Actor, Depends(require_scope("orders:write"))]


class ResultRead(BaseModel):
    id: int
    order_id: int
    filename: str
    kind: ResultKind
    content_type: str
    size_bytes: int
    sha256: str
    uploaded_at: datetime
    uploaded_by_id: int | None
    withdrawn_at: datetime | None
    download_url: str

    @classmethod
    def of(cls, row: ResultFile) -> ResultRead:
        return cls(
            id=row.id, order_id=row.order_id, filename=row.filename, kind=row.kind, content_type=row.content_type,
            size_bytes=row.size_bytes, sha256=row.sha256, uploaded_at=row.uploaded_at,
            uploaded_by_id=row.uploaded_by_id, withdrawn_at=row.withdrawn_at,
            download_url=f"/api/v1/orders/{row.order_id}/results/{row.id}",
        )


class ResultList(BaseModel):
    items: list[ResultRead]


def request_store(request: Request) -> ResultStore:
    """The app's result store: one set on app.state (tests, embedding) or the one the settings name."""
    store: ResultStore | None = getattr(request.app.state, "result_store", None)
    return store or get_store()


def content_length(request: Request) -> int | None:
    """The request's Content-Length, None when it is sent chunked."""
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not re.fullmatch(r"[0-9]{1,20}", raw.strip()):
        raise InvalidInput("Content-Length must be a whole number.", field="Content-Length",
                           code="invalid_content_length")
    return int(raw)


def body_chunks(request: Request) -> Iterator[bytes]:
    """The request body as a blocking iterator for a worker thread: each chunk is awaited on the event loop as
    it is needed, so nothing is buffered whole and reading stops when the consumer stops."""
    stream: AsyncIterator[bytes] = request.stream()

    async def next_chunk() -> bytes | None:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    async def close() -> None:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()

    try:
        while (chunk := anyio.from_thread.run(next_chunk)) is not None:
            if chunk:
                yield chunk
    finally:
        anyio.from_thread.run(close)


def _ascii_name(row: ResultFile) -> str:
    # For clients that ignore filename*: the name folded to printable ASCII, else a neutral one with the suffix.
    folded = unicodedata.normalize("NFKD", row.filename).encode("ascii", "ignore").decode()
    folded = "".join(c if c.isprintable() and c not in '"\\;' else "_" for c in folded).strip()
    stem, dot, suffix = folded.rpartition(".")
    if not (stem if dot else folded).strip("._ "):
        return f"result-{row.id}" + (f".{suffix}" if dot and suffix else "")
    return folded


def file_response(row: ResultFile, chunks: Iterator[bytes]) -> StreamingResponse:
    """A download of a stored file: streamed, as an attachment under its (Unicode) name, with length and checksum."""
    digest = base64.b64encode(bytes.fromhex(row.sha256)).decode()
    headers = {
        "Content-Disposition": f"attachment; filename=\"{_ascii_name(row)}\"; "
                               f"filename*=UTF-8''{quote(row.filename, safe='')}",
        "Content-Length": str(row.size_bytes),
        "ETag": f'"{row.sha256}"',
        "X-Content-SHA256": row.sha256,
        "Digest": f"sha-256={digest}",
        "Repr-Digest": f"sha-256=:{digest}:",
        "Cache-Control": "private, no-cache",
        # Uploaded content is never rendered as our own page, whatever its type says.
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }
    return StreamingResponse(chunks, media_type=row.content_type, headers=headers)


@router.post(
    "/orders/{order_id}/results", status_code=201, response_model=ResultRead, responses=ERRORS,
    openapi_extra={"requestBody": {"required": True, "description": "The file's bytes, as they are",
                                   "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}}},
)
async def upload_result(
    order_id: Id,
    request: Request,
    actor: Writer,
    db: Annotated[Database, Depends(request_db)],
    filename: Annotated[str | None, Query(max_length=1000, description="The file's name, e.g. 检测报告.pdf")] = None,
    kind: Annotated[str | None, Query(max_length=20, description="report (default) or data")] = None,
    x_content_sha256: Annotated[str | None, Header(max_length=100, description="SHA-256 (hex) to check")] = None,
) -> JSONResponse:
    """Upload a result file as the facility's staff: the raw bytes as the body, `Content-Type` the file's type.

    The body is streamed to disk while its SHA-256 is computed; a Content-Length above the limit is refused before
    a byte is read (413), a body that grows past it as soon as it does.
    """
    roles.require_some(actor, Action.manage_facility_orders)
    declared = content_length(request)
    limit = results.max_bytes()
    if declared is not None and declared > limit:
        raise results.too_large(limit)
    row = await run_in_threadpool(
        results.receive_result, db, actor, order_id, filename=filename,
        content_type=request.headers.get("content-type"), kind=kind, stream=body_chunks(request),
        declared_size=declared, expected_sha256=x_content_sha256, store=request_store(request),
    )
    body = ResultRead.of(row)
    return JSONResponse(body.model_dump(mode="json"), status_code=201, headers={"Location": body.download_url})


@router.get("/orders/{order_id}/results", response_model=ResultList, responses=ERRORS)
def list_order_results(order_id: Id, actor: Reader, db: Annotated[Database, Depends(request_db)]) -> ResultList:
    """The order's result files, newest first: staff see withdrawn ones too, the customer the delivered ones."""
    with db.unit_of_work(write=False) as session:
        _order, rows = results.visible_results(session, actor, order_id)
        return ResultList(items=[ResultRead.of(r) for r in rows])


@router.get(
    "/orders/{order_id}/results/{file_id}", responses={
        200: {"description": "The file's bytes, in the media type they were uploaded with",
              "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}}, **ERRORS},
    response_class=StreamingResponse,
)
def download_result(order_id: Id, file_id: Id, request: Request, actor: Reader,
                    db: Annotated[Database, Depends(request_db)]) -> StreamingResponse:
    """Download a result file, streamed; `X-Content-SHA256` (and `Digest`, `ETag`) carry its checksum."""
    with db.unit_of_work(write=False) as session:
        row, chunks = results.open_result(session, actor, order_id, file_id, store=request_store(request))
    return file_response(row, chunks)


@router.post("/orders/{order_id}/results/{file_id}/withdraw", response_model=ResultRead, responses=ERRORS)
def withdraw_order_result(order_id: Id, file_id: Id, actor: Writer,
                          db: Annotated[Database, Depends(request_db)]) -> ResultRead:
    """Withdraw a result file as the facility's staff: the customer no longer sees it; the record stays."""
    with db.unit_of_work() as session:
        return ResultRead.of(results.withdraw_result(session, actor, order_id, file_id))
