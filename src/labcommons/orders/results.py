"""Result files of orders: uploads streamed to disk while their size and SHA-256 are checked, downloads for those
who may see them, withdrawal, and verification of what the store holds against the database.

An upload is three steps: `check_upload` (staff, order status), `put_upload` (spool, hash, check, put into the
store; no database) and `record_upload` (the row). `store_result` runs them in one session; `receive_result`
runs them so that no database transaction is open while the bytes arrive (SQLite would otherwise hold its write
lock for the whole transfer). An object whose row does not commit is deleted again, whatever the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mimetypes
import os
import re
import secrets
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from sqlalchemy import event, exists, select, update
from sqlalchemy.orm import Session, SessionTransaction

from labcommons.actor import Actor
from labcommons.config import get_settings
from labcommons.db import Database, utcnow
from labcommons.errors import Conflict, DomainError, InvalidInput, NotFound
from labcommons.identity.models import User
from labcommons.orders.models import OrderStatus, ResultFile, ResultKind, ServiceOrder
from labcommons.orders.service import TERMINAL, Party, get_order, parties_of
from labcommons.orders.storage import CHUNK_BYTES, ObjectMissing, ResultStore, get_store

log = logging.getLogger("labcommons.results")

S = OrderStatus
# Staff upload while the work is under way; after delivery a correction means reopening (→ in_progress) first.
UPLOAD_STATUSES = frozenset({S.accepted, S.samples_received, S.in_progress})
# The customer sees results only once they are delivered.
DELIVERED_STATUSES = frozenset({S.results_delivered, S.closed})
MAX_FILENAME = 255
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,60}/[a-z0-9][a-z0-9!#$&^_.+-]{0,60}")
_PARAMETERS = re.compile(r"(;\s*[A-Za-z0-9!#$&^_.+-]+=(\"[ -~]*\"|[A-Za-z0-9!#$&^_.+-]+))*\s*")
# Text direction overrides make "evil‮fdp.exe" display as "evilexe.pdf".
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Body types a client sends by default when it did not say what the file is (curl --data-binary, forms).
_UNSPECIFIED_TYPES = frozenset({"", "application/x-www-form-urlencoded", "multipart/form-data"})

UploadStream = bytes | BinaryIO | Iterable[bytes]


class FileTooLarge(DomainError):
    """The upload is bigger than `result_max_bytes`."""

    status_code = 413
    code = "file_too_large"


class UploadNotAllowed(Conflict):
    """The order's status takes no uploads now."""

    code = "upload_not_allowed"


class OrderFinished(Conflict):
    """The order is closed, cancelled or rejected; its results stay as they are."""

    code = "order_finished"


class AlreadyWithdrawn(Conflict):
    code = "already_withdrawn"


# --- listing ---------------------------------------------------------------------------------------------------


def has_deliverable(session: Session, order: ServiceOrder) -> bool:
    """Whether the order has at least one result file that is not withdrawn."""
    return bool(session.scalar(select(exists().where(ResultFile.order_id == order.id,
                                                     ResultFile.withdrawn_at.is_(None)))))


def list_results(session: Session, order: ServiceOrder, *, include_withdrawn: bool = False) -> list[ResultFile]:
    """The order's result files, newest first; withdrawn ones only when asked for (staff see them)."""
    stmt = select(ResultFile).where(ResultFile.order_id == order.id)
    if not include_withdrawn:
        stmt = stmt.where(ResultFile.withdrawn_at.is_(None))
    return list(session.scalars(stmt.order_by(ResultFile.uploaded_at.desc(), ResultFile.id.desc())))


def customer_may_download(order: ServiceOrder) -> bool:
    """Whether the order's results are delivered, so its customer may see and fetch them."""
    return order.status in DELIVERED_STATUSES


def may_upload(order: ServiceOrder) -> bool:
    """Whether the order's status takes new result files (staff permission is checked separately)."""
    return order.status in UPLOAD_STATUSES


def may_withdraw(order: ServiceOrder) -> bool:
    """Whether files of the order may still be withdrawn (not once it is finished)."""
    return order.status not in TERMINAL


