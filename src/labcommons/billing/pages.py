"""Billing pages: my funding accounts (/billing), one account (/billing/accounts/{id}), a facility's rates, rules
and charges (/manage/billing/facilities/{id}), and a region's vouchers and recognition (/manage/vouchers); plus
the account choice and rate card shown in the booking and order forms."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing import accounts, ledger, rates, vouchers
from labcommons.billing.models import (
    AccountKind,
    AccountMember,
    BillingAccount,
    ChargeBasis,
    MemberStatus,
    PayerCategory,
    RateUnit,
    Rounding,
    SourceKind,
)
from labcommons.catalog import service as catalog
from labcommons.catalog.models import Facility, Institution, Instrument, Service
from labcommons.db import MAX_ID, Database
from labcommons.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound
from labcommons.http import Id, page_actor, request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.identity.roles import Action
from labcommons.orders.pages import parse_day, parse_int, parse_yuan
from labcommons.orders.service import facility_today, user_names
from labcommons.pages import N_, check_csrf, env, redirect, render, require_actor, yuan

router = APIRouter(include_in_schema=False)
Db = Annotated[Database, Depends(request_db)]

CATEGORY_LABELS = {
    PayerCategory.internal: N_("Own institution"), PayerCategory.academic_region: N_("Academic, same region"),
    PayerCategory.academic_other: N_("Academic, other region"), PayerCategory.industry: N_("Industry"),
}
UNIT_LABELS = {RateUnit.hour: N_("per hour"), RateUnit.sample: N_("per sample"), RateUnit.project: N_("per project")}
KIND_LABELS = {AccountKind.grant: N_("Grant or project"), AccountKind.company: N_("Company account")}
MEMBER_LABELS = {MemberStatus.pending: N_("Awaiting approval"), MemberStatus.approved: N_("Approved"),
                 MemberStatus.declined: N_("Declined"), MemberStatus.revoked: N_("Revoked")}
BASIS_LABELS = {ChargeBasis.booked: N_("Booked time"), ChargeBasis.actual: N_("Checked-in time"),
                ChargeBasis.greater: N_("The longer of the two")}
ROUNDING_LABELS = {Rounding.up: N_("Round up"), Rounding.nearest: N_("Round to the nearest")}
ITEM_KIND_LABELS = {"instrument": N_("Instrument time"), "testing": N_("Inspection and testing"),
                    "rnd": N_("Contract R&D"), "consultation": N_("Technical consultation")}
# Form inputs typed in yuan or percent carry other names than the service's fen and basis-point fields.
_FIELD_OF = {"amount_fen": "amount", "limit_fen": "limit", "share_bp": "share"}


def label(table: dict[Any, str], value: Any) -> str:
    """A value's label in the page's language (the raw value when there is none)."""
    text = table.get(value)
    return _(text) if text else str(value)


env.globals["billing_label"] = label
env.globals["billing_labels"] = {"category": CATEGORY_LABELS, "unit": UNIT_LABELS, "kind": KIND_LABELS,
                                 "member": MEMBER_LABELS, "basis": BASIS_LABELS, "rounding": ROUNDING_LABELS,
                                 "item": ITEM_KIND_LABELS}


def billing_error_message(exc: DomainError) -> str | None:
    """A billing problem in the user's language; None for codes billing does not know."""
    details = exc.details
    available = details.get("available_fen")
    texts = {
        "account_required": _("Choose the funding account to charge.") if details.get("accounts")
        else _("This facility charges for its work: join or open a funding account first."),
        "account_not_usable": _("You cannot charge to this account (not a member, or it is not active)."),
        "spending_limit_exceeded": _("This would take the account past its spending limit."),
        "insufficient_balance": _("The account's prepaid balance does not cover this: top it up first."),
        "member_limit_exceeded": _("This would take you past your limit on this account."),
    }
    text = texts.get(exc.code)
    if text and isinstance(available, int):
        text += " " + _("Still available: %(amount)s.") % {"amount": yuan(available)}
    return text


