"""Innovation vouchers: issued by a region's authority to a company or team's account, recognised by providers
of the regions a policy names, redeemed against charges up to their share and never past their balance."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import date

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing.accounts import get_account
from labcommons.billing.models import (
    Voucher,
    VoucherRecognition,
    VoucherRedemption,
    VoucherStatus,
)
from labcommons.catalog.models import Category, Region, ServiceKind
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.roles import Action

ITEM_KINDS = ("instrument", *(kind.value for kind in ServiceKind))


def _authority(actor: Actor | None, region_code: str) -> None:
    if actor is not None and not roles.authorize(actor, Action.issue_vouchers, region_code=region_code):
        raise Forbidden(f"Only {region_code}'s authority may do this.", field="issuer_region_code")


def _words(raw: str | Sequence[str] | None) -> list[str]:
    if raw is None:
        return []
    items = raw.split() if isinstance(raw, str) else list(raw)
    return [item.strip() for item in items if item.strip()]


def issue_voucher(
    session: Session,
    actor: Actor | None,
    *,
    issuer_region_code: str,
    account_id: int,
    amount_fen: int,
    valid_from: date,
    valid_until: date,
    share_bp: int = 5000,
    name: str = "",
    eligible_kinds: str | Sequence[str] | None = None,
    eligible_categories: str | Sequence[str] | None = None,
    code: str | None = None,
) -> Voucher:
    """Issue a voucher of a region to an account; the balance starts at the amount."""
    _authority(actor, issuer_region_code)
    if session.get(Region, issuer_region_code) is None:
        raise NotFound(f"Region {issuer_region_code} does not exist.", field="issuer_region_code")
    account = get_account(session, account_id)
    if isinstance(amount_fen, bool) or not isinstance(amount_fen, int) or not 0 < amount_fen <= 10_000_000_000:
        raise InvalidInput("The amount must be a positive whole number of fen.", field="amount_fen",
                           code="out_of_range")
    if isinstance(share_bp, bool) or not isinstance(share_bp, int) or not 1 <= share_bp <= 10000:
        raise InvalidInput("The share is 1 to 10000 basis points (0.01 % to 100 %).", field="share_bp",
                           code="out_of_range")
    if valid_until < valid_from:
        raise InvalidInput("The voucher must end after it starts.", field="valid_until", code="ends_before_start")
    kinds = _words(eligible_kinds)
    for kind in kinds:
        if kind not in ITEM_KINDS:
            raise InvalidInput(f"Unknown kind {kind!r}.", field="eligible_kinds", code="invalid_choice",
                               allowed=list(ITEM_KINDS))
    categories = _words(eligible_categories)
    for category in categories:
        if session.get(Category, category) is None:
            raise InvalidInput(f"Unknown category {category!r}.", field="eligible_categories",
                               code="unknown_category")
    code = (code or f"{issuer_region_code}-IV-{secrets.token_hex(4).upper()}").strip()
    if len(code) > 40:
        raise InvalidInput("The code is too long (40 characters at most).", field="code", code="too_long")
    if session.scalar(select(Voucher.id).where(Voucher.code == code)) is not None:
        raise Conflict("A voucher with this code exists already.", field="code", code="code_taken")
    voucher = Voucher(
        code=code, issuer_region_code=issuer_region_code, account_id=account.id, name=name.strip()[:200],
        amount_fen=amount_fen, balance_fen=amount_fen, share_bp=share_bp, valid_from=valid_from,
        valid_until=valid_until, eligible_kinds=" ".join(kinds), eligible_categories=" ".join(categories),
        status=VoucherStatus.active, issued_by_id=actor.user_id if actor else None,
    )
    session.add(voucher)
    session.flush()
    return voucher


def revoke_voucher(session: Session, actor: Actor, voucher_id: int) -> Voucher:
    """Stop a voucher paying for new charges; what it paid stays paid."""
    voucher = get_voucher(session, voucher_id)
    _authority(actor, voucher.issuer_region_code)
    voucher.status = VoucherStatus.revoked
    session.flush()
    return voucher


def get_voucher(session: Session, voucher_id: int) -> Voucher:
    voucher = session.get(Voucher, voucher_id)
    if voucher is None:
        raise NotFound(f"Voucher {voucher_id} does not exist.", field="voucher_id")
    return voucher


def vouchers_of_account(session: Session, account_id: int) -> Sequence[Voucher]:
    return session.scalars(select(Voucher).where(Voucher.account_id == account_id).order_by(Voucher.id)).all()


def vouchers_of_region(session: Session, region_code: str) -> Sequence[Voucher]:
    return session.scalars(
        select(Voucher).where(Voucher.issuer_region_code == region_code).order_by(Voucher.id.desc())
    ).all()


def redemptions(session: Session, voucher_id: int) -> Sequence[VoucherRedemption]:
    return session.scalars(
        select(VoucherRedemption).where(VoucherRedemption.voucher_id == voucher_id).order_by(VoucherRedemption.id)
    ).all()


def recognised(session: Session, issuer_region_code: str, provider_region_code: str) -> bool:
    """Whether providers of a region accept vouchers of the issuing region (data, see voucher_recognition)."""
    return session.get(VoucherRecognition, (issuer_region_code, provider_region_code)) is not None


def recognitions(session: Session) -> Sequence[VoucherRecognition]:
    return session.scalars(
        select(VoucherRecognition).order_by(VoucherRecognition.issuer_region_code,
                                            VoucherRecognition.provider_region_code)
    ).all()


def set_recognition(session: Session, actor: Actor | None, issuer_region_code: str, provider_region_code: str,
                    accepted: bool) -> None:
    """The providers' region authority decides whether its providers accept another region's vouchers."""
    _authority(actor, provider_region_code)
    for field, code in (("issuer_region_code", issuer_region_code), ("provider_region_code", provider_region_code)):
        if session.get(Region, code) is None:
            raise NotFound(f"Region {code} does not exist.", field=field)
    row = session.get(VoucherRecognition, (issuer_region_code, provider_region_code))
    if accepted and row is None:
        session.add(VoucherRecognition(issuer_region_code=issuer_region_code,
                                       provider_region_code=provider_region_code))
    elif not accepted and row is not None:
        session.execute(delete(VoucherRecognition).where(
            VoucherRecognition.issuer_region_code == issuer_region_code,
            VoucherRecognition.provider_region_code == provider_region_code,
        ))
    session.flush()


def covers(voucher: Voucher, *, item_kind: str, category_code: str | None, on: date) -> bool:
    """Whether a voucher may pay for an item of that kind and category on that day (recognition aside)."""
    if voucher.status != VoucherStatus.active or not voucher.valid_from <= on <= voucher.valid_until:
        return False
    kinds = voucher.eligible_kinds.split()
    if kinds and item_kind not in kinds:
        return False
    categories = voucher.eligible_categories.split()
    if categories:
        if category_code is None:
            return False
        return any(category_code == c or category_code.startswith(c + ".") for c in categories)
    return True


def applicable(session: Session, account_id: int, *, provider_region_code: str, item_kind: str,
               category_code: str | None, on: date) -> list[Voucher]:
    """The account's vouchers that may pay this charge, soonest to expire first."""
    rows = session.scalars(
        select(Voucher).where(Voucher.account_id == account_id, Voucher.status == VoucherStatus.active,
                              Voucher.balance_fen > 0)
        .order_by(Voucher.valid_until, Voucher.id)
    ).all()
    return [
        v for v in rows
        if covers(v, item_kind=item_kind, category_code=category_code, on=on)
        and recognised(session, v.issuer_region_code, provider_region_code)
    ]


