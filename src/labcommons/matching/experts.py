"""The expert directory: people at institutions who give technical consultation, listed publicly, added by their
facility's managers and edited by those managers or by the expert themself (when their sign-in is linked).

A change to an expert marks its match document dirty (matching/index.py), so matching finds the new profile at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.catalog.models import Category, Facility, Institution, Region, Service, ServiceKind
from labcommons.db import MAX_ID
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.models import User
from labcommons.identity.roles import Action, FacilityRef
from labcommons.matching.models import Availability, Expert

MAX_LIMIT = 100
MAX_LIST_ITEMS = 30
MAX_ITEM_LENGTH = 200
MAX_BIO = 5000
# Language tags as in "zh", "en", "zh-Hant".
MAX_LANGUAGE_LENGTH = 16
MAX_Q = 200

# What an expert may change on their own profile; their facility's managers may also change the rest below.
SELF_FIELDS = frozenset({
    "name_zh", "name_en", "title_zh", "title_en", "bio_zh", "bio_en", "fields", "skills_zh", "skills_en",
    "languages", "availability",
})
MANAGER_FIELDS = SELF_FIELDS | {"consultation_service_id", "is_active", "user_id"}


@dataclass
class ExpertPage:
    items: list[Expert]
    total: int


# --- reading ----------------------------------------------------------------------------------------------------


def _with_parts(statement: Any) -> Any:
    return statement.options(joinedload(Expert.institution), joinedload(Expert.facility))


def _matches_q(expert: Expert, words: list[str]) -> bool:
    text = " ".join([
        expert.code, expert.name_zh, expert.name_en, expert.title_zh, expert.title_en, expert.bio_zh, expert.bio_en,
        *(expert.skills_zh or []), *(expert.skills_en or []), *(expert.fields or []),
    ]).casefold()
    return all(w in text for w in words)


def _in_field(expert: Expert, prefix: str) -> bool:
    return any(code == prefix or code.startswith(prefix + ".") for code in expert.fields or [])


def search_experts(
    session: Session,
    *,
    q: str | None = None,
    field: str | None = None,
    region: str | None = None,
    available_only: bool = False,
    limit: int = 50,
    offset: int = 0,
) -> ExpertPage:
    """Active experts, by code, filtered by words (names, titles, bios, skills), a taxonomy code prefix, region
    and availability; one page of them with the number of all that match."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be 1 to {MAX_LIMIT}.", field="limit", code="out_of_range")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidInput("offset must be 0 or more.", field="offset", code="out_of_range")
    statement = select(Expert).where(Expert.is_active.is_(True)).order_by(Expert.code)
    if region:
        if session.get(Region, region) is None:
            raise InvalidInput(f"Unknown region {region!r}.", field="region", code="unknown_region")
        statement = statement.where(Expert.region_code == region)
    if available_only:
        statement = statement.where(Expert.availability != Availability.unavailable)
    experts = list(session.scalars(_with_parts(statement)).unique())
    # The directory is small (hundreds): words and fields live in JSON lists, filtered here alike on both engines.
    if field:
        experts = [e for e in experts if _in_field(e, field.strip())]
    if q and q.strip():
        if len(q) > MAX_Q:
            raise InvalidInput(f"The search is too long ({MAX_Q} characters at most).", field="q", code="too_long")
        words = q.casefold().split()
        experts = [e for e in experts if _matches_q(e, words)]
    return ExpertPage(items=experts[offset: offset + limit], total=len(experts))


def list_experts(
    session: Session,
    *,
    q: str | None = None,
    field: str | None = None,
    region: str | None = None,
    available_only: bool = False,
    limit: int = 50,
    offset: int = 0,
) -> list[Expert]:
    """One page of `search_experts` (see there)."""
    return search_experts(session, q=q, field=field, region=region, available_only=available_only, limit=limit,
                          offset=offset).items