def error_message(exc: DomainError) -> str:
    """What went wrong with a billing form, in the user's language."""
    known = billing_error_message(exc)
    if known:
        return known
    texts = {
        "invalid_amount": _("Enter an amount in yuan with at most two decimals, such as 1200 or 1200.50."),
        "out_of_range": _("The number is out of range."),
        "invalid_number": _("Enter a whole number."),
        "invalid_date": _("Enter the date as YYYY-MM-DD."),
        "invalid_code": _("The code is 2–64 letters, digits, dots, dashes or slashes."),
        "code_taken": _("This code is taken already."),
        "missing_field": _("Fill in the required fields."),
        "invalid_choice": _("Choose one of the options."),
        "not_a_company": _("A company account belongs to a company."),
        "no_institution": _("An account belongs to an institution; you belong to none."),
        "not_prepaid": _("This account is not prepaid; its charges go on its invoice."),
        "too_long": _("The text is too long."),
        "owner_member": _("The owner stays a member of their account."),
        "rate_exists": _("A price for this category already starts that day."),
        "in_past": _("A price cannot start in the past: charges already use the old one."),
        "ends_before_start": _("The voucher must end after it starts."),
        "unknown_category": _("Unknown category."),
        "already_reversed": _("This charge was reversed already."),
        "charge_not_correctable": _("A reversal is not corrected; post a new charge instead."),
        "not_found": _("Nothing was found for what you entered."),
    }
    return texts.get(exc.code, _("Some of what was sent is not valid."))


def _field(exc: DomainError) -> str | None:
    return _FIELD_OF.get(exc.field or "", exc.field)


def _optional_yuan(text: str, field: str) -> int | None:
    return parse_yuan(text, field) if text.strip() else None


# --- my accounts -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountSummary:
    account: BillingAccount
    spent_fen: int
    held_fen: int
    voucher_fen: int
    managed: bool

    @property
    def available_fen(self) -> int | None:
        """What may still be committed; None without a limit (a prepaid account: its balance and vouchers)."""
        if self.account.limit_fen is not None:
            return max(0, self.account.limit_fen - self.spent_fen - self.held_fen)
        if self.account.prepaid:
            return max(0, self.account.balance_fen + self.voucher_fen - self.held_fen)
        return None


def _summary(session: Session, actor: Actor, account: BillingAccount, today: date) -> AccountSummary:
    used = accounts.commitments(session, account.id)
    return AccountSummary(account, used.spent_fen, used.held_fen,
                          accounts.voucher_balance(session, account.id, today), accounts.may_manage(actor, account))


def _billing_facilities(session: Session, actor: Actor) -> list[Facility]:
    """The facilities whose charges the actor handles (by a facility role), for links."""
    ids = sorted({g.facility_id for g in actor.grants if g.facility_id is not None
                  and g.role in roles.PERMISSIONS[Action.manage_facility_billing].roles})
    return [f for f in (session.get(Facility, i) for i in ids) if f is not None]


def _home(request: Request, db: Database, actor: Actor, status_code: int = 200, **context: Any) -> HTMLResponse:
    today = facility_today()
    with db.unit_of_work(write=False) as session:
        mine = {a.id: a for a in accounts.accounts_of(session, actor.user_id)}
        for account in accounts.managed_accounts(session, actor):
            mine.setdefault(account.id, account)
        rows = [_summary(session, actor, a, today) for a in sorted(mine.values(), key=lambda a: a.code)]
        held_vouchers = {a: list(vouchers.vouchers_of_account(session, a)) for a in mine}
        pending = accounts.pending_requests(session, actor.user_id)
        facilities = _billing_facilities(session, actor)
        institution = session.get(Institution, actor.institution_id) if actor.institution_id else None
    context.setdefault("form", {"code": "", "name": "", "kind": "grant", "prepaid": "", "limit": ""})
    context.setdefault("join_code", "")
    context.setdefault("error", None)
    context.setdefault("error_form", None)
    context.setdefault("error_field", None)
    return render(
        request, "billing/home.html", status_code, page_path="/billing", rows=rows, vouchers=held_vouchers,
        pending=pending, facilities=facilities,
        is_company=bool(institution and institution.kind.value == "company"), today=today,
        issues_vouchers=any(g.role in roles.PERMISSIONS[Action.issue_vouchers].roles for g in actor.grants),
        **context,
    )


@router.get("/billing", response_class=HTMLResponse)
def billing_home(request: Request, db: Db) -> HTMLResponse:
    """The user's funding accounts with limits, spending and vouchers; forms to open or join one."""
    actor = require_actor(request)
    roles.require(actor, Action.manage_own_billing)
    return _home(request, db, actor)