def results_for(session: Session, order: ServiceOrder, *, staff: bool) -> list[ResultFile]:
    """The files of an order one side may see: staff all (withdrawn too), the customer the live ones once
    delivered (none before)."""
    if staff:
        return list_results(session, order, include_withdrawn=True)
    if not customer_may_download(order):
        return []
    return list_results(session, order)


def visible_results(session: Session, actor: Actor, order_id: int) -> tuple[ServiceOrder, list[ResultFile]]:
    """The files of an order the actor may see (see `results_for`); NotFound for anyone else."""
    order = get_order(session, actor, order_id)
    return order, results_for(session, order, staff=Party.staff in parties_of(actor, order))


def result_uploaders(session: Session, results: Iterable[ResultFile]) -> dict[int, str]:
    """Names of the users who uploaded the files, by user id, for pages."""
    ids = {r.uploaded_by_id for r in results if r.uploaded_by_id is not None}
    if not ids:
        return {}
    return {uid: name for uid, name in session.execute(select(User.id, User.name).where(User.id.in_(ids)))}


# --- checking what is sent ---------------------------------------------------------------------------------------


def clean_filename(raw: str | None) -> str:
    """The name a file is shown and downloaded under: without any path, NFC-normalised, at most 255 characters.

    Unicode names (检测报告.pdf) are kept; control characters and text-direction overrides are refused.
    """
    if raw is None or not raw.strip():
        raise InvalidInput("Give the file's name.", field="filename", code="missing_field")
    name = re.split(r"[\\/]", unicodedata.normalize("NFC", raw))[-1].strip()
    if name in ("", ".", ".."):
        raise InvalidInput("The file name is not usable.", field="filename", code="invalid_filename")
    if any(unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS for c in name):
        raise InvalidInput("The file name contains control characters.", field="filename", code="invalid_filename")
    if len(name) > MAX_FILENAME:
        raise InvalidInput(f"The file name is too long ({MAX_FILENAME} characters at most).", field="filename",
                           code="too_long")
    return name


def _kind(value: ResultKind | str | None) -> ResultKind:
    try:
        return ResultKind(value or ResultKind.report)
    except ValueError:
        raise InvalidInput("The kind of a result file is report or data.", field="kind", code="invalid_choice",
                           allowed=[k.value for k in ResultKind]) from None


def _content_type(value: str | None, filename: str) -> str:
    raw = (value or "").strip()
    media, _sep, params = raw.partition(";")
    media = media.strip().lower()
    if media in _UNSPECIFIED_TYPES:
        return mimetypes.guess_type(filename, strict=False)[0] or "application/octet-stream"
    if len(raw) > 120 or not _MEDIA_TYPE.fullmatch(media) or not _PARAMETERS.fullmatch(_sep + params):
        raise InvalidInput("The content type is not a valid media type.", field="content_type",
                           code="invalid_content_type")
    return media + (f"; {params.strip()}" if params.strip() else "")