def get_expert(session: Session, expert_id: int, *, include_inactive: bool = False) -> Expert:
    """An expert with institution and facility loaded; NotFound when unknown (or inactive, unless asked for)."""
    if isinstance(expert_id, bool) or not isinstance(expert_id, int) or not 0 < expert_id <= MAX_ID:
        raise NotFound(f"Expert {expert_id} does not exist.", field="expert_id")
    expert = session.scalars(_with_parts(select(Expert).where(Expert.id == expert_id))).first()
    if expert is None or (not expert.is_active and not include_inactive):
        raise NotFound(f"Expert {expert_id} does not exist.", field="expert_id")
    return expert


def may_manage(actor: Actor | None, expert: Expert) -> bool:
    """Whether the actor manages the expert's facility."""
    # An expert of no facility is managed by platform administrators alone (no facility scope covers them).
    facility = None if expert.facility_id is None else FacilityRef(id=expert.facility_id,
                                                                   institution_id=expert.institution_id)
    return roles.authorize(actor, Action.manage_experts, facility=facility)


def may_edit(actor: Actor | None, expert: Expert) -> bool:
    """Whether the actor may edit the profile: its facility's managers, or the expert themself."""
    if actor is None:
        return False
    return (expert.user_id is not None and expert.user_id == actor.user_id) or may_manage(actor, expert)


def consultation_services(session: Session, facility_id: int) -> list[Service]:
    """The facility's active consultation services, which an expert's consultations may go through."""
    return list(session.scalars(
        select(Service).where(Service.facility_id == facility_id, Service.kind == ServiceKind.consultation,
                              Service.is_active.is_(True)).order_by(Service.code)
    ))


# --- checks -----------------------------------------------------------------------------------------------------


def _text(value: Any, name: str, *, required: bool = False, max_length: int = 100) -> str:
    if not isinstance(value, str):
        raise InvalidInput("Give text.", field=name, code="invalid_text")
    value = value.strip()
    if required and not value:
        raise InvalidInput("This is required.", field=name, code="missing_field")
    if len(value) > max_length:
        raise InvalidInput(f"Too long ({max_length} characters at most).", field=name, code="too_long")
    if "\x00" in value:
        raise InvalidInput("Text may not contain the NUL character.", field=name, code="invalid_text")
    return value


def _strings(value: Any, name: str, *, max_length: int = MAX_ITEM_LENGTH) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise InvalidInput("Give a list of texts.", field=name, code="invalid_list")
    if len(value) > MAX_LIST_ITEMS:
        raise InvalidInput(f"At most {MAX_LIST_ITEMS} entries.", field=name, code="too_many")
    out: list[str] = []
    for item in value:
        text = _text(item, name, required=True, max_length=max_length)
        if text not in out:
            out.append(text)
    return out


def _fields(session: Session, value: Any) -> list[str]:
    codes = _strings(value, "fields", max_length=32)
    known = set(session.scalars(select(Category.code).where(Category.code.in_(codes)))) if codes else set()
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise InvalidInput(f"Unknown field {unknown[0]!r}; use taxonomy codes such as GEN.SEQ.", field="fields",
                           code="unknown_category")
    return codes


def _availability(value: Any) -> Availability:
    try:
        return Availability(value)
    except ValueError:
        raise InvalidInput(f"Availability is one of {', '.join(a.value for a in Availability)}.",
                           field="availability", code="invalid_choice") from None


