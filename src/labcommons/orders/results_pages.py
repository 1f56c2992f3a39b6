"""Result file pages: upload from the order page and download."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from labcommons.db import Database
from labcommons.errors import DomainError, Forbidden, InvalidInput, NotFound
from labcommons.http import Id, request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles
from labcommons.identity.roles import Action
from labcommons.orders import results
from labcommons.orders.results_api import content_length, file_response, request_store
from labcommons.pages import check_csrf, env, redirect, require_actor

router = APIRouter(include_in_schema=False)

# Room for the form's other fields and the multipart framing around the file.
FORM_OVERHEAD_BYTES = 64 * 1024


def file_size(size: int) -> str:
    """A byte count for people: 980 B, 12.4 KB, 3.1 MB, 2.0 GB (binary multiples, as file managers show them)."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


# The order page's results fragment shows sizes and the upload limit.
env.globals["file_size"] = file_size
env.globals["result_max_bytes"] = results.max_bytes
env.globals["results_may_upload"] = results.may_upload
env.globals["results_may_withdraw"] = results.may_withdraw
env.globals["results_delivered"] = results.customer_may_download


def _back(order_id: int) -> str:
    return f"/orders/{order_id}#results"


def upload_error_message(exc: DomainError) -> str:
    """A refused upload or withdrawal in the user's language."""
    details = exc.details
    return {
        "file_too_large": _("The file is larger than the limit of %(size)s.")
        % {"size": file_size(int(details.get("max_bytes", results.max_bytes())))},
        "empty_file": _("The file is empty."),
        "missing_field": _("Choose a file to upload."),
        "invalid_filename": _("The file name cannot be used; rename the file and try again."),
        "too_long": _("The file name is too long (255 characters at most)."),
        "invalid_choice": _("Choose whether the file is a report or data."),
        "invalid_content_type": _("The file's type is not valid."),
        "checksum_mismatch": _("The file's SHA-256 checksum differs from the one you gave; it was not stored."),
        "invalid_checksum": _("A SHA-256 checksum is 64 hexadecimal digits."),
        "size_mismatch": _("The file did not arrive whole; try again."),
        "upload_not_allowed": _("Results can be uploaded only while the order is accepted or in progress."),
        "already_withdrawn": _("This file was already withdrawn."),
        "order_finished": _("The order is finished; its results can no longer be withdrawn."),
        "length_required": _("Your browser did not say how large the upload is; try another browser."),
    }.get(exc.code, _("Some of what was sent is not valid."))


class LengthRequired(DomainError):
    status_code = 411
    code = "length_required"


@router.post("/orders/{order_id}/results")
async def upload_result_page(order_id: Id, request: Request,
                             db: Annotated[Database, Depends(request_db)]) -> Response:
    """Upload a result file from the order page (multipart form: file, kind); back to the order with a flash."""
    actor = require_actor(request)
    roles.require_some(actor, Action.manage_facility_orders)
    try:
        # Refused before the form is parsed: Starlette would otherwise spool the whole body to disk first.
        declared = content_length(request)
        if declared is None:
            raise LengthRequired("Send the upload with a Content-Length.", field="file")
        limit = results.max_bytes()
        if declared > limit + FORM_OVERHEAD_BYTES:
            raise results.too_large(limit)
    except DomainError as exc:
        return redirect(_back(order_id), flash=upload_error_message(exc), kind="error")
    async with request.form(max_files=1, max_fields=10) as form:
        token = form.get("csrf_token")
        check_csrf(request, token if isinstance(token, str) else None)
        upload = form.get("file")
        kind = form.get("kind")
        checksum = form.get("sha256")
        try:
            if not isinstance(upload, UploadFile) or not upload.filename:
                raise InvalidInput("Choose a file.", field="filename", code="missing_field")
            row = await run_in_threadpool(
                results.receive_result, db, actor, order_id, filename=upload.filename,
                content_type=upload.content_type, kind=kind if isinstance(kind, str) else None, stream=upload.file,
                expected_sha256=checksum if isinstance(checksum, str) else None, store=request_store(request),
            )
        except (Forbidden, NotFound):
            raise
        except DomainError as exc:
            return redirect(_back(order_id), flash=upload_error_message(exc), kind="error")
    return redirect(_back(order_id), flash=_("Uploaded %(name)s (%(size)s).")
                    % {"name": row.filename, "size": file_size(row.size_bytes)})


@router.get("/orders/{order_id}/results/{file_id}")
def download_result_page(order_id: Id, file_id: Id, request: Request,
                         db: Annotated[Database, Depends(request_db)]) -> StreamingResponse:
    """Download a result file as the signed-in customer (once delivered) or the facility's staff."""
    actor = require_actor(request)
    with db.unit_of_work(write=False) as session:
        row, chunks = results.open_result(session, actor, order_id, file_id, store=request_store(request))
    return file_response(row, chunks)


@router.post("/orders/{order_id}/results/{file_id}/withdraw")
def withdraw_result_page(order_id: Id, file_id: Id, request: Request, db: Annotated[Database, Depends(request_db)],
                         csrf_token: Annotated[str, Form()] = "") -> Response:
    """Withdraw a result file as the facility's staff; back to the order with a flash."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            row = results.withdraw_result(session, actor, order_id, file_id)
    except (Forbidden, NotFound):
        raise
    except DomainError as exc:
        return redirect(_back(order_id), flash=upload_error_message(exc), kind="error")
    return redirect(_back(order_id), flash=_("Withdrew %(name)s; the customer no longer sees it.")
                    % {"name": row.filename})