def share_cap(amount_fen: int, share_bp: int, covered_fen: int) -> int:
    """What one more voucher may pay of a charge: its share of the whole, less what vouchers paid already (so
    several vouchers together pay no more than the largest share any of them allows)."""
    return max(0, amount_fen * share_bp // 10000 - covered_fen)


def estimate_cover(session: Session, account_id: int, *, provider_region_code: str, item_kind: str,
                   category_code: str | None, amount_fen: int, on: date) -> int:
    """What the account's vouchers would pay of a charge, taking nothing (the ledger's rule, for previews)."""
    covered = 0
    for voucher in applicable(session, account_id, provider_region_code=provider_region_code, item_kind=item_kind,
                              category_code=category_code, on=on):
        covered += min(share_cap(amount_fen, voucher.share_bp, covered), voucher.balance_fen)
    return covered


def take(session: Session, voucher_id: int, wanted_fen: int) -> int:
    """Debit up to `wanted_fen` from a voucher's balance; returns what was taken.

    One conditional UPDATE: two transactions redeeming the same voucher serialise on its row, and the second
    re-reads the balance the first left, so the sum of redemptions never exceeds the amount (the CHECK
    balance_fen >= 0 is the last line of defence).
    """
    while wanted_fen > 0:
        balance = session.scalar(select(Voucher.balance_fen).where(Voucher.id == voucher_id)
                                 .execution_options(populate_existing=True))
        amount = min(wanted_fen, int(balance or 0))
        if amount <= 0:
            return 0
        result = session.execute(
            update(Voucher).where(Voucher.id == voucher_id, Voucher.balance_fen >= amount)
            .values(balance_fen=Voucher.balance_fen - amount)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return amount
    return 0


def give_back(session: Session, voucher_id: int, amount_fen: int) -> None:
    """Return a reversed redemption to the voucher's balance."""
    session.execute(
        update(Voucher).where(Voucher.id == voucher_id).values(balance_fen=Voucher.balance_fen + amount_fen)
        .execution_options(synchronize_session=False)
    )
