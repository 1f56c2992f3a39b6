"""Funding accounts: grant and company accounts, their members and limits, prepaid deposits, and the holds that
reserve an account's money for bookings and orders not charged yet."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import and_, exists, func, not_, or_, select, update
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing.models import (
    AccountDeposit,
    AccountKind,
    AccountMember,
    AccountStatus,
    BillingAccount,
    BillingHold,
    Charge,
    MemberStatus,
    SourceKind,
    Voucher,
    VoucherStatus,
)
from labcommons.booking.models import Booking, BookingStatus
from labcommons.catalog.models import Institution, InstitutionKind
from labcommons.db import utcnow
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.models import User
from labcommons.identity.roles import Action
from labcommons.orders.models import OrderStatus, ServiceOrder

CODE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{1,63}$")
MAX_AMOUNT_FEN = 10_000_000_000  # a hundred million yuan


class SpendingLimitExceeded(InvalidInput):
    code = "spending_limit_exceeded"


class AccountNotUsable(InvalidInput):
    code = "account_not_usable"


def _check_amount(value: object, field: str, *, allow_zero: bool = True) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_AMOUNT_FEN:
        raise InvalidInput("Give a whole number of fen (0 to 100,000,000 yuan).", field=field, code="out_of_range")
    return value


def get_account(session: Session, account_id: int, *, lock: bool = False) -> BillingAccount:
    """An account by id; with `lock`, its row is locked for the rest of the transaction (PostgreSQL)."""
    stmt = select(BillingAccount).where(BillingAccount.id == account_id)
    if lock and session.get_bind().dialect.name == "postgresql":
        # Serialises limit checks and charge postings of one account across app processes; SQLite writers are
        # already serialised by BEGIN IMMEDIATE. populate_existing: an object loaded before the lock would keep the
        # balance and limit it had then.
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    account = session.scalars(stmt).first()
    if account is None:
        raise NotFound(f"Account {account_id} does not exist.", field="account_id")
    return account


def may_manage(actor: Actor, account: BillingAccount) -> bool:
    """The account's owner, its institution's administrator or a platform administrator."""
    return actor.user_id == account.owner_id or roles.authorize(
        actor, Action.manage_institution_accounts, institution_id=account.institution_id
    )


def member_row(session: Session, account_id: int, user_id: int) -> AccountMember | None:
    return session.scalars(
        select(AccountMember).where(AccountMember.account_id == account_id, AccountMember.user_id == user_id)
    ).first()


def visible_account(session: Session, actor: Actor, account_id: int) -> BillingAccount:
    """An account its owner, members, their institution's admin or a platform admin may see; 404 otherwise."""
    account = get_account(session, account_id)
    if may_manage(actor, account):
        return account
    member = member_row(session, account_id, actor.user_id)
    if member is None or member.status != MemberStatus.approved:
        raise NotFound(f"Account {account_id} does not exist.", field="account_id")
    return account