@router.post("/billing/accounts", response_model=None)
def open_account(
    request: Request, db: Db, csrf_token: Annotated[str, Form()] = "", code: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "", kind: Annotated[str, Form()] = "grant",
    prepaid: Annotated[str, Form()] = "", limit: Annotated[str, Form()] = "",
) -> Response:
    """Open a grant or company account owned by the user."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    form = {"code": code, "name": name, "kind": kind, "prepaid": prepaid, "limit": limit}
    try:
        limit_fen = _optional_yuan(limit, "limit")
        with db.unit_of_work() as session:
            account = accounts.create_account(session, actor, code=code, name=name, kind=kind,
                                              prepaid=bool(prepaid), limit_fen=limit_fen)
            account_id, account_code = account.id, account.code
    except (InvalidInput, Conflict, Forbidden) as exc:
        return _home(request, db, actor, exc.status_code if not isinstance(exc, Forbidden) else 403,
                     form=form, error=error_message(exc), error_form="open", error_field=_field(exc))
    return redirect(f"/billing/accounts/{account_id}",
                    flash=_("Account %(code)s opened. Members join it with its code.") % {"code": account_code})


@router.post("/billing/join", response_model=None)
def join_account(request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
                 code: Annotated[str, Form()] = "") -> Response:
    """Ask to charge to an account, by its code; its owner approves."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        with db.unit_of_work() as session:
            member = accounts.request_membership(session, actor, code)
            approved = member.status == MemberStatus.approved
    except NotFound:
        return _home(request, db, actor, 404, join_code=code, error=_("No active account has this code."),
                     error_form="join", error_field="code")
    if approved:
        return redirect("/billing", flash=_("You are a member of this account already."))
    return redirect("/billing", flash=_("Request sent. The account's owner will approve it."))


# --- one account ---------------------------------------------------------------------------------------------------


def _account_page(request: Request, db: Database, actor: Actor, account_id: int, status_code: int = 200,
                  **context: Any) -> HTMLResponse:
    today = facility_today()
    with db.unit_of_work(write=False) as session:
        account = accounts.visible_account(session, actor, account_id)
        summary = _summary(session, actor, account, today)
        manages = summary.managed
        member_rows = list(accounts.members(session, account.id)) if manages else []
        names = user_names(session, [m.user_id for m in member_rows] + [account.owner_id])
        spent_by = {m.user_id: accounts.commitments(session, account.id, user_id=m.user_id) for m in member_rows}
        held = list(vouchers.vouchers_of_account(session, account.id))
        redeemed = {v.id: list(vouchers.redemptions(session, v.id)) for v in held}
        charges = list(ledger.charges_of_account(session, account.id, limit=100))
        parts = ledger.parts_of_charges(session, [c.id for c in charges])
        deposit_rows = list(accounts.deposits(session, account.id))
        may_deposit = account.prepaid and roles.authorize(actor, Action.manage_institution_accounts,
                                                          institution_id=account.institution_id)
        institution = session.get(Institution, account.institution_id)
    context.setdefault("error", None)
    context.setdefault("error_form", None)
    context.setdefault("error_field", None)
    context.setdefault("deposit_form", {"amount": "", "reference": ""})
    return render(
        request, "billing/account.html", status_code, page_path=f"/billing/accounts/{account_id}",
        account=account, summary=summary, manages=manages, members=member_rows, names=names, spent_by=spent_by,
        vouchers=held, redemptions=redeemed, charges=charges, parts=parts, deposits=deposit_rows,
        may_deposit=may_deposit, institution=institution, **context,
    )


@router.get("/billing/accounts/{account_id}", response_class=HTMLResponse)
def account_page(account_id: Id, request: Request, db: Db) -> HTMLResponse:
    """One account: its money, members, deposits, vouchers and recent charges."""
    return _account_page(request, db, require_actor(request), account_id)


