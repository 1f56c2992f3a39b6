"""Billing endpoints under /api/v1/billing: rate cards and facility rules, funding accounts and their members,
deposits and holds, innovation vouchers and their recognition, and the charge ledger.

Reads need the token scope `billing:read`, writes `billing:write`; every POST takes an Idempotency-Key.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing import accounts, ledger, rates, vouchers
from labcommons.billing.models import BillingAccount, Charge, Voucher
from labcommons.billing.schemas import (
    AccountCreate,
    AccountJoin,
    AccountList,
    AccountRead,
    AccountSummary,
    AccountUpdate,
    BillingPolicyRead,
    BillingPolicyUpdate,
    ChargeCorrected,
    ChargeCorrection,
    ChargePage,
    ChargeRead,
    ChargeReversal,
    DepositCreate,
    DepositList,
    DepositRead,
    HoldList,
    HoldRead,
    ManualChargeCreate,
    MemberCreate,
    MemberDecision,
    MemberList,
    MemberRead,
    PriceRead,
    RateCreate,
    RateList,
    RateRead,
    RecognitionList,
    RecognitionRead,
    RecognitionUpdate,
    VoucherCreate,
    VoucherDetail,
    VoucherList,
    VoucherRead,
)
from labcommons.booking import policy as booking_policy
from labcommons.booking.models import QualificationLevel
from labcommons.catalog import service as catalog
from labcommons.db import MAX_ID, utcnow
from labcommons.errors import Forbidden, InvalidInput, NotFound
from labcommons.http import Day, Db, Id, IdempotencyKey, Instant, idempotent_post, link, require_role_for, require_scope
from labcommons.idempotency import Outcome
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.identity.roles import Action
from labcommons.orders.service import user_names

router = APIRouter(prefix="/billing", tags=["billing"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "The caller's roles do not allow it (e.g. another region's authority, a member who does "
                         "not manage the account), or the token lacks the scope"},
    404: {"description": "Unknown item, or one the caller may not see"},
    409: {"description": "Conflicts with the current state: `rate_exists`, `code_taken`, `not_prepaid`, "
                         "`owner_member`, `already_reversed`, `charge_not_correctable`"},
    422: {"description": "Invalid input; `field` names it and `error` the rule (e.g. `in_past`, `out_of_range`, "
                         "`account_required`, `spending_limit_exceeded`)"},
}
Reader = Annotated[Actor, Depends(require_scope("billing:read"))]
Writer = Annotated[Actor, Depends(require_scope("billing:write"))]
Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=200)]


RatesWriter = Annotated[Actor, Depends(require_role_for("billing:write", Action.edit_facility_rates))]
StaffReader = Annotated[Actor, Depends(require_role_for("billing:read", Action.manage_facility_billing))]
StaffWriter = Annotated[Actor, Depends(require_role_for("billing:write", Action.manage_facility_billing))]
AuthorityReader = Annotated[Actor, Depends(require_role_for("billing:read", Action.issue_vouchers))]
AuthorityWriter = Annotated[Actor, Depends(require_role_for("billing:write", Action.issue_vouchers))]
InstitutionWriter = Annotated[Actor, Depends(require_role_for("billing:write", Action.manage_institution_accounts))]


def _today() -> date:
    return ledger.local_day(utcnow())


def _managed(session: Session, actor: Actor, account_id: int) -> BillingAccount:
    """An account the actor manages: 404 when they may not see it, 403 when they are only a member."""
    account = accounts.visible_account(session, actor, account_id)
    if not accounts.may_manage(actor, account):
        raise Forbidden("Only the account's owner or its institution's administrators may do this.",
                        field="account_id")
    return account


def _charge_read(session: Session, charge: Charge) -> ChargeRead:
    return ChargeRead.of(charge, ledger.parts_of(session, charge.id))


def _charge_page(rows: list[Charge], next_cursor: str | None, session: Session) -> ChargePage:
    parts = ledger.parts_of_charges(session, [c.id for c in rows])
    return ChargePage(items=[ChargeRead.of(c, parts[c.id]) for c in rows], next_cursor=next_cursor)


def _readable_charge(session: Session, actor: Actor, charge_id: int) -> Charge:
    """A charge the actor may read: its account's readers and its facility's billing staff; 404 otherwise."""
    charge = ledger.get_charge(session, charge_id)
    try:
        ledger.require_account_reader(session, actor, charge.account_id)
    except NotFound:
        try:
            ledger.require_facility_billing(session, actor, charge.facility_id)
        except Forbidden:
            raise NotFound(f"Charge {charge_id} does not exist.", field="charge_id") from None
    return charge


# --- rate cards and billing rules -----------------------------------------------------------------------------


@router.get("/facilities/{facility_id}/policy", response_model=BillingPolicyRead, responses=ERRORS)
def get_policy(facility_id: Id, db: Db) -> BillingPolicyRead:
    """The facility's billing rules (public); `charges: false` when it charges nothing."""
    with db.unit_of_work(write=False) as session:
        rates.get_facility(session, facility_id)
        return BillingPolicyRead.of(facility_id, rates.policy_for(session, facility_id))


