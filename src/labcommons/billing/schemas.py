"""API shapes of billing: rate cards, facility billing rules, funding accounts, members, deposits, holds, vouchers,
voucher recognition and charges. Money is integer fen (`*_fen`); a float or a boolean for a number is refused."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from labcommons.billing.accounts import MAX_AMOUNT_FEN, Commitments
from labcommons.billing.ledger import ChargeParts, Priced
from labcommons.billing.models import (
    AccountDeposit,
    AccountKind,
    AccountMember,
    AccountStatus,
    BillingAccount,
    BillingHold,
    BillingPolicy,
    Charge,
    ChargeBasis,
    MemberStatus,
    PayerCategory,
    Rate,
    RateUnit,
    Rounding,
    SourceKind,
    Voucher,
    VoucherRecognition,
    VoucherRedemption,
    VoucherStatus,
)
from labcommons.billing.rates import MAX_RATE_FEN
from labcommons.db import MAX_ID
from labcommons.http import Day

DbId = Annotated[StrictInt, Field(gt=0, le=MAX_ID)]
Fen = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_FEN)]
PositiveFen = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT_FEN)]
Note = Annotated[str, Field(min_length=1, max_length=2000)]
RegionCode = Annotated[str, Field(min_length=1, max_length=16)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- rates and policies ---------------------------------------------------------------------------------------


class RateCreate(_Input):
    """A price of one instrument or one service for one payer category, from a day on."""

    instrument_id: DbId | None = None
    service_id: DbId | None = None
    category: PayerCategory
    assisted: StrictBool = False
    unit: RateUnit
    amount_fen: Annotated[StrictInt, Field(ge=0, le=MAX_RATE_FEN)]
    effective_from: Day


class RateRead(BaseModel):
    id: int
    facility_id: int
    instrument_id: int | None
    service_id: int | None
    category: PayerCategory
    assisted: bool
    unit: RateUnit
    amount_fen: int
    effective_from: date
    effective_to: date | None = Field(description="First day the rate no longer applies; null: open-ended")

    @classmethod
    def of(cls, r: Rate) -> RateRead:
        return cls(id=r.id, facility_id=r.facility_id, instrument_id=r.instrument_id, service_id=r.service_id,
                   category=r.category, assisted=r.assisted, unit=r.unit, amount_fen=r.amount_fen,
                   effective_from=r.effective_from, effective_to=r.effective_to)


class RateList(BaseModel):
    items: list[RateRead]


class BillingPolicyUpdate(_Input):
    """A facility's billing rules; an omitted rule keeps its value (or its default for a new policy)."""

    basis: ChargeBasis | None = None
    increment_minutes: Annotated[StrictInt, Field(ge=1, le=240)] | None = None
    rounding: Rounding | None = None
    charge_no_show: StrictBool | None = None
    require_account: StrictBool | None = None


class BillingPolicyRead(BaseModel):
    facility_id: int
    charges: bool = Field(description="False: the facility has no billing policy and charges nothing")
    basis: ChargeBasis | None
    increment_minutes: int | None
    rounding: Rounding | None
    charge_no_show: bool | None
    require_account: bool | None
    updated_at: datetime | None

    @classmethod
    def of(cls, facility_id: int, p: BillingPolicy | None) -> BillingPolicyRead:
        if p is None:
            return cls(facility_id=facility_id, charges=False, basis=None, increment_minutes=None, rounding=None,
                       charge_no_show=None, require_account=None, updated_at=None)
        return cls(facility_id=facility_id, charges=True, basis=p.basis, increment_minutes=p.increment_minutes,
                   rounding=p.rounding, charge_no_show=p.charge_no_show, require_account=p.require_account,
                   updated_at=p.updated_at)


