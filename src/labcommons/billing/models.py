"""Billing tables: facility billing policies, effective-dated rate cards, funding accounts and their members,
spending holds, the append-only charge ledger with how each charge was paid, innovation vouchers with the
regions that recognise them, talent service cards with the entitlements regions grant them, and invoices.

Money is integer fen throughout. The invariants the database itself keeps (see migration 0005):
- a charge, a payment and a voucher redemption are never updated or deleted (triggers); a correction is a
  reversing charge;
- a voucher's balance stays within [0, amount] and a prepaid account's balance is never negative (CHECKs, and
  every debit is a conditional UPDATE, so concurrent redemptions cannot overspend);
- a charge is invoiced at most once (unique charge_id on invoice_line); a source is charged once per
  sequence number (unique source_kind, source_id, seq).
"""

from __future__ import annotations

import enum
from datetime import date, datetime

from sqlalchemy import BigInteger, CheckConstraint, Date, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from labcommons.catalog.models import _enum
from labcommons.db import Base, UTCDateTime, utcnow


class PayerCategory(enum.StrEnum):
    """Who pays, relative to the provider: the rate card has one price per category."""

    internal = "internal"  # the provider's own institution
    academic_region = "academic_region"  # a non-company institution of the provider's region
    academic_other = "academic_other"  # a non-company institution of another region
    industry = "industry"  # a company, from either region


class RateUnit(enum.StrEnum):
    hour = "hour"
    sample = "sample"
    project = "project"


class ChargeBasis(enum.StrEnum):
    """What instrument time is charged for: the booked interval, the checked-in interval, or the longer."""

    booked = "booked"
    actual = "actual"
    greater = "greater"


class Rounding(enum.StrEnum):
    """How billed minutes are rounded to the facility's increment."""

    up = "up"
    nearest = "nearest"


class AccountKind(enum.StrEnum):
    grant = "grant"  # a grant or project code; the principal investigator approves members and sets limits
    company = "company"  # a company account, usually with a prepaid balance


class AccountStatus(enum.StrEnum):
    active = "active"
    suspended = "suspended"
    closed = "closed"


class MemberStatus(enum.StrEnum):
    pending = "pending"
    approved = "approved"
    declined = "declined"
    revoked = "revoked"


class SourceKind(enum.StrEnum):
    booking = "booking"
    order = "order"
    manual = "manual"


class PaymentMethod(enum.StrEnum):
    prepaid = "prepaid"  # taken from the account's prepaid balance
    invoice = "invoice"  # billed on the monthly invoice, settled by the payer's finance office


class VoucherStatus(enum.StrEnum):
    active = "active"
    revoked = "revoked"


class CardStatus(enum.StrEnum):
    pending = "pending"
    verified = "verified"
    rejected = "rejected"
    revoked = "revoked"


class EntitlementKind(enum.StrEnum):
    priority_window = "priority_window"  # value: extra days of booking horizon
    fee_discount = "fee_discount"  # value: discount in basis points (1/100 of a percent)
    fast_track = "fast_track"  # consultation orders are flagged for fast handling; value unused


class InvoiceStatus(enum.StrEnum):
    issued = "issued"
    paid = "paid"