@router.put("/facilities/{facility_id}/policy", response_model=BillingPolicyRead, responses=ERRORS)
def put_policy(facility_id: Id, body: BillingPolicyUpdate, actor: RatesWriter, db: Db) -> BillingPolicyRead:
    """Create or change the facility's billing rules (its managers); from then on it charges."""
    with db.unit_of_work() as session:
        policy = rates.save_policy(session, actor, facility_id, **body.model_dump(exclude_none=True))
        return BillingPolicyRead.of(facility_id, policy)


@router.get("/facilities/{facility_id}/rates", response_model=RateList, responses=ERRORS)
def facility_rates(facility_id: Id, db: Db, on: Day | None = None) -> RateList:
    """Every rate of the facility's instruments and services, past and future; with `on`, those in force that
    day (public)."""
    with db.unit_of_work(write=False) as session:
        rates.get_facility(session, facility_id)
        return RateList(items=[RateRead.of(r) for r in rates.list_rates(session, facility_id=facility_id, on=on)])


@router.post("/rates", status_code=201, response_model=RateRead, responses=ERRORS)
def create_rate(body: RateCreate, request: Request, actor: RatesWriter, db: Db,
                idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Add a price from a day on (not in the past); the price it follows ends that day."""

    def work(session: Session) -> Outcome:
        rate = rates.set_rate(session, actor, **body.model_dump())
        return Outcome(201, RateRead.of(rate).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/instruments/{instrument_id}/rates", response_model=RateList, responses=ERRORS)
def instrument_rates(instrument_id: Id, db: Db) -> RateList:
    """The instrument's rate card in force today, every category (public)."""
    with db.unit_of_work(write=False) as session:
        catalog.get_instrument(session, instrument_id)
        found = rates.list_rates(session, key=rates.target_key(instrument_id=instrument_id), on=_today())
        return RateList(items=[RateRead.of(r) for r in found])


@router.get("/services/{service_id}/rates", response_model=RateList, responses=ERRORS)
def service_rates(service_id: Id, db: Db) -> RateList:
    """The service's rate card in force today, every category (public)."""
    with db.unit_of_work(write=False) as session:
        catalog.load_service(session, service_id)
        found = rates.list_rates(session, key=rates.target_key(service_id=service_id), on=_today())
        return RateList(items=[RateRead.of(r) for r in found])


@router.get("/instruments/{instrument_id}/price", response_model=PriceRead, responses=ERRORS)
def instrument_price(
    instrument_id: Id, actor: Reader, db: Db, starts_at: Instant, ends_at: Instant,
    account_id: Annotated[int | None, Query(gt=0, le=MAX_ID)] = None,
) -> PriceRead:
    """What booking [starts_at, ends_at) would cost the caller on an account (their only one when omitted):
    list price, talent discount, net and what their vouchers would pay."""
    if ends_at <= starts_at:
        raise InvalidInput("The end must be after the start.", field="ends_at", code="ends_before_start")
    with db.unit_of_work(write=False) as session:
        instrument = catalog.get_instrument(session, instrument_id)
        policy = rates.policy_for(session, instrument.facility_id)
        if policy is None:
            return PriceRead.free(instrument_id, account_id, charges=False)
        account = accounts.resolve_account(session, actor.user_id, account_id, required=True, today=_today())
        assert account is not None  # required=True raises instead
        booked = int((ends_at - starts_at).total_seconds() // 60)
        minutes = rates.billed_minutes(policy, booked=booked, actual=None, no_show=False)
        level = booking_policy.live_qualification_level(session, actor.user_id, instrument, now=starts_at)
        on = ledger.local_day(starts_at)
        priced = ledger.price_instrument(session, instrument, account, actor.user_id, minutes=minutes,
                                         assisted=level == QualificationLevel.assisted, on=on)
        if priced is None:
            return PriceRead.free(instrument_id, account.id, charges=True)
        voucher = vouchers.estimate_cover(session, account.id, provider_region_code=instrument.region_code,
                                          item_kind="instrument", category_code=instrument.category_code,
                                          amount_fen=max(0, priced.amount_fen), on=on)
        return PriceRead.of(instrument_id, account.id, priced, voucher)


# --- accounts -------------------------------------------------------------------------------------------------


@router.post("/accounts", status_code=201, response_model=AccountRead, responses={**ERRORS, 201: {
    "description": "The account",
    # OpenAPI links: what a client (and the stateful fuzzer) can do next with the account it opened.
    "links": {
        "GetAccount": link("get_account_api_v1_billing_accounts__account_id__get", account_id="id"),
        "UpdateAccount": link("update_account_api_v1_billing_accounts__account_id__patch", account_id="id"),
        "AddMember": link("add_member_api_v1_billing_accounts__account_id__members_post", account_id="id"),
        "RecordDeposit": link("record_deposit_api_v1_billing_accounts__account_id__deposits_post", account_id="id"),
        "AccountSummary": link("account_summary_api_v1_billing_accounts__account_id__summary_get", account_id="id"),
    }}})
def create_account(body: AccountCreate, request: Request, actor: Writer, db: Db,
                   idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Open a funding account owned by the caller, who becomes its first member."""

    def work(session: Session) -> Outcome:
        account = accounts.create_account(session, actor, **body.model_dump())
        return Outcome(201, AccountRead.of(account, can_manage=True).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/accounts", response_model=AccountList, responses=ERRORS)
def list_accounts(actor: Reader, db: Db) -> AccountList:
    """The accounts the caller is an approved member of or manages, by code."""
    with db.unit_of_work(write=False) as session:
        managed = accounts.managed_accounts(session, actor)
        found = {a.id: a for a in [*accounts.accounts_of(session, actor.user_id), *managed]}
        ids = {a.id for a in managed}
        items = sorted(found.values(), key=lambda a: a.code)
        return AccountList(items=[AccountRead.of(a, can_manage=a.id in ids) for a in items])


@router.post("/accounts/join", response_model=MemberRead, responses=ERRORS)
def join_account(body: AccountJoin, request: Request, actor: Writer, db: Db,
                 idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Ask to charge to an account by its code; its owner decides."""

    def work(session: Session) -> Outcome:
        member = accounts.request_membership(session, actor, body.code)
        names = user_names(session, [member.user_id])
        return Outcome(200, MemberRead.of(member, names).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/accounts/{account_id}", response_model=AccountRead, responses=ERRORS)
def get_account(account_id: Id, actor: Reader, db: Db) -> AccountRead:
    """One account of its owner, members and administrators."""
    with db.unit_of_work(write=False) as session:
        account = accounts.visible_account(session, actor, account_id)
        return AccountRead.of(account, can_manage=accounts.may_manage(actor, account))


@router.patch("/accounts/{account_id}", response_model=AccountRead, responses=ERRORS)
def update_account(account_id: Id, body: AccountUpdate, actor: Writer, db: Db) -> AccountRead:
    """Rename, limit (`limit_fen: null` removes the limit), extend, suspend or close an account (its managers)."""
    with db.unit_of_work() as session:
        _managed(session, actor, account_id)
        given = body.model_fields_set
        account = accounts.update_account(
            session, actor, account_id, name=body.name, limit_fen=body.limit_fen,
            clear_limit="limit_fen" in given and body.limit_fen is None, valid_until=body.valid_until,
            status=body.status,
        )
        return AccountRead.of(account, can_manage=True)


@router.get("/accounts/{account_id}/summary", response_model=AccountSummary, responses=ERRORS)
def account_summary(account_id: Id, actor: Reader, db: Db) -> AccountSummary:
    """The account's limit, what it spent and holds, what is still available, its prepaid and voucher balances."""
    with db.unit_of_work(write=False) as session:
        account = accounts.visible_account(session, actor, account_id)
        return AccountSummary.of(account, accounts.commitments(session, account.id),
                                 accounts.voucher_balance(session, account.id, _today()))


@router.get("/accounts/{account_id}/members", response_model=MemberList, responses=ERRORS)
def list_members(account_id: Id, actor: Reader, db: Db) -> MemberList:
    """Members and requests of an account (its managers)."""
    with db.unit_of_work(write=False) as session:
        _managed(session, actor, account_id)
        rows = accounts.members(session, account_id)
        names = user_names(session, [m.user_id for m in rows])
        return MemberList(items=[MemberRead.of(m, names) for m in rows])


@router.post("/accounts/{account_id}/members", status_code=201, response_model=MemberRead, responses=ERRORS)
def add_member(account_id: Id, body: MemberCreate, request: Request, actor: Writer, db: Db,
               idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Add a user by e-mail as an approved member (the account's managers)."""

    def work(session: Session) -> Outcome:
        # The account first: someone who may not manage it learns nothing about who has an e-mail address.
        _managed(session, actor, account_id)
        user = identity.find_user(session, body.email)
        member = accounts.add_member(session, actor, account_id, user.id, limit_fen=body.limit_fen)
        return Outcome(201, MemberRead.of(member, {user.id: user.name}).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.post("/members/{member_id}/decision", response_model=MemberRead, responses=ERRORS)
def decide_member(member_id: Id, body: MemberDecision, request: Request, actor: Writer, db: Db,
                  idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Approve, decline or revoke a member, or change their limit (`limit_fen: null` removes it)."""
    clear = "limit_fen" in body.model_fields_set and body.limit_fen is None

    def work(session: Session) -> Outcome:
        member = accounts.decide_member(session, actor, member_id, status=body.status, limit_fen=body.limit_fen,
                                        clear_limit=clear)
        return Outcome(200, MemberRead.of(member, user_names(session, [member.user_id])).model_dump(mode="json"))

    payload = {**body.model_dump(mode="json"), "clear_limit": clear}
    return idempotent_post(request, db, actor, idempotency_key, payload, work)


@router.post("/accounts/{account_id}/deposits", status_code=201, response_model=DepositRead, responses=ERRORS)
def record_deposit(account_id: Id, body: DepositCreate, request: Request, actor: InstitutionWriter, db: Db,
                   idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Record money received for a prepaid account (its institution's administrators)."""

    def work(session: Session) -> Outcome:
        deposit = accounts.record_deposit(session, actor, account_id, body.amount_fen, reference=body.reference)
        return Outcome(201, DepositRead.of(deposit).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/accounts/{account_id}/deposits", response_model=DepositList, responses=ERRORS)
def list_deposits(account_id: Id, actor: Reader, db: Db) -> DepositList:
    """Deposits into the account, newest first."""
    with db.unit_of_work(write=False) as session:
        accounts.visible_account(session, actor, account_id)
        return DepositList(items=[DepositRead.of(d) for d in accounts.deposits(session, account_id)])


@router.get("/accounts/{account_id}/charges", response_model=ChargePage, responses=ERRORS)
def account_charges(account_id: Id, actor: Reader, db: Db, limit: Limit = 50, cursor: Cursor = None) -> ChargePage:
    """The account's ledger, newest first, each charge with its voucher, prepaid and invoice parts."""
    with db.unit_of_work(write=False) as session:
        ledger.require_account_reader(session, actor, account_id)
        return _charge_page(*ledger.charges_page(session, account_id=account_id, limit=limit, cursor=cursor),
                            session)


@router.get("/accounts/{account_id}/holds", response_model=HoldList, responses=ERRORS)
def account_holds(account_id: Id, actor: Reader, db: Db) -> HoldList:
    """Open holds: estimates of bookings and accepted orders not charged yet, counting against the limits."""
    with db.unit_of_work(write=False) as session:
        accounts.visible_account(session, actor, account_id)
        return HoldList(items=[HoldRead.of(h) for h in accounts.open_holds_of(session, account_id)])


@router.get("/accounts/{account_id}/vouchers", response_model=VoucherList, responses=ERRORS)
def account_vouchers(account_id: Id, actor: Reader, db: Db) -> VoucherList:
    """The vouchers held on the account."""
    with db.unit_of_work(write=False) as session:
        accounts.visible_account(session, actor, account_id)
        return VoucherList(items=[VoucherRead.of(v) for v in vouchers.vouchers_of_account(session, account_id)])


# --- vouchers and recognition ---------------------------------------------------------------------------------


def _readable_voucher(session: Session, actor: Actor, voucher_id: int) -> Voucher:
    """A voucher its issuing region's authority or its account's readers may see; 404 otherwise."""
    voucher = vouchers.get_voucher(session, voucher_id)
    if roles.authorize(actor, Action.issue_vouchers, region_code=voucher.issuer_region_code):
        return voucher
    try:
        accounts.visible_account(session, actor, voucher.account_id)
    except NotFound:
        raise NotFound(f"Voucher {voucher_id} does not exist.", field="voucher_id") from None
    return voucher


@router.post("/vouchers", status_code=201, response_model=VoucherRead, responses=ERRORS)
def issue_voucher(body: VoucherCreate, request: Request, actor: AuthorityWriter, db: Db,
                  idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Issue a voucher of the caller's region to an account; its balance starts at the amount."""

    def work(session: Session) -> Outcome:
        voucher = vouchers.issue_voucher(session, actor, **body.model_dump())
        return Outcome(201, VoucherRead.of(voucher).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/vouchers", response_model=VoucherList, responses=ERRORS)
def list_vouchers(actor: AuthorityReader, db: Db,
                  region: Annotated[str | None, Query(min_length=1, max_length=16)] = None) -> VoucherList:
    """Vouchers a region issued, newest first; without `region`, those of the regions the caller is authority of."""
    if region is not None:
        if not roles.authorize(actor, Action.issue_vouchers, region_code=region):
            raise Forbidden(f"Only {region}'s authority may list its vouchers.", field="region")
        regions = [region]
    else:
        regions = sorted({g.region_code for g in actor.grants if g.role == "region_authority" and g.region_code})
        if not regions:
            raise InvalidInput("Name the region.", field="region", code="missing_field")
    with db.unit_of_work(write=False) as session:
        return VoucherList(items=[VoucherRead.of(v) for r in regions for v in vouchers.vouchers_of_region(session, r)])


@router.get("/vouchers/{voucher_id}", response_model=VoucherDetail, responses=ERRORS)
def get_voucher(voucher_id: Id, actor: Reader, db: Db) -> VoucherDetail:
    """One voucher with its redemptions (its issuing authority and its account's readers)."""
    with db.unit_of_work(write=False) as session:
        voucher = _readable_voucher(session, actor, voucher_id)
        return VoucherDetail.with_redemptions(voucher, list(vouchers.redemptions(session, voucher.id)))


@router.post("/vouchers/{voucher_id}/revoke", response_model=VoucherRead, responses=ERRORS)
def revoke_voucher(voucher_id: Id, request: Request, actor: AuthorityWriter, db: Db,
                   idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Stop a voucher paying for new charges (its issuing authority); what it paid stays paid."""

    def work(session: Session) -> Outcome:
        voucher = _readable_voucher(session, actor, voucher_id)
        voucher = vouchers.revoke_voucher(session, actor, voucher.id)
        return Outcome(200, VoucherRead.of(voucher).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, None, work)


@router.get("/voucher-recognition", response_model=RecognitionList, responses=ERRORS)
def list_recognition(db: Db) -> RecognitionList:
    """Which regions' providers accept which regions' vouchers (public)."""
    with db.unit_of_work(write=False) as session:
        return RecognitionList(items=[RecognitionRead.of(r) for r in vouchers.recognitions(session)])


@router.put("/voucher-recognition", response_model=RecognitionList, responses=ERRORS)
def put_recognition(body: RecognitionUpdate, actor: AuthorityWriter, db: Db) -> RecognitionList:
    """Whether the providers of a region accept another region's vouchers (the providers' region authority)."""
    with db.unit_of_work() as session:
        vouchers.set_recognition(session, actor, body.issuer_region_code, body.provider_region_code, body.accepted)
        return RecognitionList(items=[RecognitionRead.of(r) for r in vouchers.recognitions(session)])


# --- charges --------------------------------------------------------------------------------------------------


@router.get("/facilities/{facility_id}/charges", response_model=ChargePage, responses=ERRORS)
def facility_charges(facility_id: Id, actor: StaffReader, db: Db, limit: Limit = 50,
                     cursor: Cursor = None) -> ChargePage:
    """The facility's charges, newest first (its billing staff)."""
    with db.unit_of_work(write=False) as session:
        ledger.require_facility_billing(session, actor, facility_id)
        return _charge_page(*ledger.charges_page(session, facility_id=facility_id, limit=limit, cursor=cursor),
                            session)


@router.get("/charges/{charge_id}", response_model=ChargeRead, responses=ERRORS)
def get_charge(charge_id: Id, actor: Reader, db: Db) -> ChargeRead:
    """One charge with its parts (its account's readers and its facility's billing staff)."""
    with db.unit_of_work(write=False) as session:
        return _charge_read(session, _readable_charge(session, actor, charge_id))


@router.post("/charges", status_code=201, response_model=ChargeRead, responses=ERRORS)
def post_manual_charge(body: ManualChargeCreate, request: Request, actor: StaffWriter, db: Db,
                       idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Charge something outside bookings and orders (facility billing staff) to a member's account."""

    def work(session: Session) -> Outcome:
        ledger.require_facility_billing(session, actor, body.facility_id)
        user = identity.find_user(session, body.user_email)
        fields = body.model_dump(exclude={"user_email"})
        charge = ledger.post_manual_charge(session, actor, user_id=user.id, **fields)
        return Outcome(201, _charge_read(session, charge).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.post("/charges/{charge_id}/reversal", status_code=201, response_model=ChargeRead, responses=ERRORS)
def reverse_charge(charge_id: Id, body: ChargeReversal, request: Request, actor: StaffWriter, db: Db,
                   idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Cancel a charge by a reversing entry that gives back what each part paid (facility billing staff)."""

    def work(session: Session) -> Outcome:
        _readable_charge(session, actor, charge_id)
        reversal = ledger.reverse_charge(session, actor, charge_id, note=body.note)
        return Outcome(201, _charge_read(session, reversal).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.post("/charges/{charge_id}/correction", status_code=201, response_model=ChargeCorrected, responses=ERRORS)
def correct_charge(charge_id: Id, body: ChargeCorrection, request: Request, actor: StaffWriter, db: Db,
                   idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Reverse a charge and post its replacement with a new quantity or a new net amount (give one)."""
    if body.quantity is not None and body.amount_fen is not None:
        raise InvalidInput("Give the corrected quantity or the amount, not both.", field="amount_fen",
                           code="one_of")

    def work(session: Session) -> Outcome:
        _readable_charge(session, actor, charge_id)
        reversal, replacement = ledger.correct_charge(session, actor, charge_id, note=body.note,
                                                      quantity=body.quantity, amount_fen=body.amount_fen)
        answer = ChargeCorrected(reversal=_charge_read(session, reversal),
                                 replacement=None if replacement is None else _charge_read(session, replacement))
        return Outcome(201, answer.model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)