class PriceRead(BaseModel):
    """What a booking would cost the caller on an account: list price, talent discount, net, voucher estimate."""

    instrument_id: int
    account_id: int | None
    charges: bool
    category: PayerCategory | None
    assisted: bool
    rate_id: int | None
    unit: RateUnit | None
    quantity: int = Field(description="Billed minutes for hourly rates, a count otherwise")
    unit_amount_fen: int
    list_amount_fen: int
    discount_fen: int
    discount_reason: str
    amount_fen: int = Field(description="Net: list minus discount")
    voucher_estimate_fen: int = Field(description="What the account's vouchers would pay of it today")

    @classmethod
    def free(cls, instrument_id: int, account_id: int | None, *, charges: bool) -> PriceRead:
        return cls(instrument_id=instrument_id, account_id=account_id, charges=charges, category=None,
                   assisted=False, rate_id=None, unit=None, quantity=0, unit_amount_fen=0, list_amount_fen=0,
                   discount_fen=0, discount_reason="", amount_fen=0, voucher_estimate_fen=0)

    @classmethod
    def of(cls, instrument_id: int, account_id: int, p: Priced, voucher_fen: int) -> PriceRead:
        return cls(instrument_id=instrument_id, account_id=account_id, charges=True, category=p.category,
                   assisted=p.assisted, rate_id=p.rate_id, unit=p.unit, quantity=p.quantity,
                   unit_amount_fen=p.unit_amount_fen, list_amount_fen=p.list_amount_fen,
                   discount_fen=p.discount_fen, discount_reason=p.discount_reason, amount_fen=p.amount_fen,
                   voucher_estimate_fen=voucher_fen)


# --- accounts -------------------------------------------------------------------------------------------------


class AccountCreate(_Input):
    """A funding account owned by the caller (an institution admin may name another owner or institution)."""

    code: str = Field(min_length=2, max_length=64)
    name: str = Field(min_length=1, max_length=200)
    kind: AccountKind = AccountKind.grant
    prepaid: StrictBool = False
    limit_fen: Fen | None = None
    valid_until: Day | None = None
    institution_id: DbId | None = None
    owner_id: DbId | None = None