def _expected_sha256(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip().lower()
    if not _SHA256.fullmatch(value):
        raise InvalidInput("A SHA-256 checksum is 64 hexadecimal digits.", field="expected_sha256",
                           code="invalid_checksum")
    return value


def max_bytes() -> int:
    """The largest result file accepted (`result_max_bytes`)."""
    return get_settings().result_max_bytes


def too_large(limit: int) -> FileTooLarge:
    """The 413 of a file above `limit` bytes."""
    return FileTooLarge(f"The file is larger than the limit of {limit} bytes.", field="file", max_bytes=limit)


@dataclass(frozen=True)
class UploadMeta:
    """What is said about an upload before its bytes are read, checked."""

    filename: str
    content_type: str
    kind: ResultKind
    expected_sha256: str | None = None
    declared_size: int | None = None


def upload_meta(
    *,
    filename: str | None,
    content_type: str | None,
    kind: ResultKind | str | None,
    declared_size: int | None = None,
    expected_sha256: str | None = None,
    limit: int | None = None,
) -> UploadMeta:
    """Check an upload's name, type, kind, announced size and checksum; 413 when the announced size is too big."""
    limit = max_bytes() if limit is None else limit
    if declared_size is not None:
        if declared_size > limit:
            raise too_large(limit)
        if declared_size <= 0:
            raise InvalidInput("The file is empty.", field="file", code="empty_file")
    name = clean_filename(filename)
    return UploadMeta(filename=name, content_type=_content_type(content_type, name), kind=_kind(kind),
                      expected_sha256=_expected_sha256(expected_sha256), declared_size=declared_size)


# --- storing ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredUpload:
    """Bytes that arrived whole, checked, and now sit in the store waiting for their row."""

    meta: UploadMeta
    key: str
    size: int
    sha256: str


def _chunks(stream: UploadStream) -> Iterator[bytes]:
    if isinstance(stream, bytes | bytearray | memoryview):
        yield bytes(stream)
    elif hasattr(stream, "read"):
        while chunk := stream.read(CHUNK_BYTES):
            yield chunk
    else:
        yield from stream


def new_key(order_id: int) -> str:
    """A fresh, unguessable storage key; never derived from anything the uploader sent."""
    return f"orders/{order_id}/{secrets.token_hex(16)}"


def spool_dir() -> str | None:
    """Where uploads are spooled (`result_tmp_dir`; None: the system's temporary directory)."""
    chosen = get_settings().result_tmp_dir
    if not chosen:
        return None
    os.makedirs(chosen, exist_ok=True)  # a configured directory that does not exist yet is made, not a 500
    return chosen


def put_upload(store: ResultStore, meta: UploadMeta, stream: UploadStream, *, order_id: int,
               limit: int | None = None) -> StoredUpload:
    """Spool the bytes to a temporary file while counting and hashing them, check them, put them into the store.

    Reading stops at the first byte past `limit` (413); empty files, a size other than the one announced and a
    checksum other than the one expected are refused (422). The temporary file is gone afterwards in every case.
    """
    limit = max_bytes() if limit is None else limit
    fd, tmp = tempfile.mkstemp(prefix="labcommons-upload-", suffix=".part", dir=spool_dir())
    try:
        with os.fdopen(fd, "w+b") as spool:
            digest, size = hashlib.sha256(), 0
            source = _chunks(stream)
            try:
                for chunk in source:
                    if not chunk:
                        continue
                    if size + len(chunk) > limit:
                        raise too_large(limit)
                    size += len(chunk)
                    digest.update(chunk)
                    spool.write(chunk)
            finally:
                if hasattr(source, "close"):
                    source.close()
            if size == 0:
                raise InvalidInput("The file is empty.", field="file", code="empty_file")
            if meta.declared_size is not None and size != meta.declared_size:
                raise InvalidInput(f"Received {size} bytes of the {meta.declared_size} announced.", field="file",
                                   code="size_mismatch", received=size)
            sha256 = digest.hexdigest()
            if meta.expected_sha256 is not None and sha256 != meta.expected_sha256:
                raise InvalidInput("The file's SHA-256 differs from the checksum sent with it; it was damaged on "
                                   "the way or is another file.", field="expected_sha256", code="checksum_mismatch",
                                   sha256=sha256)
            spool.flush()
            spool.seek(0)
            key = new_key(order_id)
            store.put(key, spool, size)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return StoredUpload(meta=meta, key=key, size=size, sha256=sha256)


def check_upload(session: Session, actor: Actor, order_id: int) -> ServiceOrder:
    """The order if the actor is its facility's staff and its status takes uploads; 403/404/409 otherwise."""
    order = get_order(session, actor, order_id, staff=True)
    if not may_upload(order):
        raise UploadNotAllowed(f"Results can be uploaded while the order is accepted or in progress, not "
                               f"{order.status.value}.", field="order_id", status=order.status.value,
                               allowed_statuses=sorted(s.value for s in UPLOAD_STATUSES))
    return order


def record_upload(session: Session, actor: Actor, order_id: int, upload: StoredUpload,
                  store: ResultStore) -> ResultFile:
    """Insert the row of stored bytes (checking staff and status again: they may have changed meanwhile).

    The object is deleted if this fails or if the session's transaction later rolls back instead of committing.
    """
    _track(session, store, upload.key)
    try:
        check_upload(session, actor, order_id)
        row = ResultFile(order_id=order_id, kind=upload.meta.kind, filename=upload.meta.filename,
                         content_type=upload.meta.content_type, size_bytes=upload.size, sha256=upload.sha256,
                         storage_key=upload.key, uploaded_by_id=actor.user_id, uploaded_at=utcnow())
        session.add(row)
        session.flush()
    except BaseException:
        _untrack(session, upload.key)
        discard(store, upload.key)
        raise
    return row


def store_result(
    session: Session,
    actor: Actor,
    order_id: int,
    *,
    filename: str | None,
    content_type: str | None,
    kind: ResultKind | str | None,
    stream: UploadStream,
    declared_size: int | None = None,
    expected_sha256: str | None = None,
    store: ResultStore | None = None,
) -> ResultFile:
    """Upload a result file of an order as its facility's staff, in the caller's session.

    Staff only (403/404), while the order is accepted, samples_received or in_progress (409 upload_not_allowed);
    413 file_too_large past `result_max_bytes`; 422 for an empty file, a bad name or kind, or checksum_mismatch.
    """
    store = store or get_store()
    check_upload(session, actor, order_id)
    meta = upload_meta(filename=filename, content_type=content_type, kind=kind, declared_size=declared_size,
                       expected_sha256=expected_sha256)
    upload = put_upload(store, meta, stream, order_id=order_id)
    return record_upload(session, actor, order_id, upload, store)


def receive_result(
    db: Database,
    actor: Actor,
    order_id: int,
    *,
    filename: str | None,
    content_type: str | None,
    kind: ResultKind | str | None,
    stream: UploadStream,
    declared_size: int | None = None,
    expected_sha256: str | None = None,
    store: ResultStore | None = None,
) -> ResultFile:
    """`store_result` for requests: checks in a read transaction, takes the bytes outside any transaction, and
    writes the row in a short one of its own (committed when this returns)."""
    store = store or get_store()
    with db.unit_of_work(write=False) as session:
        check_upload(session, actor, order_id)
    meta = upload_meta(filename=filename, content_type=content_type, kind=kind, declared_size=declared_size,
                       expected_sha256=expected_sha256)
    upload = put_upload(store, meta, stream, order_id=order_id)
    try:
        with db.unit_of_work() as session:
            return record_upload(session, actor, order_id, upload, store)
    except BaseException:
        discard(store, upload.key)
        raise


def discard(store: ResultStore, key: str) -> None:
    """Delete an object whose row will not exist; a failure is logged (`results verify` cannot see orphans)."""
    try:
        store.delete(key)
    except Exception:  # the request fails anyway; a leftover object only costs space
        log.exception("could not delete orphaned result object %s", key)


_TRACKED = "labcommons_result_objects"


def _track(session: Session, store: ResultStore, key: str) -> None:
    if not session.in_transaction():
        session.begin()
    transaction = session.get_nested_transaction() or session.get_transaction()
    session.info.setdefault(_TRACKED, []).append((transaction, store, key))


def _untrack(session: Session, key: str) -> None:
    session.info[_TRACKED] = [entry for entry in session.info.get(_TRACKED, []) if entry[2] != key]


def _inside(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


@event.listens_for(Session, "after_commit")
def _forget_committed(session: Session) -> None:
    # Also fires when a savepoint is released; only the outermost commit makes the rows durable.
    if not session.in_nested_transaction():
        session.info.pop(_TRACKED, None)


@event.listens_for(Session, "after_soft_rollback")
def _delete_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    entries: list[tuple[SessionTransaction, ResultStore, str]] = session.info.get(_TRACKED, [])
    if not entries:
        return
    kept = []
    for entry in entries:
        if _inside(entry[0], previous_transaction):
            discard(entry[1], entry[2])
        else:
            kept.append(entry)
    session.info[_TRACKED] = kept


# --- downloading and withdrawing --------------------------------------------------------------------------------


def get_result(session: Session, actor: Actor, order_id: int, file_id: int) -> tuple[ServiceOrder, ResultFile]:
    """A result file the actor may fetch: staff any of their facility's order; the customer a live file of a
    delivered order. Everyone and everything else: NotFound, as if absent."""
    order = get_order(session, actor, order_id)
    row = session.get(ResultFile, file_id)
    if row is None or row.order_id != order.id:
        raise NotFound(f"Result file {file_id} does not exist.", field="file_id")
    if Party.staff not in parties_of(actor, order) and (row.withdrawn_at is not None
                                                         or not customer_may_download(order)):
        raise NotFound(f"Result file {file_id} does not exist.", field="file_id")
    return order, row


def open_result(session: Session, actor: Actor, order_id: int, file_id: int, *,
                store: ResultStore | None = None) -> tuple[ResultFile, Iterator[bytes]]:
    """The file's row and its bytes in chunks, for a download (see `get_result` for who may)."""
    _order, row = get_result(session, actor, order_id, file_id)
    return row, (store or get_store()).open(row.storage_key)


def withdraw_result(session: Session, actor: Actor, order_id: int, file_id: int) -> ResultFile:
    """Withdraw a file as the facility's staff, before the order is finished: the customer no longer sees it, the
    row (and the bytes) stay for the record. 409 already_withdrawn, 409 order_finished."""
    order = get_order(session, actor, order_id, staff=True)
    row = session.get(ResultFile, file_id)
    if row is None or row.order_id != order.id:
        raise NotFound(f"Result file {file_id} does not exist.", field="file_id")
    if not may_withdraw(order):
        raise OrderFinished(f"The order is {order.status.value}; its results can no longer be withdrawn.",
                            field="order_id", status=order.status.value)
    # Conditional, so two staff withdrawing at once both see a clean outcome.
    done = session.execute(
        update(ResultFile).where(ResultFile.id == row.id, ResultFile.withdrawn_at.is_(None))
        .values(withdrawn_at=utcnow()).execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        raise AlreadyWithdrawn("This file is already withdrawn.", field="file_id")
    session.refresh(row, attribute_names=["withdrawn_at"])
    return row


# --- verifying the store -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyProblem:
    """One stored file that is not what its row says: missing, checksum_mismatch, size_mismatch or unreadable."""

    file_id: int
    order_id: int
    storage_key: str
    problem: str
    detail: str = ""


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _digest_of(chunks: Iterator[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def verify_results(session: Session, store: ResultStore, *,
                   progress: Callable[[int, int], Any] | None = None) -> VerifyReport:
    """Read every stored file (withdrawn ones too) back from the store, recompute its SHA-256 and size, and report
    the files that are missing or differ. `progress(done, total)` is called after each file."""
    rows = session.execute(
        select(ResultFile.id, ResultFile.order_id, ResultFile.storage_key, ResultFile.size_bytes, ResultFile.sha256)
        .order_by(ResultFile.id)
    ).all()
    report = VerifyReport()
    for done, (file_id, order_id, key, size, sha256) in enumerate(rows, start=1):
        def problem(kind: str, detail: str = "", *, fid: int = file_id, oid: int = order_id, k: str = key) -> None:
            report.problems.append(VerifyProblem(fid, oid, k, kind, detail))

        try:
            actual, actual_size = _digest_of(store.open(key))
        except ObjectMissing:
            problem("missing")
        except Exception as exc:  # a store that fails for one object must not hide the state of the others
            problem("unreadable", f"{type(exc).__name__}: {exc}")
        else:
            if actual_size != size:
                problem("size_mismatch", f"expected {size} bytes, found {actual_size}")
            elif actual != sha256:
                problem("checksum_mismatch", f"expected {sha256}, found {actual}")
        report.checked += 1
        if progress is not None:
            progress(done, len(rows))
    return report
