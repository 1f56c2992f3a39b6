"""Capturing state changes: ORM flushes of audited tables become audit entries, written and chained at commit.

Entries are collected after each flush (before/after values from the attribute history) and appended in
`before_commit`: the session flushes what is left, looks up where each entity lives, then takes the chain's
head row for update (the first write of the commit on SQLite, a row lock on PostgreSQL), so appends from many
processes are serialised only for the moment of their commit, and a rolled-back change leaves no entry.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Table, and_, event, inspect, null, or_, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapper, ORMExecuteState, Session
from sqlalchemy.orm.attributes import PASSIVE_NO_INITIALIZE, get_history

import labcommons.audit.models  # noqa: F401  (the tables below are looked up by name)
from labcommons.audit import context
from labcommons.audit.chain import GENESIS, HEAD_ID, audit_key, canonical_json, entry_hash
from labcommons.config import get_settings
from labcommons.db import Base, transaction_within, utcnow

PENDING = "audit_pending"

# An anchor says where an entity lives: ("direct", region, institution, facility), or (kind, id) looked up at
# commit ("instrument", "facility", "institution", "user", "order", "account", "voucher"), or None (platform).
Anchor = tuple[Any, ...] | None


def _direct(region: str, institution: str | None = None, facility: str | None = None) -> Callable[[Any], Anchor]:
    def anchor(obj: Any) -> Anchor:
        return ("direct", getattr(obj, region, None), getattr(obj, institution, None) if institution else None,
                getattr(obj, facility, None) if facility else None)
    return anchor


def _by(kind: str, attribute: str) -> Callable[[Any], Anchor]:
    def anchor(obj: Any) -> Anchor:
        value = getattr(obj, attribute, None)
        return (kind, value) if value is not None else None
    return anchor


def _grant_anchor(obj: Any) -> Anchor:
    if obj.facility_id is not None:
        return ("facility", obj.facility_id)
    if obj.institution_id is not None:
        return ("institution", obj.institution_id)
    return ("direct", obj.region_code, None, None) if obj.region_code else None


def _platform(obj: Any) -> Anchor:
    return None


@dataclass(frozen=True)
class Audited:
    entity: str
    anchor: Callable[[Any], Anchor]
    # Named events instead of created/updated/deleted, e.g. a web session's creation is a login.
    verbs: tuple[str, str, str] = ("created", "updated", "deleted")


# Every table whose rows are state users and staff change. Left out on purpose: derived tables (statistics,
# matching index, demand matches), queues and caches (jobs, idempotency records, throttles), and detail rows whose
# parent's entry already says what changed (quote lines, invoice lines, sample events).
AUDITED: dict[str, Audited] = {
    "institution": Audited("institution", _direct("region_code", "id")),
    "facility": Audited("facility", _by("institution", "institution_id")),
    "instrument": Audited("instrument", _direct("region_code", "institution_id", "facility_id")),
    "service": Audited("service", _direct("region_code", "institution_id", "facility_id")),
    "service_accreditation": Audited("service_accreditation", _platform),
    "user_account": Audited("user", _direct("region_code", "institution_id")),
    "api_token": Audited("api_token", _by("user", "user_id")),
    "web_session": Audited("session", _by("user", "user_id"), ("login", "session.updated", "logout")),
    "role_grant": Audited("role_grant", _grant_anchor),
    "password_reset": Audited("password_reset", _by("user", "user_id")),
    "identity_provider": Audited("identity_provider", _platform),
    "external_identity": Audited("external_identity", _by("user", "user_id")),
    "oidc_client": Audited("oidc_client", _platform),
    "oidc_consent": Audited("oidc_consent", _by("user", "user_id")),
    "booking": Audited("booking", _by("instrument", "instrument_id")),
    "booking_policy": Audited("booking_policy", _by("instrument", "instrument_id")),
    "qualification": Audited("qualification", _by("instrument", "instrument_id")),
    "booking_series": Audited("booking_series", _by("instrument", "instrument_id")),
    "waitlist_entry": Audited("waitlist_entry", _by("instrument", "instrument_id")),
    "instrument_token": Audited("instrument_token", _by("instrument", "instrument_id")),
    "calendar_feed": Audited("calendar_feed", _by("user", "owner_id")),
    "service_order": Audited("order", _by("facility", "facility_id")),
    "order_event": Audited("order_step", _by("order", "order_id")),
    "quote": Audited("quote", _by("order", "order_id")),
    "sample": Audited("sample", _by("order", "order_id")),
    "result_file": Audited("result_file", _by("order", "order_id")),
    "order_message": Audited("order_message", _by("order", "order_id")),
    "order_rating": Audited("order_rating", _by("order", "order_id")),
    "billing_policy": Audited("billing_policy", _by("facility", "facility_id")),
    "rate": Audited("rate", _by("facility", "facility_id")),
    "billing_account": Audited("billing_account", _direct("region_code", "institution_id")),
    "account_member": Audited("account_member", _by("account", "account_id")),
    "account_deposit": Audited("account_deposit", _by("account", "account_id")),
    "billing_hold": Audited("billing_hold", _by("account", "account_id")),
    "charge": Audited("charge", _direct("provider_region_code", "provider_institution_id", "facility_id")),
    "payment": Audited("payment", _by("account", "account_id")),
    "voucher": Audited("voucher", _direct("issuer_region_code")),
    "voucher_redemption": Audited("voucher_redemption", _by("voucher", "voucher_id")),
    "voucher_recognition": Audited("voucher_recognition", _platform),
    "talent_card": Audited("talent_card", _by("user", "user_id")),
    "talent_entitlement": Audited("talent_entitlement", _platform),
    "invoice": Audited("invoice", _by("account", "account_id")),
    "expert": Audited("expert", _direct("region_code", "institution_id", "facility_id")),
    "demand": Audited("demand", _by("user", "user_id")),
    "demand_offer": Audited("demand_offer", _by("facility", "facility_id")),
    "demand_subscription": Audited("demand_subscription", _by("facility", "facility_id")),
    "notification_preference": Audited("notification_preference", _by("user", "user_id")),
}

# Columns that change with every touch and say nothing about state.
IGNORED = {"search_name", "search_body", "updated_at", "last_used_at"}
# Secrets: the log says that they changed, never their value nor a digest of it.
SECRET = {"password_hash", "token_hash", "client_secret", "client_secret_hash", "secret", "secret_hash", "code_hash",
          "state_hash", "browser_hash", "private_key", "private_jwk"}
# Personal data: the log keeps a keyed digest, enough to prove a value later and useless to read it.
PERSONAL = {
    ("user_account", "email"), ("user_account", "name"), ("booking", "purpose"), ("booking", "cancel_note"),
    ("booking_series", "purpose"), ("waitlist_entry", "purpose"), ("service_order", "contact_phone"),
    ("service_order", "description"), ("order_message", "body"), ("order_rating", "comment"),
    ("talent_card", "card_number"), ("talent_card", "holder_name"), ("demand", "text"),
    ("external_identity", "email"), ("external_identity", "subject"), ("password_reset", "email"),
    ("service_order", "title"), ("service_order", "sample_description"), ("order_event", "comment"),
    ("quote", "note"), ("quote", "decision_note"), ("sample", "description"), ("sample_event", "note"),
    ("result_file", "filename"), ("demand", "sample_type"), ("demand_offer", "message"), ("qualification", "note"),
    ("talent_card", "note"), ("account_deposit", "reference"), ("billing_account", "name"),
    ("expert", "name_zh"), ("expert", "name_en"), ("expert", "bio_zh"), ("expert", "bio_en"),
    ("booking_series", "rrule"), ("waitlist_entry", "purpose"), ("api_token", "name"),
}


@dataclass
class _Pending:
    at: datetime
    actor_id: int | None
    actor_kind: str
    client_ip: str | None
    action: str
    table: str
    entity_type: str
    entity_id: str
    anchor: Anchor
    changes: dict[str, Any]
    # The innermost transaction when it was flushed: rolling back a savepoint drops what was flushed inside it.
    transaction: Any


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal | float):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return str(value)


def personal_digest(table: str, column: str, value: Any) -> str:
    """The keyed digest the log keeps in place of a personal value."""
    message = f"{table}.{column}:{_plain(value)}".encode()
    return "hmac:" + hmac.new(audit_key(), message, hashlib.sha256).hexdigest()[:24]


def _recorded(table: str, column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in SECRET:
        return "<secret>"
    if (table, column) in PERSONAL:
        return personal_digest(table, column, value)
    return _plain(value)


def _columns(table: Table) -> list[str]:
    return [c.key for c in table.columns if c.key not in IGNORED]


def _state_values(obj: Any, table: Table) -> dict[str, Any]:
    # Only loaded values: reading an unloaded attribute of a deleted row would query for it.
    loaded = inspect(obj).dict
    return {name: _recorded(table.name, name, loaded[name]) for name in _columns(table) if name in loaded}


def _entity_id(obj: Any, table: Table) -> str:
    identity = inspect(obj).identity
    if identity:
        return "/".join(str(_plain(v)) for v in identity)
    return "/".join(str(_plain(getattr(obj, c.key, None))) for c in table.primary_key.columns)


def _append(session: Session, table: Table, spec: Audited, verb_index: int, entity_id: str, anchor: Anchor,
            changes: dict[str, Any], owner_id: Any = None) -> None:
    verb = spec.verbs[verb_index]
    action = f"{spec.entity}.{verb}" if verb in ("created", "updated", "deleted") else verb
    acting = session.info.get("audit_actor") or context.current()
    actor_id, actor_kind = acting.actor_id, acting.actor_kind
    if actor_id is None and table.name == "web_session":
        actor_id, actor_kind = owner_id, "user"  # a sign-in acts for the user it signs in
    session.info.setdefault(PENDING, []).append(_Pending(
        at=utcnow(), actor_id=actor_id, actor_kind=actor_kind, client_ip=acting.client_ip, action=action,
        table=table.name, entity_type=spec.entity, entity_id=entity_id, anchor=anchor, changes=changes,
        transaction=session.get_nested_transaction() or session.get_transaction(),
    ))


def _collect(session: Session, obj: Any, verb_index: int) -> None:
    table = getattr(obj, "__table__", None)
    spec = AUDITED.get(table.name) if table is not None else None
    if spec is None or table is None:
        return
    if verb_index == 0:
        changes: dict[str, Any] = {"after": _state_values(obj, table)}
    elif verb_index == 2:
        changes = {"before": _state_values(obj, table)}
    else:
        before, after = {}, {}
        for name in _columns(table):
            # Never load an expired attribute here: what was not loaded was not changed through this object.
            history = get_history(obj, name, passive=PASSIVE_NO_INITIALIZE)
            if not history.has_changes():
                continue
            old = history.deleted[0] if history.deleted else None
            new = history.added[0] if history.added else None
            if old == new:
                continue
            before[name], after[name] = _recorded(table.name, name, old), _recorded(table.name, name, new)
        if not after:
            return
        changes = {"before": before, "after": after}
    _append(session, table, spec, verb_index, _entity_id(obj, table), _loaded_place(session, spec.anchor(obj)),
            changes, owner_id=getattr(obj, "user_id", None))


@functools.cache
def _instrument_mapper() -> Mapper[Any]:
    return next(m for m in Base.registry.mappers if m.local_table is _table("instrument"))


def _loaded_place(session: Session, anchor: Anchor) -> Anchor:
    """An instrument anchor made direct when the instrument is loaded in the session (a booking's nearly always
    is), which saves a lookup at commit, when the session may have let go of the object."""
    if anchor is None or anchor[0] != "instrument":
        return anchor
    obj = session.identity_map.get(_instrument_mapper().identity_key_from_primary_key((anchor[1],)))
    if obj is not None:
        loaded = inspect(obj).dict
        if all(k in loaded for k in ("region_code", "institution_id", "facility_id")):
            return ("direct", loaded["region_code"], loaded["institution_id"], loaded["facility_id"])
    return anchor


def _after_flush(session: Session, flush_context: Any) -> None:
    for obj in session.new:
        _collect(session, obj, 0)
    for obj in session.dirty:
        if session.is_modified(obj, include_collections=False):
            _collect(session, obj, 1)
    for obj in session.deleted:
        _collect(session, obj, 2)


def _rows_by_key(session: Session, table: Table, criteria: Any, *, lock: bool = False
                 ) -> dict[tuple[Any, ...], dict[str, Any]]:
    key = list(table.primary_key.columns)
    query = select(table).where(criteria)
    if lock:
        # PostgreSQL: hold the rows from this read to the statement, so the "after" read shows this statement's
        # change and not a concurrent one's (SQLite writers are serialised already; it has no FOR UPDATE).
        query = query.with_for_update()
    rows = session.execute(query).mappings()
    return {tuple(row[c.key] for c in key): dict(row) for row in rows}


def _bulk_statement(state: ORMExecuteState) -> Any:
    """UPDATE and DELETE statements (guarded balance updates, compare-and-set steps, clean-ups) bypass the flush:
    read the rows they touch before and after, and log each row that changed like a flushed object."""
    if not (state.is_update or state.is_delete):
        return None
    table = getattr(state.statement, "table", None)
    spec = AUDITED.get(table.name) if isinstance(table, Table) else None
    if spec is None or table is None:
        return None
    # The plain table: selecting the ORM-annotated one would load entities instead of rows.
    table = _table(table.name)
    session = state.session
    criteria = getattr(state.statement, "whereclause", None)
    before = _rows_by_key(session, table, criteria if criteria is not None else true(), lock=True)
    result = state.invoke_statement()
    if not before:
        return result
    key = list(table.primary_key.columns)
    match: Any
    if len(key) == 1:
        match = key[0].in_([k[0] for k in before])
    else:
        match = or_(*(and_(*(c == v for c, v in zip(key, k, strict=True))) for k in before))
    after = _rows_by_key(session, table, match) if state.is_update else {}
    for row_key, old in before.items():
        new = after.get(row_key)
        if new is None:
            changes = {"before": {n: _recorded(table.name, n, old[n]) for n in _columns(table) if n in old}}
            verb_index = 2
        else:
            changed = [n for n in _columns(table) if old.get(n) != new.get(n)]
            if not changed:
                continue
            changes = {"before": {n: _recorded(table.name, n, old[n]) for n in changed},
                       "after": {n: _recorded(table.name, n, new[n]) for n in changed}}
            verb_index = 1
        _append(session, table, spec, verb_index, "/".join(str(_plain(v)) for v in row_key),
                spec.anchor(SimpleNamespace(**old)), changes, owner_id=old.get("user_id"))
    return result


def _table(name: str) -> Table:
    return Base.metadata.tables[name]


def _resolve(session: Session, pending: list[_Pending]) -> dict[tuple[str, Any], tuple[Any, Any, Any]]:
    """Where each looked-up anchor lives: (region, institution, facility), one query per kind."""
    wanted: dict[str, set[Any]] = {}
    for item in pending:
        if item.anchor and item.anchor[0] != "direct":
            wanted.setdefault(item.anchor[0], set()).add(item.anchor[1])
    found: dict[tuple[str, Any], tuple[Any, Any, Any]] = {}
    if not wanted:
        return found
    inst, fac, ins = _table("institution"), _table("facility"), _table("instrument")

    def fetch(kind: str, query: Any) -> None:
        for key, region, institution, facility in session.execute(query):
            found[(kind, key)] = (region, institution, facility)

    for kind, ids in wanted.items():
        ids_list = sorted(ids, key=str)
        if kind == "instrument":
            fetch(kind, select(ins.c.id, ins.c.region_code, ins.c.institution_id, ins.c.facility_id)
                  .where(ins.c.id.in_(ids_list)))
        elif kind == "facility":
            fetch(kind, select(fac.c.id, inst.c.region_code, inst.c.id, fac.c.id)
                  .join(inst, inst.c.id == fac.c.institution_id).where(fac.c.id.in_(ids_list)))
        elif kind == "institution":
            fetch(kind, select(inst.c.id, inst.c.region_code, inst.c.id, null()).where(inst.c.id.in_(ids_list)))
        elif kind == "user":
            user = _table("user_account")
            fetch(kind, select(user.c.id, user.c.region_code, user.c.institution_id, null())
                  .where(user.c.id.in_(ids_list)))
        elif kind == "order":
            order = _table("service_order")
            fetch(kind, select(order.c.id, inst.c.region_code, inst.c.id, fac.c.id)
                  .join(fac, fac.c.id == order.c.facility_id).join(inst, inst.c.id == fac.c.institution_id)
                  .where(order.c.id.in_(ids_list)))
        elif kind == "account":
            account = _table("billing_account")
            fetch(kind, select(account.c.id, account.c.region_code, account.c.institution_id, null())
                  .where(account.c.id.in_(ids_list)))
        elif kind == "voucher":
            voucher = _table("voucher")
            fetch(kind, select(voucher.c.id, voucher.c.issuer_region_code, null(), null())
                  .where(voucher.c.id.in_(ids_list)))
    return found


def _take_head(session: Session, count: int) -> tuple[int, str]:
    """Reserve `count` positions after the head, locking it until commit; gives the last seq and hash before."""
    head = _table("audit_head")
    reserve = (update(head).where(head.c.id == HEAD_ID).values(seq=head.c.seq + count)
               .returning(head.c.seq, head.c.hash))
    row = session.execute(reserve).first()
    if row is None:
        # The first entry ever (or after a test emptied the tables): create the head, racing writers agree.
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        session.execute(dialect.insert(head).values(id=HEAD_ID, seq=0, hash=GENESIS)
                        .on_conflict_do_nothing())
        row = session.execute(reserve).one()
    return int(row.seq) - count, str(row.hash)


def _before_commit(session: Session) -> None:
    if session.in_nested_transaction():
        # SQLAlchemy fires before_commit for a SAVEPOINT's release too. Appending there would take the head's row
        # lock in the middle of the request and hold it to the end: a booking (its savepoint, then the account's
        # row lock) and a charge (the account's lock, then the head at commit) deadlocked on PostgreSQL. The
        # entries wait for the outermost commit, which runs after every savepoint is closed.
        return
    session.flush()
    pending: list[_Pending] = session.info.pop(PENDING, [])
    if not pending:
        return
    places = _resolve(session, pending)
    records = []
    for item in pending:
        if item.anchor is None:
            region, institution, facility = None, None, None
        elif item.anchor[0] == "direct":
            region, institution, facility = item.anchor[1:4]
        else:
            region, institution, facility = places.get((item.anchor[0], item.anchor[1]), (None, None, None))
        records.append(dict(at=item.at, actor_id=item.actor_id, actor_kind=item.actor_kind,
                            client_ip=item.client_ip, action=item.action, entity_type=item.entity_type,
                            entity_id=item.entity_id, region_code=region, institution_id=institution,
                            facility_id=facility, changes=canonical_json(item.changes)))
    if deferred_sealing(session.get_bind().dialect.name):
        key = audit_key()
        session.execute(_table("audit_pending").insert(), [{**r, "mac": pending_mac(key, r)} for r in records])
    else:
        chain_records(session, records)


def deferred_sealing(dialect_name: str) -> bool:
    """Whether commits leave their entries to the sealer (settings.audit_sealing) on this database."""
    mode = get_settings().audit_sealing
    return mode == "deferred" or (mode == "auto" and dialect_name == "postgresql")


def pending_mac(key: bytes, record: dict[str, Any]) -> str:
    """The HMAC a pending record carries until it is chained (its position and predecessor are not known yet)."""
    return entry_hash(key, "pending", 0, record["at"], record["actor_id"], record["actor_kind"],
                      record["client_ip"], record["action"], record["entity_type"], record["entity_id"],
                      record["region_code"], record["institution_id"], record["facility_id"], record["changes"])


def chain_records(session: Session, records: list[dict[str, Any]]) -> None:
    """Append records (the entry fields but seq and hashes) to the chain, taking its head until commit."""
    last_seq, prev = _take_head(session, len(records))
    key = audit_key()
    rows = []
    for offset, record in enumerate(records, start=1):
        seq = last_seq + offset
        digest = entry_hash(key, prev, seq, record["at"], record["actor_id"], record["actor_kind"],
                            record["client_ip"], record["action"], record["entity_type"], record["entity_id"],
                            record["region_code"], record["institution_id"], record["facility_id"],
                            record["changes"])
        rows.append({**record, "seq": seq, "prev_hash": prev, "hash": digest})
        prev = digest
    session.execute(_table("audit_entry").insert(), rows)
    head = _table("audit_head")
    session.execute(update(head).where(head.c.id == HEAD_ID).values(hash=prev))


def _soft_rollback(session: Session, previous_transaction: Any) -> None:
    pending = session.info.get(PENDING)
    if pending and previous_transaction.nested:
        session.info[PENDING] = [item for item in pending
                                 if not transaction_within(item.transaction, previous_transaction)]


def _transaction_end(session: Session, transaction: Any) -> None:
    # The outermost transaction ended: by commit (its entries were written), by rollback, or by close() or
    # reset() without either; in no case may its entries carry over to the session's next transaction.
    if transaction.parent is None:
        session.info.pop(PENDING, None)


def register() -> None:
    """Listen on every session (idempotent)."""
    if not event.contains(Session, "after_flush", _after_flush):
        event.listen(Session, "after_flush", _after_flush)
        event.listen(Session, "before_commit", _before_commit)
        event.listen(Session, "after_soft_rollback", _soft_rollback)
        event.listen(Session, "after_transaction_end", _transaction_end)
        event.listen(Session, "do_orm_execute", _bulk_statement)