def create_account(
    session: Session,
    actor: Actor,
    *,
    code: str,
    name: str,
    kind: AccountKind | str = AccountKind.grant,
    prepaid: bool = False,
    limit_fen: int | None = None,
    valid_until: date | None = None,
    institution_id: int | None = None,
    owner_id: int | None = None,
) -> BillingAccount:
    """Open a funding account owned by the actor (or, for an institution admin, by a user they name).

    Its institution is the owner's; a company account needs a company. The owner is its first approved member.
    """
    roles.require(actor, Action.manage_own_billing)
    code = (code or "").strip()
    if not CODE_PATTERN.match(code):
        raise InvalidInput("The code is 2–64 letters, digits, dots, dashes or slashes.", field="code",
                           code="invalid_code")
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise InvalidInput("Give the account a name (200 characters at most).", field="name", code="missing_field")
    try:
        kind = AccountKind(kind)
    except ValueError:
        raise InvalidInput("The kind must be grant or company.", field="kind", code="invalid_choice") from None
    institution_id = institution_id or actor.institution_id
    if institution_id is None:
        raise InvalidInput("An account belongs to an institution; you belong to none.", field="institution_id",
                           code="no_institution")
    institution = session.get(Institution, institution_id)
    if institution is None:
        raise NotFound(f"Institution {institution_id} does not exist.", field="institution_id")
    owner = owner_id or actor.user_id
    if (institution_id != actor.institution_id or owner != actor.user_id) and not roles.authorize(
        actor, Action.manage_institution_accounts, institution_id=institution_id
    ):
        raise Forbidden("Only the institution's administrators open accounts for others.", field="owner_id")
    if session.get(User, owner) is None:
        raise NotFound(f"User {owner} does not exist.", field="owner_id")
    if kind == AccountKind.company and institution.kind != InstitutionKind.company:
        raise InvalidInput("A company account belongs to a company.", field="kind", code="not_a_company")
    if limit_fen is not None:
        _check_amount(limit_fen, "limit_fen")
    if session.scalar(select(BillingAccount.id).where(BillingAccount.code == code)) is not None:
        raise Conflict("An account with this code exists already.", field="code", code="code_taken")
    account = BillingAccount(
        code=code, name=name, kind=kind, institution_id=institution.id, region_code=institution.region_code,
        owner_id=owner, prepaid=bool(prepaid), balance_fen=0, limit_fen=limit_fen, valid_until=valid_until,
        status=AccountStatus.active,
    )
    session.add(account)
    session.flush()
    session.add(AccountMember(account_id=account.id, user_id=owner, status=MemberStatus.approved,
                              decided_at=utcnow(), decided_by_id=actor.user_id))
    session.flush()
    return account


def update_account(
    session: Session, actor: Actor, account_id: int, *, name: str | None = None, limit_fen: int | None = None,
    clear_limit: bool = False, valid_until: date | None = None, status: AccountStatus | str | None = None,
) -> BillingAccount:
    """The owner renames and limits the account; suspending or closing it is for them and their admins."""
    account = get_account(session, account_id, lock=True)
    if not may_manage(actor, account):
        raise NotFound(f"Account {account_id} does not exist.", field="account_id")
    if name is not None:
        name = name.strip()
        if not name or len(name) > 200:
            raise InvalidInput("Give the account a name (200 characters at most).", field="name",
                               code="missing_field")
        account.name = name
    if clear_limit:
        account.limit_fen = None
    elif limit_fen is not None:
        account.limit_fen = _check_amount(limit_fen, "limit_fen")
    if valid_until is not None:
        account.valid_until = valid_until
    if status is not None:
        try:
            account.status = AccountStatus(status)
        except ValueError:
            raise InvalidInput("The status must be active, suspended or closed.", field="status",
                               code="invalid_choice") from None
    session.flush()
    return account


def request_membership(session: Session, actor: Actor, account_code: str) -> AccountMember:
    """Ask to charge to an account, by its code; the owner decides. Asking again keeps the one request."""
    roles.require(actor, Action.manage_own_billing)
    account = find_by_code(session, account_code)
    if account is None or account.status != AccountStatus.active:
        raise NotFound("No active account has this code.", field="code")
    member = member_row(session, account.id, actor.user_id)
    if member is not None:
        if member.status in (MemberStatus.declined, MemberStatus.revoked):
            member.status = MemberStatus.pending
            member.requested_at = utcnow()
            member.decided_at = None
            session.flush()
        return member
    member = AccountMember(account_id=account.id, user_id=actor.user_id, status=MemberStatus.pending)
    session.add(member)
    session.flush()
    return member


def find_by_code(session: Session, code: str | None) -> BillingAccount | None:
    """The account with this grant, project or company code (surrounding spaces ignored)."""
    return session.scalars(select(BillingAccount).where(BillingAccount.code == (code or "").strip())).first()