class BillingPolicy(Base):
    """A facility's billing rules; a facility without one charges nothing."""

    __tablename__ = "billing_policy"
    __table_args__ = (CheckConstraint("increment_minutes BETWEEN 1 AND 240", name="increment"),)

    facility_id: Mapped[int] = mapped_column(ForeignKey("facility.id", ondelete="CASCADE"), primary_key=True)
    basis: Mapped[ChargeBasis] = mapped_column(_enum(ChargeBasis, "charge_basis"), default=ChargeBasis.booked)
    increment_minutes: Mapped[int] = mapped_column(Integer, default=15)
    rounding: Mapped[Rounding] = mapped_column(_enum(Rounding, "rounding"), default=Rounding.up)
    # A no-show is charged its booked time.
    charge_no_show: Mapped[bool] = mapped_column(default=True)
    # Bookings and orders of chargeable items must name a funding account.
    require_account: Mapped[bool] = mapped_column(default=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Rate(Base):
    """One price of one instrument or service for one payer category, valid over [effective_from,
    effective_to). A new price is a new row; the previous one is closed the day before it starts."""

    __tablename__ = "rate"
    __table_args__ = (
        CheckConstraint("(instrument_id IS NULL) <> (service_id IS NULL)", name="one_target"),
        CheckConstraint("amount_fen >= 0", name="amount"),
        CheckConstraint("effective_to IS NULL OR effective_to > effective_from", name="period"),
        UniqueConstraint("target_key", "category", "assisted", "effective_from", name="uq_rate_target_from"),
        Index("ix_rate_facility", "facility_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    facility_id: Mapped[int] = mapped_column(ForeignKey("facility.id"))
    instrument_id: Mapped[int | None] = mapped_column(ForeignKey("instrument.id"))
    service_id: Mapped[int | None] = mapped_column(ForeignKey("service.id"))
    # "instrument:12" or "service:5": one column so the unique key has no NULLs.
    target_key: Mapped[str] = mapped_column(String(40))
    category: Mapped[PayerCategory] = mapped_column(_enum(PayerCategory, "payer_category"))
    # Assisted use (staff operate or supervise) usually costs more than unassisted use.
    assisted: Mapped[bool] = mapped_column(default=False)
    unit: Mapped[RateUnit] = mapped_column(_enum(RateUnit, "rate_unit"))
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    effective_from: Mapped[date] = mapped_column(Date)
    effective_to: Mapped[date | None] = mapped_column(Date)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BillingAccount(Base):
    """A funding account: a grant/project code or a company account. Members charge to it."""

    __tablename__ = "billing_account"
    __table_args__ = (
        CheckConstraint("balance_fen >= 0", name="balance_not_negative"),
        CheckConstraint("limit_fen IS NULL OR limit_fen >= 0", name="limit"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # The grant or project code, or the company's account number; unique across the platform.
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[AccountKind] = mapped_column(_enum(AccountKind, "account_kind"))
    institution_id: Mapped[int] = mapped_column(ForeignKey("institution.id"), index=True)
    region_code: Mapped[str] = mapped_column(ForeignKey("region.code"))
    # The principal investigator or the company's account manager.
    owner_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"), index=True)
    # Prepaid accounts pay from balance_fen; the rest of a charge goes on the invoice.
    prepaid: Mapped[bool] = mapped_column(default=False)
    balance_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    # Total the account may spend (charges plus open holds); None: no limit.
    limit_fen: Mapped[int | None] = mapped_column(BigInteger)
    valid_until: Mapped[date | None] = mapped_column(Date)
    status: Mapped[AccountStatus] = mapped_column(_enum(AccountStatus, "account_status"),
                                                  default=AccountStatus.active)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AccountMember(Base):
    """A user allowed to charge to an account, once the owner approves; with an optional personal limit."""

    __tablename__ = "account_member"
    __table_args__ = (
        UniqueConstraint("account_id", "user_id", name="uq_account_member"),
        CheckConstraint("limit_fen IS NULL OR limit_fen >= 0", name="limit"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("billing_account.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    status: Mapped[MemberStatus] = mapped_column(_enum(MemberStatus, "member_status"), default=MemberStatus.pending)
    limit_fen: Mapped[int | None] = mapped_column(BigInteger)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decided_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))

    account: Mapped[BillingAccount] = relationship(lazy="raise")


class AccountDeposit(Base):
    """Money paid into a prepaid account (a bank transfer recorded by the facility's or platform's finance)."""

    __tablename__ = "account_deposit"
    __table_args__ = (CheckConstraint("amount_fen > 0", name="amount"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("billing_account.id"), index=True)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    reference: Mapped[str] = mapped_column(String(100), default="")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BillingHold(Base):
    """The estimated cost of a booking or accepted order not charged yet: it counts against the account's and
    the member's limits until the charge is posted or the booking/order is cancelled."""

    __tablename__ = "billing_hold"
    __table_args__ = (
        UniqueConstraint("source_kind", "source_id", name="uq_billing_hold_source"),
        CheckConstraint("amount_fen >= 0", name="amount"),
        Index("ix_billing_hold_account_open", "account_id", "released_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("billing_account.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"))
    source_kind: Mapped[SourceKind] = mapped_column(_enum(SourceKind, "hold_source_kind"))
    source_id: Mapped[int] = mapped_column(BigInteger)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Charge(Base):
    """One line of the append-only ledger. A correction is a reversing charge (negative amount, reverses_id set)
    followed, if need be, by a new charge with the next seq of the same source."""

    __tablename__ = "charge"
    __table_args__ = (
        UniqueConstraint("source_kind", "source_id", "seq", name="uq_charge_source_seq"),
        CheckConstraint("amount_fen = list_amount_fen - discount_fen", name="net"),
        CheckConstraint("seq >= 1", name="seq"),
        Index("ix_charge_account_posted", "account_id", "posted_at"),
        Index("ix_charge_provider_posted", "provider_institution_id", "posted_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("billing_account.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"))
    facility_id: Mapped[int] = mapped_column(ForeignKey("facility.id"))
    provider_institution_id: Mapped[int] = mapped_column(ForeignKey("institution.id"))
    provider_region_code: Mapped[str] = mapped_column(ForeignKey("region.code"))
    payer_institution_id: Mapped[int] = mapped_column(ForeignKey("institution.id"))
    payer_region_code: Mapped[str] = mapped_column(ForeignKey("region.code"))
    source_kind: Mapped[SourceKind] = mapped_column(_enum(SourceKind, "charge_source_kind"))
    source_id: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(Integer, default=1)
    reverses_id: Mapped[int | None] = mapped_column(ForeignKey("charge.id"), unique=True)
    # "instrument" or a service kind (testing, rnd, consultation): what vouchers are eligible for.
    item_kind: Mapped[str] = mapped_column(String(20))
    category_code: Mapped[str | None] = mapped_column(String(32))
    payer_category: Mapped[PayerCategory] = mapped_column(_enum(PayerCategory, "charge_payer_category"))
    assisted: Mapped[bool] = mapped_column(default=False)
    rate_id: Mapped[int | None] = mapped_column(ForeignKey("rate.id"))
    unit: Mapped[RateUnit] = mapped_column(_enum(RateUnit, "charge_unit"))
    # Minutes for hourly rates, a count otherwise.
    quantity: Mapped[int] = mapped_column(Integer)
    unit_amount_fen: Mapped[int] = mapped_column(BigInteger)
    list_amount_fen: Mapped[int] = mapped_column(BigInteger)
    discount_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    # e.g. "talent:tianfu 10%"; empty when there is no discount.
    discount_reason: Mapped[str] = mapped_column(String(200), default="")
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[str] = mapped_column(String(300))
    # The day the work happened, in the facility's zone.
    service_date: Mapped[date] = mapped_column(Date)
    posted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    posted_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    note: Mapped[str] = mapped_column(Text, default="")

    account: Mapped[BillingAccount] = relationship(lazy="raise")


class Payment(Base):
    """The part of a charge the account pays: from its prepaid balance or on its invoice (signed like the
    charge)."""

    __tablename__ = "payment"
    __table_args__ = (UniqueConstraint("charge_id", "method", name="uq_payment_charge_method"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    charge_id: Mapped[int] = mapped_column(ForeignKey("charge.id"), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("billing_account.id"), index=True)
    method: Mapped[PaymentMethod] = mapped_column(_enum(PaymentMethod, "payment_method"))
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Voucher(Base):
    """An innovation voucher a region's authority issued to a company or team (held on their account)."""

    __tablename__ = "voucher"
    __table_args__ = (
        CheckConstraint("amount_fen > 0", name="amount"),
        CheckConstraint("balance_fen >= 0 AND balance_fen <= amount_fen", name="balance_within_amount"),
        CheckConstraint("share_bp BETWEEN 1 AND 10000", name="share"),
        CheckConstraint("valid_until >= valid_from", name="validity"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(40), unique=True)
    issuer_region_code: Mapped[str] = mapped_column(ForeignKey("region.code"))
    account_id: Mapped[int] = mapped_column(ForeignKey("billing_account.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    balance_fen: Mapped[int] = mapped_column(BigInteger)
    # The most of one charge the voucher pays, in basis points (5000 = half).
    share_bp: Mapped[int] = mapped_column(Integer, default=5000)
    valid_from: Mapped[date] = mapped_column(Date)
    valid_until: Mapped[date] = mapped_column(Date)
    # Space-separated; empty means any. Kinds: instrument testing rnd consultation. Categories: taxonomy codes,
    # a code covers its sub-categories.
    eligible_kinds: Mapped[str] = mapped_column(String(100), default="")
    eligible_categories: Mapped[str] = mapped_column(String(500), default="")
    status: Mapped[VoucherStatus] = mapped_column(_enum(VoucherStatus, "voucher_status"),
                                                  default=VoucherStatus.active)
    issued_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    account: Mapped[BillingAccount] = relationship(lazy="raise")


class VoucherRedemption(Base):
    """The part of a charge a voucher paid (negative when a reversal gives it back)."""

    __tablename__ = "voucher_redemption"
    __table_args__ = (UniqueConstraint("voucher_id", "charge_id", name="uq_redemption_voucher_charge"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    voucher_id: Mapped[int] = mapped_column(ForeignKey("voucher.id"), index=True)
    charge_id: Mapped[int] = mapped_column(ForeignKey("charge.id"), index=True)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VoucherRecognition(Base):
    """Providers of provider_region accept vouchers issued by issuer_region (mutual recognition is two rows)."""

    __tablename__ = "voucher_recognition"

    issuer_region_code: Mapped[str] = mapped_column(String(16), primary_key=True)
    provider_region_code: Mapped[str] = mapped_column(String(16), primary_key=True)


class TalentCardScheme(Base):
    """A region's talent service card (e.g. the Tianfu Talent Card)."""

    __tablename__ = "talent_card_scheme"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    region_code: Mapped[str] = mapped_column(String(16))
    name_zh: Mapped[str] = mapped_column(String(100))
    name_en: Mapped[str] = mapped_column(String(200))


class TalentEntitlement(Base):
    """What holders of a scheme's card get from providers of one region: the recognised list is data."""

    __tablename__ = "talent_entitlement"
    __table_args__ = (
        UniqueConstraint("scheme_code", "provider_region_code", "kind", name="uq_entitlement"),
        CheckConstraint("value >= 0", name="value"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    scheme_code: Mapped[str] = mapped_column(ForeignKey("talent_card_scheme.code", ondelete="CASCADE"))
    provider_region_code: Mapped[str] = mapped_column(String(16))
    kind: Mapped[EntitlementKind] = mapped_column(_enum(EntitlementKind, "entitlement_kind"))
    value: Mapped[int] = mapped_column(Integer, default=0)


class TalentCard(Base):
    """A user's card, submitted by the user and verified by the issuing region's authority."""

    __tablename__ = "talent_card"
    __table_args__ = (UniqueConstraint("scheme_code", "card_number", name="uq_talent_card_number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    scheme_code: Mapped[str] = mapped_column(ForeignKey("talent_card_scheme.code"))
    card_number: Mapped[str] = mapped_column(String(40))
    holder_name: Mapped[str] = mapped_column(String(200))
    valid_until: Mapped[date | None] = mapped_column(Date)
    status: Mapped[CardStatus] = mapped_column(_enum(CardStatus, "card_status"), default=CardStatus.pending)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decided_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    note: Mapped[str] = mapped_column(Text, default="")


class Invoice(Base):
    """One account's statement for one month: every charge posted up to the month's end not invoiced before."""

    __tablename__ = "invoice"
    __table_args__ = (
        UniqueConstraint("account_id", "period", name="uq_invoice_account_period"),
        CheckConstraint("total_fen = voucher_fen + prepaid_fen + due_fen", name="parts"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # e.g. INV-202611-000042
    number: Mapped[str] = mapped_column(String(40), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("billing_account.id"), index=True)
    # "2026-11": the month in the platform's zone.
    period: Mapped[str] = mapped_column(String(7))
    total_fen: Mapped[int] = mapped_column(BigInteger)
    voucher_fen: Mapped[int] = mapped_column(BigInteger)
    prepaid_fen: Mapped[int] = mapped_column(BigInteger)
    due_fen: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[InvoiceStatus] = mapped_column(_enum(InvoiceStatus, "invoice_status"),
                                                  default=InvoiceStatus.issued)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    account: Mapped[BillingAccount] = relationship(lazy="raise")


class InvoiceLine(Base):
    """One charge on one invoice, with how it was paid; a charge appears on exactly one invoice."""

    __tablename__ = "invoice_line"
    __table_args__ = (CheckConstraint("amount_fen = voucher_fen + prepaid_fen + due_fen", name="parts"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    invoice_id: Mapped[int] = mapped_column(ForeignKey("invoice.id", ondelete="CASCADE"), index=True)
    charge_id: Mapped[int] = mapped_column(ForeignKey("charge.id"), unique=True)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    voucher_fen: Mapped[int] = mapped_column(BigInteger)
    prepaid_fen: Mapped[int] = mapped_column(BigInteger)
    due_fen: Mapped[int] = mapped_column(BigInteger)