class AccountUpdate(_Input):
    """Changes to an account; `limit_fen: null` removes the limit, an omitted field keeps its value."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    limit_fen: Fen | None = None
    valid_until: Day | None = None
    status: AccountStatus | None = None


class AccountRead(BaseModel):
    id: int
    code: str
    name: str
    kind: AccountKind
    institution_id: int
    region_code: str
    owner_id: int
    prepaid: bool
    balance_fen: int
    limit_fen: int | None
    valid_until: date | None
    status: AccountStatus
    created_at: datetime
    can_manage: bool = Field(default=False, description="The caller owns or administers the account")

    @classmethod
    def of(cls, a: BillingAccount, *, can_manage: bool = False) -> AccountRead:
        return cls(id=a.id, code=a.code, name=a.name, kind=a.kind, institution_id=a.institution_id,
                   region_code=a.region_code, owner_id=a.owner_id, prepaid=a.prepaid, balance_fen=a.balance_fen,
                   limit_fen=a.limit_fen, valid_until=a.valid_until, status=a.status, created_at=a.created_at,
                   can_manage=can_manage)


class AccountList(BaseModel):
    items: list[AccountRead]


class AccountJoin(_Input):
    code: str = Field(min_length=1, max_length=64)


class AccountSummary(BaseModel):
    account_id: int
    limit_fen: int | None
    spent_fen: int = Field(description="Net charges so far")
    held_fen: int = Field(description="Open holds of bookings and orders not charged yet")
    available_fen: int | None = Field(description="What may still be committed; null: no limit")
    balance_fen: int = Field(description="Prepaid balance")
    voucher_fen: int = Field(description="What the account's active, valid vouchers still hold")

    @classmethod
    def of(cls, a: BillingAccount, c: Commitments, voucher_fen: int) -> AccountSummary:
        # Mirrors accounts.check_spending: a limit bounds everything; a prepaid account without one may commit
        # its balance and its vouchers, less what its holds already wait for.
        if a.limit_fen is not None:
            available: int | None = max(0, a.limit_fen - c.total_fen)
        elif a.prepaid:
            available = max(0, a.balance_fen + voucher_fen - c.held_fen)
        else:
            available = None
        return cls(account_id=a.id, limit_fen=a.limit_fen, spent_fen=c.spent_fen, held_fen=c.held_fen,
                   available_fen=available, balance_fen=a.balance_fen, voucher_fen=voucher_fen)


class MemberCreate(_Input):
    """The owner adds a user by e-mail, approved at once."""

    email: str = Field(min_length=3, max_length=320)
    limit_fen: Fen | None = None


class MemberDecision(_Input):
    """Approve, decline or revoke a member; `limit_fen` sets their personal limit (`null` removes it)."""

    status: MemberStatus
    limit_fen: Fen | None = None


class MemberRead(BaseModel):
    id: int
    account_id: int
    user_id: int
    user_name: str
    status: MemberStatus
    limit_fen: int | None
    requested_at: datetime
    decided_at: datetime | None

    @classmethod
    def of(cls, m: AccountMember, names: dict[int, str]) -> MemberRead:
        return cls(id=m.id, account_id=m.account_id, user_id=m.user_id, user_name=names.get(m.user_id, ""),
                   status=m.status, limit_fen=m.limit_fen, requested_at=m.requested_at, decided_at=m.decided_at)


class MemberList(BaseModel):
    items: list[MemberRead]


class DepositCreate(_Input):
    amount_fen: PositiveFen
    reference: str = Field(default="", max_length=100)


class DepositRead(BaseModel):
    id: int
    account_id: int
    amount_fen: int
    reference: str
    created_at: datetime

    @classmethod
    def of(cls, d: AccountDeposit) -> DepositRead:
        return cls(id=d.id, account_id=d.account_id, amount_fen=d.amount_fen, reference=d.reference,
                   created_at=d.created_at)


class DepositList(BaseModel):
    items: list[DepositRead]


class HoldRead(BaseModel):
    id: int
    account_id: int
    user_id: int
    source_kind: SourceKind
    source_id: int
    amount_fen: int
    created_at: datetime
    released_at: datetime | None

    @classmethod
    def of(cls, h: BillingHold) -> HoldRead:
        return cls(id=h.id, account_id=h.account_id, user_id=h.user_id, source_kind=h.source_kind,
                   source_id=h.source_id, amount_fen=h.amount_fen, created_at=h.created_at,
                   released_at=h.released_at)


class HoldList(BaseModel):
    items: list[HoldRead]


# --- vouchers -------------------------------------------------------------------------------------------------


class VoucherCreate(_Input):
    """A voucher of a region for an account: amount, validity, the share of a charge it may pay, eligibility."""

    issuer_region_code: RegionCode
    account_id: DbId
    amount_fen: PositiveFen
    valid_from: Day
    valid_until: Day
    share_bp: Annotated[StrictInt, Field(ge=1, le=10000)] = 5000
    name: str = Field(default="", max_length=200)
    eligible_kinds: list[Annotated[str, Field(max_length=20)]] = Field(default_factory=list, max_length=10)
    eligible_categories: list[Annotated[str, Field(max_length=32)]] = Field(default_factory=list, max_length=20)
    code: str | None = Field(default=None, min_length=1, max_length=40)


class RedemptionRead(BaseModel):
    id: int
    voucher_id: int
    charge_id: int
    amount_fen: int = Field(description="Negative when a reversal gave it back")
    created_at: datetime

    @classmethod
    def of(cls, r: VoucherRedemption) -> RedemptionRead:
        return cls(id=r.id, voucher_id=r.voucher_id, charge_id=r.charge_id, amount_fen=r.amount_fen,
                   created_at=r.created_at)


class VoucherRead(BaseModel):
    id: int
    code: str
    issuer_region_code: str
    account_id: int
    name: str
    amount_fen: int
    balance_fen: int
    share_bp: int
    valid_from: date
    valid_until: date
    eligible_kinds: list[str]
    eligible_categories: list[str]
    status: VoucherStatus
    created_at: datetime

    @classmethod
    def fields_of(cls, v: Voucher) -> dict[str, object]:
        return dict(id=v.id, code=v.code, issuer_region_code=v.issuer_region_code, account_id=v.account_id,
                    name=v.name, amount_fen=v.amount_fen, balance_fen=v.balance_fen, share_bp=v.share_bp,
                    valid_from=v.valid_from, valid_until=v.valid_until, eligible_kinds=v.eligible_kinds.split(),
                    eligible_categories=v.eligible_categories.split(), status=v.status, created_at=v.created_at)

    @classmethod
    def of(cls, v: Voucher) -> VoucherRead:
        return cls.model_validate(cls.fields_of(v))


class VoucherDetail(VoucherRead):
    redemptions: list[RedemptionRead]

    @classmethod
    def with_redemptions(cls, v: Voucher, rows: list[VoucherRedemption]) -> VoucherDetail:
        return cls.model_validate({**cls.fields_of(v), "redemptions": [RedemptionRead.of(r) for r in rows]})


class VoucherList(BaseModel):
    items: list[VoucherRead]


class RecognitionRead(BaseModel):
    issuer_region_code: str
    provider_region_code: str

    @classmethod
    def of(cls, r: VoucherRecognition) -> RecognitionRead:
        return cls(issuer_region_code=r.issuer_region_code, provider_region_code=r.provider_region_code)


class RecognitionList(BaseModel):
    items: list[RecognitionRead]


class RecognitionUpdate(_Input):
    """Whether providers of `provider_region_code` accept vouchers issued by `issuer_region_code`."""

    issuer_region_code: RegionCode
    provider_region_code: RegionCode
    accepted: StrictBool


# --- charges --------------------------------------------------------------------------------------------------


class ChargePartsRead(BaseModel):
    voucher_fen: int
    prepaid_fen: int
    invoice_fen: int

    @classmethod
    def of(cls, p: ChargeParts) -> ChargePartsRead:
        return cls(voucher_fen=p.voucher_fen, prepaid_fen=p.prepaid_fen, invoice_fen=p.invoice_fen)


class ChargeRead(BaseModel):
    """One ledger line and how it was paid (parts sum to `amount_fen`)."""

    id: int
    account_id: int
    user_id: int
    facility_id: int
    provider_institution_id: int
    provider_region_code: str
    payer_institution_id: int
    payer_region_code: str
    source_kind: SourceKind
    source_id: int
    seq: int
    reverses_id: int | None
    item_kind: str
    category_code: str | None
    payer_category: PayerCategory
    assisted: bool
    rate_id: int | None
    unit: RateUnit
    quantity: int
    unit_amount_fen: int
    list_amount_fen: int
    discount_fen: int
    discount_reason: str
    amount_fen: int
    description: str
    service_date: date
    posted_at: datetime
    posted_by_id: int | None
    note: str
    parts: ChargePartsRead

    @classmethod
    def of(cls, c: Charge, parts: ChargeParts) -> ChargeRead:
        return cls(
            id=c.id, account_id=c.account_id, user_id=c.user_id, facility_id=c.facility_id,
            provider_institution_id=c.provider_institution_id, provider_region_code=c.provider_region_code,
            payer_institution_id=c.payer_institution_id, payer_region_code=c.payer_region_code,
            source_kind=c.source_kind, source_id=c.source_id, seq=c.seq, reverses_id=c.reverses_id,
            item_kind=c.item_kind, category_code=c.category_code, payer_category=c.payer_category,
            assisted=c.assisted, rate_id=c.rate_id, unit=c.unit, quantity=c.quantity,
            unit_amount_fen=c.unit_amount_fen, list_amount_fen=c.list_amount_fen, discount_fen=c.discount_fen,
            discount_reason=c.discount_reason, amount_fen=c.amount_fen, description=c.description,
            service_date=c.service_date, posted_at=c.posted_at, posted_by_id=c.posted_by_id, note=c.note,
            parts=ChargePartsRead.of(parts),
        )


class ChargePage(BaseModel):
    items: list[ChargeRead]
    next_cursor: str | None


class ChargeReversal(_Input):
    note: Note


class ChargeCorrection(_Input):
    """Reverse a charge and post its replacement: a new quantity at the same rate, or a new net amount (one of
    them); 0 only reverses."""

    note: Note
    quantity: Annotated[StrictInt, Field(ge=0, le=1_000_000)] | None = None
    amount_fen: Fen | None = None


class ChargeCorrected(BaseModel):
    reversal: ChargeRead
    replacement: ChargeRead | None


class ManualChargeCreate(_Input):
    """Staff charge something outside bookings and orders to an account the user (by e-mail) is a member of."""

    facility_id: DbId
    account_id: DbId
    user_email: str = Field(min_length=3, max_length=320)
    description: str = Field(min_length=1, max_length=300)
    amount_fen: PositiveFen
    service_date: Day
    item_kind: str = Field(default="consultation", max_length=20)
    note: str = Field(default="", max_length=2000)
