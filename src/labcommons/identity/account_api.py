"""The caller's own account under /api/v1/me: profile, roles and API tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from labcommons.actor import Actor
from labcommons.catalog.schemas import Named
from labcommons.db import Database, utcnow
from labcommons.errors import InvalidInput
from labcommons.http import Id, Instant, InsufficientScope, request_db, require_scope
from labcommons.identity import roles, service
from labcommons.identity.models import ApiToken

router = APIRouter(prefix="/me", tags=["account"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "The token lacks the `account` scope, or asks for scopes it does not have"},
    404: {"description": "No such token of the caller"},
    422: {"description": "Invalid input; `field` names it"},
}


class RoleRead(BaseModel):
    role: str
    scope: str = Field(description="facility, institution, region or none (platform)")
    code: str = Field(description="The facility's, institution's or region's code; empty for platform roles")


class MeRead(BaseModel):
    id: int
    email: str
    name: str
    region: str
    institution: Named | None
    roles: list[RoleRead]
    token_scopes: list[str] | None = Field(description="The scopes of the calling token; null for a browser session")


class TokenRead(BaseModel):
    id: int
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, t: ApiToken) -> TokenRead:
        scopes = t.scopes.split() or list(roles.SCOPES)
        return cls(id=t.id, name=t.name, scopes=scopes, created_at=t.created_at, expires_at=t.expires_at,
                   last_used_at=t.last_used_at)


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    scopes: list[str] = Field(description="Some of: " + ", ".join(roles.SCOPES))
    expires_at: Instant | None = Field(
        default=None,
        description="At most a year ahead and, when a token creates it, no later than that token's own expiry; "
                    "default 90 days (or the calling token's expiry if that is sooner)",
    )


class TokenCreated(TokenRead):
    token: str = Field(description="The bearer token; shown only in this response")


class TokenList(BaseModel):
    items: list[TokenRead]


@router.get("", response_model=MeRead, responses=ERRORS)
def me(
    actor: Annotated[Actor, Depends(require_scope("account"))], db: Annotated[Database, Depends(request_db)]
) -> MeRead:
    """Who the caller is: profile, home region, institution and roles."""
    with db.unit_of_work(write=False) as session:
        user = service.find_user(session, actor.email)
        institution = user.institution
        grants = roles.list_grants(session, None, email=actor.email)
        return MeRead(
            id=user.id, email=user.email, name=user.name, region=user.region_code,
            institution=Named(code=institution.code, name_zh=institution.name_zh, name_en=institution.name_en)
            if institution else None,
            roles=[RoleRead(role=g.role, scope=g.scope_kind, code=g.scope_code) for g in grants],
            token_scopes=sorted(actor.scopes) if actor.scopes is not None else None,
        )


@router.get("/tokens", response_model=TokenList, responses=ERRORS)
def list_tokens(
    actor: Annotated[Actor, Depends(require_scope("account"))], db: Annotated[Database, Depends(request_db)]
) -> TokenList:
    """The caller's API tokens that are not revoked (the tokens themselves are never shown again)."""
    with db.unit_of_work(write=False) as session:
        return TokenList(items=[TokenRead.of(t) for t in service.list_api_tokens(session, actor.user_id)])


@router.post("/tokens", status_code=201, response_model=TokenCreated, responses=ERRORS)
def create_token(
    body: TokenCreate,
    actor: Annotated[Actor, Depends(require_scope("account"))],
    db: Annotated[Database, Depends(request_db)],
) -> TokenCreated:
    """Create an API token with scopes and an expiry; the response is the only time the token is shown."""
    if actor.scopes is not None:
        # A token must not mint a more powerful one.
        missing = sorted(s for s in set(body.scopes) if s in roles.SCOPES and s not in actor.scopes)
        if missing:
            raise InsufficientScope(missing[0])
    now = utcnow()
    expires_at = body.expires_at or now + service.TOKEN_DEFAULT_LIFETIME
    if actor.scopes is not None and actor.token_expires_at is not None:
        # Nor a longer-lived one: the new token ends no later than the calling token.
        if body.expires_at is None:
            expires_at = min(expires_at, actor.token_expires_at)
        elif body.expires_at > actor.token_expires_at:
            raise InvalidInput(
                "A token cannot create a token that outlives it; choose an expiry no later than "
                f"{actor.token_expires_at.isoformat()}.", field="expires_at", code="expiry_beyond_token",
            )
    with db.unit_of_work() as session:
        user = service.find_user(session, actor.email)
        token = service.create_api_token(
            session, user, name=body.name.strip(), scopes=body.scopes, expires_at=expires_at, now=now,
        )
        row = service.list_api_tokens(session, user.id)[0]
        return TokenCreated(**TokenRead.of(row).model_dump(), token=token)


@router.delete("/tokens/{token_id}", status_code=204, responses=ERRORS)
def revoke_token(
    token_id: Id,
    actor: Annotated[Actor, Depends(require_scope("account"))],
    db: Annotated[Database, Depends(request_db)],
) -> None:
    """Revoke one of the caller's tokens; anyone else's is 404."""
    with db.unit_of_work() as session:
        service.revoke_api_token(session, actor.user_id, token_id)