def pending_requests(session: Session, user_id: int) -> list[BillingAccount]:
    """Accounts the user asked to join that have not decided yet."""
    return list(session.scalars(
        select(BillingAccount).join(AccountMember, AccountMember.account_id == BillingAccount.id)
        .where(AccountMember.user_id == user_id, AccountMember.status == MemberStatus.pending)
        .order_by(BillingAccount.code)
    ))


def add_member(session: Session, actor: Actor, account_id: int, user_id: int, *,
               limit_fen: int | None = None) -> AccountMember:
    """The owner adds a user directly (approved)."""
    account = get_account(session, account_id)
    if not may_manage(actor, account):
        raise NotFound(f"Account {account_id} does not exist.", field="account_id")
    member = member_row(session, account_id, user_id) or AccountMember(account_id=account_id, user_id=user_id)
    member.status = MemberStatus.approved
    if limit_fen is not None:  # adding someone again keeps the limit they had
        member.limit_fen = _check_amount(limit_fen, "limit_fen")
    member.decided_at = utcnow()
    member.decided_by_id = actor.user_id
    session.add(member)
    session.flush()
    return member


def decide_member(session: Session, actor: Actor, member_id: int, *, status: MemberStatus | str,
                  limit_fen: int | None = None, clear_limit: bool = False) -> AccountMember:
    """Approve, decline or revoke a member, or change their personal limit; the account's manager decides."""
    member = session.get(AccountMember, member_id)
    if member is None:
        raise NotFound(f"Member {member_id} does not exist.", field="member_id")
    account = get_account(session, member.account_id)
    if not may_manage(actor, account):
        raise NotFound(f"Member {member_id} does not exist.", field="member_id")
    try:
        new = MemberStatus(status)
    except ValueError:
        raise InvalidInput("The status must be approved, declined or revoked.", field="status",
                           code="invalid_choice") from None
    if member.user_id == account.owner_id and new != MemberStatus.approved:
        raise Conflict("The owner stays a member of their account.", field="member_id", code="owner_member")
    member.status = new
    if clear_limit:
        member.limit_fen = None
    elif limit_fen is not None:
        member.limit_fen = _check_amount(limit_fen, "limit_fen")
    member.decided_at = utcnow()
    member.decided_by_id = actor.user_id
    session.flush()
    return member


def members(session: Session, account_id: int) -> Sequence[AccountMember]:
    return session.scalars(
        select(AccountMember).where(AccountMember.account_id == account_id).order_by(AccountMember.id)
    ).all()


def _usable(account: BillingAccount, today: date) -> bool:
    return account.status == AccountStatus.active and (account.valid_until is None or account.valid_until >= today)


def accounts_of(session: Session, user_id: int, *, usable_on: date | None = None) -> list[BillingAccount]:
    """Accounts the user is an approved member of; with `usable_on`, only those active and valid that day."""
    rows = session.scalars(
        select(BillingAccount)
        .join(AccountMember, AccountMember.account_id == BillingAccount.id)
        .where(AccountMember.user_id == user_id, AccountMember.status == MemberStatus.approved)
        .order_by(BillingAccount.code)
    ).all()
    return [a for a in rows if usable_on is None or _usable(a, usable_on)]


def managed_accounts(session: Session, actor: Actor) -> list[BillingAccount]:
    """Accounts the actor owns or administers (through an institution admin or platform role)."""
    stmt = select(BillingAccount).order_by(BillingAccount.code)
    if not roles.is_platform_admin(actor):
        institutions = [g.institution_id for g in actor.grants if g.role == "institution_admin"]
        stmt = stmt.where(or_(BillingAccount.owner_id == actor.user_id,
                              BillingAccount.institution_id.in_(institutions or [-1])))
    return list(session.scalars(stmt).all())