@router.post("/billing/accounts/{account_id}/members/{member_id}", response_model=None)
def decide_member(
    account_id: Id, member_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    status: Annotated[str, Form()] = "approved", limit: Annotated[str, Form()] = "",
) -> Response:
    """Approve, decline or revoke a member, and set their personal limit (blank: none)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    try:
        limit_fen = _optional_yuan(limit, "limit")
        with db.unit_of_work() as session:
            accounts.visible_account(session, actor, account_id)
            member = session.get(AccountMember, member_id)
            if member is None or member.account_id != account_id:
                raise NotFound(f"Member {member_id} does not exist.", field="member_id")
            accounts.decide_member(session, actor, member_id, status=status, limit_fen=limit_fen,
                                   clear_limit=limit_fen is None)
    except (InvalidInput, Conflict) as exc:
        return _account_page(request, db, actor, account_id, exc.status_code, error=error_message(exc),
                             error_form=f"member-{member_id}", error_field=_field(exc))
    return redirect(f"/billing/accounts/{account_id}#members", flash=_("Member updated."))


@router.post("/billing/accounts/{account_id}/deposits", response_model=None)
def record_deposit(
    account_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    amount: Annotated[str, Form()] = "", reference: Annotated[str, Form()] = "",
) -> Response:
    """Record money received for a prepaid account (its institution's administrators)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.manage_institution_accounts)
    try:
        amount_fen = parse_yuan(amount, "amount")
        with db.unit_of_work() as session:
            accounts.visible_account(session, actor, account_id)
            accounts.record_deposit(session, actor, account_id, amount_fen, reference=reference)
    except (InvalidInput, Conflict) as exc:
        return _account_page(request, db, actor, account_id, exc.status_code, error=error_message(exc),
                             error_form="deposit", error_field=_field(exc),
                             deposit_form={"amount": amount, "reference": reference})
    return redirect(f"/billing/accounts/{account_id}#deposits",
                    flash=_("Deposit of %(amount)s recorded.") % {"amount": yuan(amount_fen)})


# --- a facility's rates, rules and charges ----------------------------------------------------------------------------


def _facility(session: Session, actor: Actor, facility_id: int) -> Facility:
    facility = session.get(Facility, facility_id)
    if facility is None:
        raise NotFound(f"Facility {facility_id} does not exist.", field="facility_id")
    roles.require(actor, Action.manage_facility_billing, facility=roles.FacilityRef.of(facility))
    return facility


def _empty_rate_form() -> dict[str, str]:
    return {"target": "", "category": "", "assisted": "", "unit": "hour", "amount": "",
            "effective_from": facility_today().isoformat()}


def _facility_page(request: Request, db: Database, actor: Actor, facility_id: int, status_code: int = 200,
                   **context: Any) -> HTMLResponse:
    today = facility_today()
    with db.unit_of_work(write=False) as session:
        facility = _facility(session, actor, facility_id)
        may_edit = roles.authorize(actor, Action.edit_facility_rates, facility=roles.FacilityRef.of(facility))
        instruments = catalog.facility_instruments(session, facility_id)
        services = list(catalog.list_services(session, facility_id=facility_id))
        current = [r for r in rates.list_rates(session, facility_id=facility_id)
                   if r.effective_to is None or r.effective_to > today]
        policy = rates.policy_for(session, facility_id)
        charges = list(ledger.charges_of_facility(session, actor, facility_id, limit=100))
        parts = ledger.parts_of_charges(session, [c.id for c in charges])
        codes = {a.id: a.code for a in (session.get(BillingAccount, i) for i in {c.account_id for c in charges})
                 if a is not None}
        names = user_names(session, [c.user_id for c in charges])
        reversed_ids = {c.reverses_id for c in charges if c.reverses_id is not None}
    targets = [(f"instrument:{i.id}", i) for i in instruments] + [(f"service:{s.id}", s) for s in services]
    by_target = {key: [r for r in current if r.target_key == key] for key, _thing in targets}
    context.setdefault("error", None)
    context.setdefault("error_form", None)
    context.setdefault("error_field", None)
    context.setdefault("rate_form", _empty_rate_form())
    context.setdefault("manual_form", {"account": "", "email": "", "description": "", "amount": "",
                                       "service_date": today.isoformat(), "item_kind": "consultation", "note": ""})
    context.setdefault("correct_form", {"quantity": "", "amount": "", "note": ""})
    return render(
        request, "billing/facility.html", status_code, page_path=f"/manage/billing/facilities/{facility_id}",
        facility=facility, may_edit=may_edit, targets=targets, by_target=by_target, policy=policy,
        charges=charges, parts=parts, codes=codes, names=names, reversed_ids=reversed_ids, today=today,
        categories=list(PayerCategory), units=list(RateUnit), bases=list(ChargeBasis), roundings=list(Rounding),
        item_kinds=list(vouchers.ITEM_KINDS), **context,
    )


@router.get("/manage/billing/facilities/{facility_id}", response_class=HTMLResponse)
def facility_billing(facility_id: Id, request: Request, db: Db) -> HTMLResponse:
    """A facility's rate cards, billing rules and charges (its staff; rates and rules for its managers)."""
    actor = require_actor(request)
    roles.require_some(actor, Action.manage_facility_billing)
    return _facility_page(request, db, actor, facility_id)


def _target_ids(target: str) -> tuple[int | None, int | None]:
    kind, _sep, raw = target.partition(":")
    if kind not in ("instrument", "service") or not (raw.isascii() and raw.isdigit() and len(raw) <= 10) \
            or int(raw) > MAX_ID:
        raise InvalidInput("Choose an instrument or a service.", field="target", code="invalid_choice")
    return (int(raw), None) if kind == "instrument" else (None, int(raw))


@router.post("/manage/billing/facilities/{facility_id}/rates", response_model=None)
def add_rate(
    facility_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    target: Annotated[str, Form()] = "", category: Annotated[str, Form()] = "",
    assisted: Annotated[str, Form()] = "", unit: Annotated[str, Form()] = "hour",
    amount: Annotated[str, Form()] = "", effective_from: Annotated[str, Form()] = "",
) -> Response:
    """Add a price from a day on; the price in force until then ends that day."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.edit_facility_rates)
    form = {"target": target, "category": category, "assisted": assisted, "unit": unit, "amount": amount,
            "effective_from": effective_from}
    try:
        instrument_id, service_id = _target_ids(target)
        amount_fen = parse_yuan(amount, "amount")
        day = parse_day(effective_from, "effective_from")
        if day is None:
            raise InvalidInput("Give the first day of the price.", field="effective_from", code="missing_field")
        with db.unit_of_work() as session:
            _facility(session, actor, facility_id)
            thing: Instrument | Service | None = (session.get(Instrument, instrument_id) if instrument_id
                                                  else session.get(Service, service_id))
            if thing is None or thing.facility_id != facility_id:
                raise InvalidInput("Choose an instrument or a service.", field="target", code="invalid_choice")
            rates.set_rate(session, actor, instrument_id=instrument_id, service_id=service_id, category=category,
                           assisted=bool(assisted), unit=unit, amount_fen=amount_fen, effective_from=day)
    except (InvalidInput, Conflict) as exc:
        return _facility_page(request, db, actor, facility_id, exc.status_code, error=error_message(exc),
                              error_form="rate", error_field=_field(exc), rate_form=form)
    return redirect(f"/manage/billing/facilities/{facility_id}#rates", flash=_("Price added."))


@router.post("/manage/billing/facilities/{facility_id}/policy", response_model=None)
def save_policy(
    facility_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    basis: Annotated[str, Form()] = "booked", increment_minutes: Annotated[str, Form()] = "15",
    rounding: Annotated[str, Form()] = "up", charge_no_show: Annotated[str, Form()] = "",
    require_account: Annotated[str, Form()] = "",
) -> Response:
    """Save the facility's billing rules; a facility charges once it has them."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.edit_facility_rates)
    try:
        increment = parse_int(increment_minutes, "increment_minutes")
        with db.unit_of_work() as session:
            _facility(session, actor, facility_id)
            rates.save_policy(session, actor, facility_id, basis=basis, increment_minutes=increment,
                              rounding=rounding, charge_no_show=bool(charge_no_show),
                              require_account=bool(require_account))
    except InvalidInput as exc:
        return _facility_page(request, db, actor, facility_id, exc.status_code, error=error_message(exc),
                              error_form="policy", error_field=_field(exc))
    return redirect(f"/manage/billing/facilities/{facility_id}#policy", flash=_("Billing rules saved."))


@router.post("/manage/billing/facilities/{facility_id}/charges/{charge_id}/correct", response_model=None)
def correct_charge(
    facility_id: Id, charge_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    quantity: Annotated[str, Form()] = "", amount: Annotated[str, Form()] = "",
    note: Annotated[str, Form()] = "",
) -> Response:
    """Correct a charge by reversing it and posting the corrected one (a new quantity or a new amount)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.manage_facility_billing)
    try:
        new_quantity = parse_int(quantity, "quantity") if quantity.strip() else None
        amount_fen = _optional_yuan(amount, "amount")
        with db.unit_of_work() as session:
            _facility(session, actor, facility_id)
            if ledger.get_charge(session, charge_id).facility_id != facility_id:
                raise NotFound(f"Charge {charge_id} does not exist.", field="charge_id")
            ledger.correct_charge(session, actor, charge_id, note=note, quantity=new_quantity,
                                  amount_fen=amount_fen)
    except (InvalidInput, Conflict) as exc:
        return _facility_page(request, db, actor, facility_id, exc.status_code, error=error_message(exc),
                              error_form=f"correct-{charge_id}", error_field=_field(exc),
                              correct_form={"quantity": quantity, "amount": amount, "note": note})
    return redirect(f"/manage/billing/facilities/{facility_id}#charges", flash=_("Charge corrected."))


def _account_by_code(session: Session, code: str) -> BillingAccount:
    account = accounts.find_by_code(session, code)
    if account is None:
        raise InvalidInput("No account has this code.", field="account", code="not_found")
    return account


@router.post("/manage/billing/facilities/{facility_id}/charges", response_model=None)
def manual_charge(
    facility_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    account: Annotated[str, Form()] = "", email: Annotated[str, Form()] = "",
    description: Annotated[str, Form()] = "", amount: Annotated[str, Form()] = "",
    service_date: Annotated[str, Form()] = "", item_kind: Annotated[str, Form()] = "consultation",
    note: Annotated[str, Form()] = "",
) -> Response:
    """Charge something outside bookings and orders to a member's account."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.manage_facility_billing)
    form = {"account": account, "email": email, "description": description, "amount": amount,
            "service_date": service_date, "item_kind": item_kind, "note": note}
    try:
        amount_fen = parse_yuan(amount, "amount")
        day = parse_day(service_date, "service_date") or facility_today()
        with db.unit_of_work() as session:
            _facility(session, actor, facility_id)
            target = _account_by_code(session, account)
            try:
                user = identity.find_user(session, email)
            except NotFound:
                raise InvalidInput("No user has this e-mail.", field="email", code="not_found") from None
            ledger.post_manual_charge(session, actor, facility_id=facility_id, account_id=target.id,
                                      user_id=user.id, description=description, amount_fen=amount_fen,
                                      service_date=day, item_kind=item_kind, note=note)
    except (InvalidInput, Conflict) as exc:
        return _facility_page(request, db, actor, facility_id, exc.status_code, error=error_message(exc),
                              error_form="manual", error_field=_field(exc), manual_form=form)
    return redirect(f"/manage/billing/facilities/{facility_id}#charges", flash=_("Charge posted."))


# --- a region's vouchers -------------------------------------------------------------------------------------------


def _authority_regions(session: Session, actor: Actor) -> list[str]:
    if roles.is_platform_admin(actor):
        return [r.code for r in catalog.list_regions(session)]
    return sorted({g.region_code for g in actor.grants if g.role == "region_authority" and g.region_code})


def _vouchers_page(request: Request, db: Database, actor: Actor, status_code: int = 200,
                   **context: Any) -> HTMLResponse:
    roles.require_some(actor, Action.issue_vouchers)
    today = facility_today()
    with db.unit_of_work(write=False) as session:
        mine = _authority_regions(session, actor)
        all_regions = list(catalog.list_regions(session))
        issued = [v for code in mine for v in vouchers.vouchers_of_region(session, code)]
        codes = {a.id: a.code for a in (session.get(BillingAccount, i) for i in {v.account_id for v in issued})
                 if a is not None}
        accepted = {(r.issuer_region_code, r.provider_region_code) for r in vouchers.recognitions(session)}
    context.setdefault("error", None)
    context.setdefault("error_field", None)
    context.setdefault("form", {"region": mine[0] if mine else "", "account": "", "name": "", "amount": "",
                                "share": "50", "valid_from": today.isoformat(),
                                "valid_until": (today + timedelta(days=365)).isoformat(),
                                "eligible_kinds": [], "eligible_categories": ""})
    return render(request, "billing/vouchers.html", status_code, page_path="/manage/vouchers", regions=mine,
                  all_regions=all_regions, issued=issued, codes=codes, accepted=accepted, today=today,
                  item_kinds=list(vouchers.ITEM_KINDS), **context)


@router.get("/manage/vouchers", response_class=HTMLResponse)
def vouchers_page(request: Request, db: Db) -> HTMLResponse:
    """A region authority's vouchers with their balances, the issue form and the recognition matrix."""
    return _vouchers_page(request, db, require_actor(request))


@router.post("/manage/vouchers", response_model=None)
def issue_voucher(
    request: Request, db: Db, csrf_token: Annotated[str, Form()] = "", region: Annotated[str, Form()] = "",
    account: Annotated[str, Form()] = "", name: Annotated[str, Form()] = "", amount: Annotated[str, Form()] = "",
    share: Annotated[str, Form()] = "50", valid_from: Annotated[str, Form()] = "",
    valid_until: Annotated[str, Form()] = "", eligible_kinds: Annotated[list[str] | None, Form()] = None,
    eligible_categories: Annotated[str, Form()] = "",
) -> Response:
    """Issue a voucher of the region to an account named by its code."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.issue_vouchers)
    form = {"region": region, "account": account, "name": name, "amount": amount, "share": share,
            "valid_from": valid_from, "valid_until": valid_until, "eligible_kinds": eligible_kinds or [],
            "eligible_categories": eligible_categories}
    try:
        amount_fen = parse_yuan(amount, "amount")
        percent = parse_int(share, "share")
        if not 1 <= percent <= 100:
            raise InvalidInput("The share is 1 to 100 percent.", field="share", code="out_of_range")
        starts = parse_day(valid_from, "valid_from")
        ends = parse_day(valid_until, "valid_until")
        if starts is None or ends is None:
            raise InvalidInput("Give the validity.", field="valid_until" if starts else "valid_from",
                               code="missing_field")
        with db.unit_of_work() as session:
            holder = _account_by_code(session, account)
            voucher = vouchers.issue_voucher(
                session, actor, issuer_region_code=region, account_id=holder.id, amount_fen=amount_fen,
                valid_from=starts, valid_until=ends, share_bp=percent * 100, name=name,
                eligible_kinds=eligible_kinds or [], eligible_categories=eligible_categories,
            )
            code = voucher.code
    except (InvalidInput, Conflict, NotFound, Forbidden) as exc:
        return _vouchers_page(request, db, actor, exc.status_code, error=error_message(exc),
                              error_field=_field(exc), form=form)
    return redirect("/manage/vouchers", flash=_("Voucher %(code)s issued.") % {"code": code})


@router.post("/manage/vouchers/{voucher_id}/revoke", response_model=None)
def revoke_voucher(voucher_id: Id, request: Request, db: Db, csrf_token: Annotated[str, Form()] = "") -> Response:
    """Stop a voucher paying for new charges."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.issue_vouchers)
    with db.unit_of_work() as session:
        voucher = vouchers.revoke_voucher(session, actor, voucher_id)
        code = voucher.code
    return redirect("/manage/vouchers", flash=_("Voucher %(code)s revoked.") % {"code": code})


@router.post("/manage/vouchers/recognition", response_model=None)
def set_recognition(
    request: Request, db: Db, csrf_token: Annotated[str, Form()] = "", issuer: Annotated[str, Form()] = "",
    provider: Annotated[str, Form()] = "", accepted: Annotated[str, Form()] = "",
) -> Response:
    """Accept or stop accepting another region's vouchers at the providers of one's region."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require_some(actor, Action.issue_vouchers)
    with db.unit_of_work() as session:
        vouchers.set_recognition(session, actor, issuer, provider, accepted == "1")
    text = (_("Providers of %(provider)s now accept vouchers of %(issuer)s.") if accepted == "1"
            else _("Providers of %(provider)s no longer accept vouchers of %(issuer)s."))
    return redirect("/manage/vouchers#recognition", flash=text % {"provider": provider, "issuer": issuer})


# --- the account choice in the booking and order forms ---------------------------------------------------


@dataclass(frozen=True)
class PriceFor:
    account: BillingAccount
    category: PayerCategory
    unit_fen: int | None
    unit: RateUnit | None
    estimate_fen: int | None


@dataclass(frozen=True)
class ChargeChoice:
    """What a booking or order form shows when its facility charges: the rate card and the user's accounts."""

    required: bool
    rates: list[Any]
    prices: list[PriceFor]


def _form_minutes(form: dict[str, str] | None) -> int | None:
    """The length the booking form asks for, when it can be read (a length, or start and end on one day)."""
    form = form or {}
    duration = (form.get("duration") or "").strip()
    if duration.isascii() and duration.isdigit() and len(duration) <= 6:
        return int(duration)
    try:
        start, end = time.fromisoformat(form.get("start", "").strip()), time.fromisoformat(form.get("end", "").strip())
    except ValueError:
        return None
    minutes = (end.hour * 60 + end.minute) - (start.hour * 60 + start.minute)
    return minutes if minutes > 0 else None


def instrument_charge_choice(request: Request, instrument: Instrument,
                             form: dict[str, str] | None = None) -> ChargeChoice | None:
    """For the instrument page: None when its facility charges nothing or nobody is signed in."""
    actor = page_actor(request)
    if actor is None:
        return None
    db: Database = request.app.state.db
    today = facility_today()
    minutes = _form_minutes(form)
    with db.unit_of_work(write=False) as session:
        policy = rates.policy_for(session, instrument.facility_id)
        if policy is None:
            return None
        key = rates.target_key(instrument_id=instrument.id)
        card = list(rates.list_rates(session, key=key, on=today))
        prices = []
        for account in accounts.accounts_of(session, actor.user_id, usable_on=today):
            payer = session.get(Institution, account.institution_id)
            assert payer is not None
            category = rates.payer_category(payer, instrument.institution_id, instrument.region_code)
            rate = rates.rate_on(session, key, category, False, today)
            estimate = None
            if minutes is not None and rate is not None:
                billed = rates.billed_minutes(policy, booked=minutes, actual=None, no_show=False)
                priced = ledger.price_instrument(session, instrument, account, actor.user_id, minutes=billed,
                                                 assisted=False, on=today)
                estimate = priced.amount_fen if priced is not None else None
            prices.append(PriceFor(account, category, rate.amount_fen if rate else None,
                                   rate.unit if rate else None, estimate))
    return ChargeChoice(policy.require_account, card, prices)


def service_charge_choice(request: Request, svc: Service) -> ChargeChoice | None:
    """For the order form: None when the service's facility charges nothing or nobody is signed in."""
    actor = page_actor(request)
    if actor is None:
        return None
    db: Database = request.app.state.db
    today = facility_today()
    with db.unit_of_work(write=False) as session:
        policy = rates.policy_for(session, svc.facility_id)
        if policy is None:
            return None
        card = list(rates.list_rates(session, key=rates.target_key(service_id=svc.id), on=today))
        prices = []
        for account in accounts.accounts_of(session, actor.user_id, usable_on=today):
            payer = session.get(Institution, account.institution_id)
            provider = session.get(Institution, svc.facility.institution_id)
            assert payer is not None and provider is not None
            found = ledger.service_rate(session, svc, account, today)
            prices.append(PriceFor(account, rates.payer_category(payer, provider.id, provider.region_code),
                                   found[0] if found else None, found[1] if found else None, None))
    return ChargeChoice(policy.require_account, card, prices)


def form_account_id(text: str) -> int | None:
    """The account chosen in a booking or order form; None for the default choice."""
    text = text.strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > MAX_ID:
        raise InvalidInput("Choose one of your accounts.", field="account_id", code="account_not_usable")
    return int(text)


def booking_hold_text(session: Session, booking_id: int) -> str:
    """" Estimated cost ¥X, held on account C." for a new booking of a charging facility, else ""."""
    hold = accounts.hold_for(session, (SourceKind.booking, booking_id))
    if hold is None:
        return ""
    account = session.get(BillingAccount, hold.account_id)
    return " " + _("Estimated cost %(amount)s, held on account %(code)s.") % {
        "amount": yuan(hold.amount_fen), "code": account.code if account else ""}


env.globals["instrument_charge_choice"] = instrument_charge_choice
env.globals["service_charge_choice"] = service_charge_choice