def _consultation_service(session: Session, value: Any, facility_id: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_ID:
        raise InvalidInput("Choose a consultation service.", field="consultation_service_id", code="invalid_service")
    svc = session.get(Service, value)
    if svc is None or svc.kind != ServiceKind.consultation or facility_id is None or svc.facility_id != facility_id:
        raise InvalidInput("Choose a consultation service of the expert's facility.", field="consultation_service_id",
                           code="invalid_service")
    return svc.id


def _user(session: Session, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_ID \
            or session.get(User, value) is None:
        raise InvalidInput("No such user.", field="user_id", code="unknown_user")
    return value


def _clean(session: Session, name: str, value: Any, facility_id: int | None) -> Any:
    if name in ("name_zh", "name_en"):
        return _text(value, name, required=True)
    if name in ("title_zh", "title_en"):
        return _text(value, name)
    if name in ("bio_zh", "bio_en"):
        return _text(value, name, max_length=MAX_BIO)
    if name == "fields":
        return _fields(session, value)
    if name in ("skills_zh", "skills_en"):
        return _strings(value, name)
    if name == "languages":
        return _strings(value, name, max_length=MAX_LANGUAGE_LENGTH)
    if name == "availability":
        return _availability(value)
    if name == "consultation_service_id":
        return _consultation_service(session, value, facility_id)
    if name == "is_active":
        if not isinstance(value, bool):
            raise InvalidInput("Give true or false.", field=name, code="invalid_flag")
        return value
    if name == "user_id":
        return _user(session, value)
    raise InvalidInput(f"Unknown field {name!r}.", field=name, code="unknown_field")


def _check_unique(session: Session, *, code: str | None, user_id: int | None, expert_id: int | None) -> None:
    if code is not None and session.scalar(select(Expert.id).where(Expert.code == code)) is not None:
        raise Conflict("An expert with this code exists already.", field="code", code="code_taken")
    if user_id is not None:
        holder = session.scalar(select(Expert.id).where(Expert.user_id == user_id))
        if holder is not None and holder != expert_id:
            raise Conflict("That user already has an expert profile.", field="user_id", code="user_taken")


def _flush_unique(session: Session) -> None:
    # The checks above answer the usual case; a concurrent insert of the same code or user is caught here.
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        raise Conflict("An expert with this code or user exists already.", field="code",
                       code="code_taken") from exc


# --- writing ----------------------------------------------------------------------------------------------------


def create_expert(
    session: Session,
    actor: Actor | None,
    *,
    facility_id: int,
    code: str,
    name_zh: str,
    name_en: str,
    **fields: Any,
) -> Expert:
    """A new expert of a facility (its managers; `actor` None is the platform operator); the institution and region
    come from the facility. Other `fields` as for update_expert."""
    facility = session.get(Facility, facility_id) if isinstance(facility_id, int) \
        and not isinstance(facility_id, bool) and 0 < facility_id <= MAX_ID else None
    if facility is None:
        raise NotFound(f"Facility {facility_id} does not exist.", field="facility_id")
    if actor is not None:
        roles.require(actor, Action.manage_experts, facility=FacilityRef.of(facility))
    code = _text(code, "code", required=True, max_length=40)
    institution = session.get(Institution, facility.institution_id)
    assert institution is not None
    values: dict[str, Any] = {"name_zh": _clean(session, "name_zh", name_zh, facility.id),
                              "name_en": _clean(session, "name_en", name_en, facility.id)}
    for name, value in fields.items():
        if name not in MANAGER_FIELDS:
            raise InvalidInput(f"Unknown field {name!r}.", field=name, code="unknown_field")
        values[name] = _clean(session, name, value, facility.id)
    _check_unique(session, code=code, user_id=values.get("user_id"), expert_id=None)
    expert = Expert(
        code=code, institution_id=facility.institution_id, facility_id=facility.id,
        region_code=institution.region_code, **values,
    )
    session.add(expert)
    _flush_unique(session)
    return expert


def update_expert(session: Session, actor: Actor, expert_id: int, **fields: Any) -> Expert:
    """Change an expert's profile: managers of its facility any field, the expert themself their own profile
    (names, titles, bios, fields, skills, languages, availability). NotFound for whoever may not see it."""
    expert = get_expert(session, expert_id, include_inactive=True)
    manager = may_manage(actor, expert)
    own = expert.user_id is not None and expert.user_id == actor.user_id
    if not manager and not own:
        if expert.is_active:
            raise Forbidden("Only the expert and their facility's managers may edit this profile.",
                            field="expert_id")
        raise NotFound(f"Expert {expert_id} does not exist.", field="expert_id")
    allowed = MANAGER_FIELDS if manager else SELF_FIELDS
    for name in fields:
        if name not in MANAGER_FIELDS:
            raise InvalidInput(f"Unknown field {name!r}.", field=name, code="unknown_field")
        if name not in allowed:
            raise Forbidden(f"Only the facility's managers may change {name}.", field=name)
    values = {name: _clean(session, name, value, expert.facility_id) for name, value in fields.items()}
    _check_unique(session, code=None, user_id=values.get("user_id"), expert_id=expert.id)
    for name, value in values.items():
        setattr(expert, name, value)
    _flush_unique(session)
    return expert