def resolve_account(session: Session, user_id: int, account_id: int | None, *, required: bool,
                    today: date) -> BillingAccount | None:
    """The account a booking or order is charged to: the one named, or the user's only usable account.

    AccountNotUsable (422, field account_id) when the named one is not the user's, or when one is required and
    the user has none or several to choose from.
    """
    usable = accounts_of(session, user_id, usable_on=today)
    if account_id is not None:
        for account in usable:
            if account.id == account_id:
                return account
        raise AccountNotUsable("You cannot charge to this account (not a member, or it is not active).",
                               field="account_id")
    if len(usable) == 1:
        return usable[0]
    if required:
        if not usable:
            raise AccountNotUsable("This facility charges for its work: join or open a funding account first.",
                                   field="account_id", code="account_required")
        raise AccountNotUsable("Choose the funding account to charge.", field="account_id",
                               code="account_required", accounts=[a.id for a in usable])
    return None


def _open_holds() -> object:
    # A hold stops counting once released, or once its booking or order was cancelled (however that happened):
    # cancellation paths need not all remember billing.
    cancelled_booking = exists().where(
        BillingHold.source_kind == SourceKind.booking, Booking.id == BillingHold.source_id,
        Booking.status == BookingStatus.cancelled,
    )
    dead_order = exists().where(
        BillingHold.source_kind == SourceKind.order, ServiceOrder.id == BillingHold.source_id,
        ServiceOrder.status.in_((OrderStatus.cancelled, OrderStatus.rejected)),
    )
    return and_(BillingHold.released_at.is_(None), not_(cancelled_booking), not_(dead_order))


def open_holds_of(session: Session, account_id: int) -> Sequence[BillingHold]:
    """The account's holds that still count against its limits, newest first."""
    return session.scalars(
        select(BillingHold).where(BillingHold.account_id == account_id, _open_holds())  # type: ignore[arg-type]
        .order_by(BillingHold.id.desc())
    ).all()


@dataclass(frozen=True)
class Commitments:
    spent_fen: int  # net charges so far
    held_fen: int  # open holds

    @property
    def total_fen(self) -> int:
        return self.spent_fen + self.held_fen


def commitments(session: Session, account_id: int, *, user_id: int | None = None,
                exclude: tuple[SourceKind, int] | None = None) -> Commitments:
    """What an account (or one member on it) has spent and holds; `exclude` leaves one hold out (re-estimates)."""
    spent = select(func.coalesce(func.sum(Charge.amount_fen), 0)).where(Charge.account_id == account_id)
    held = select(func.coalesce(func.sum(BillingHold.amount_fen), 0)).where(
        BillingHold.account_id == account_id, _open_holds()  # type: ignore[arg-type]
    )
    if user_id is not None:
        spent = spent.where(Charge.user_id == user_id)
        held = held.where(BillingHold.user_id == user_id)
    if exclude is not None:
        held = held.where(not_(and_(BillingHold.source_kind == exclude[0], BillingHold.source_id == exclude[1])))
    return Commitments(int(session.scalar(spent) or 0), int(session.scalar(held) or 0))


def voucher_balance(session: Session, account_id: int, today: date) -> int:
    """What the account's active, valid vouchers still hold."""
    return int(session.scalar(
        select(func.coalesce(func.sum(Voucher.balance_fen), 0)).where(
            Voucher.account_id == account_id, Voucher.status == VoucherStatus.active,
            Voucher.valid_from <= today, Voucher.valid_until >= today,
        )
    ) or 0)


def check_spending(session: Session, account: BillingAccount, user_id: int, amount_fen: int, *, today: date,
                   exclude: tuple[SourceKind, int] | None = None) -> None:
    """Refuse a new commitment that would take the account or the member past a limit.

    Call with the account row locked (get_account(lock=True)) so concurrent bookings cannot both pass. A prepaid
    account without a limit may commit its balance plus its vouchers' balances.
    """
    if amount_fen <= 0:
        return
    whole = commitments(session, account.id, exclude=exclude)
    if account.limit_fen is not None and whole.total_fen + amount_fen > account.limit_fen:
        raise SpendingLimitExceeded(
            "This would take the account past its spending limit.", field="account_id",
            limit_fen=account.limit_fen, available_fen=max(0, account.limit_fen - whole.total_fen),
        )
    if account.prepaid and account.limit_fen is None:
        # Spent charges are already out of the balance; only the holds still wait for it.
        available = account.balance_fen + voucher_balance(session, account.id, today) - whole.held_fen
        if amount_fen > available:
            raise SpendingLimitExceeded(
                "The account's prepaid balance does not cover this: top it up first.", field="account_id",
                code="insufficient_balance", available_fen=max(0, available),
            )
    member = member_row(session, account.id, user_id)
    if member is not None and member.limit_fen is not None:
        mine = commitments(session, account.id, user_id=user_id, exclude=exclude)
        if mine.total_fen + amount_fen > member.limit_fen:
            raise SpendingLimitExceeded(
                "This would take you past your limit on this account.", field="account_id",
                code="member_limit_exceeded", limit_fen=member.limit_fen,
                available_fen=max(0, member.limit_fen - mine.total_fen),
            )


def place_hold(session: Session, account: BillingAccount, user_id: int, source: tuple[SourceKind, int],
               amount_fen: int, *, today: date) -> BillingHold:
    """Reserve an estimate on the account for a booking or order (replacing its earlier estimate), after the
    limit check. The account row must be locked by the caller."""
    check_spending(session, account, user_id, amount_fen, today=today, exclude=source)
    hold = hold_for(session, source)
    if hold is None:
        hold = BillingHold(account_id=account.id, user_id=user_id, source_kind=source[0], source_id=source[1],
                           amount_fen=amount_fen)
        session.add(hold)
    else:
        hold.account_id = account.id
        hold.amount_fen = amount_fen
        hold.released_at = None
    session.flush()
    return hold


def hold_for(session: Session, source: tuple[SourceKind, int]) -> BillingHold | None:
    return session.scalars(
        select(BillingHold).where(BillingHold.source_kind == source[0], BillingHold.source_id == source[1])
    ).first()


def release_hold(session: Session, source: tuple[SourceKind, int], *, now: datetime | None = None) -> None:
    session.execute(
        update(BillingHold)
        .where(BillingHold.source_kind == source[0], BillingHold.source_id == source[1],
               BillingHold.released_at.is_(None))
        .values(released_at=now or utcnow())
    )


def record_deposit(session: Session, actor: Actor | None, account_id: int, amount_fen: int, *,
                   reference: str = "") -> AccountDeposit:
    """Money received for a prepaid account; its institution's admin or a platform admin records it."""
    account = get_account(session, account_id, lock=True)
    if actor is not None and not roles.authorize(actor, Action.manage_institution_accounts,
                                                 institution_id=account.institution_id):
        raise Forbidden("Only the institution's administrators record deposits.", field="account_id")
    if not account.prepaid:
        raise Conflict("This account is not prepaid; its charges go on its invoice.", field="account_id",
                       code="not_prepaid")
    amount = _check_amount(amount_fen, "amount_fen", allow_zero=False)
    if len(reference) > 100:
        raise InvalidInput("The reference is too long (100 characters at most).", field="reference",
                           code="too_long")
    deposit = AccountDeposit(account_id=account.id, amount_fen=amount, reference=reference.strip(),
                             created_by_id=actor.user_id if actor else None)
    session.add(deposit)
    session.execute(update(BillingAccount).where(BillingAccount.id == account.id)
                    .values(balance_fen=BillingAccount.balance_fen + amount))
    session.flush()
    session.refresh(account)
    return deposit


def deposits(session: Session, account_id: int) -> Sequence[AccountDeposit]:
    return session.scalars(
        select(AccountDeposit).where(AccountDeposit.account_id == account_id).order_by(AccountDeposit.id.desc())
    ).all()
