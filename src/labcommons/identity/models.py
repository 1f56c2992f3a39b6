"""Identity tables: users, their external identities, sessions, tokens, roles, and both sides of OpenID Connect."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Enum, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from labcommons.catalog.models import Institution
from labcommons.db import Base, UTCDateTime, utcnow


class User(Base):
    __tablename__ = "user_account"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Stored lower-cased; unique.
    email: Mapped[str] = mapped_column(String(254), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    # Users who arrive through a regional identity service may belong to no member institution.
    institution_id: Mapped[int | None] = mapped_column(ForeignKey("institution.id"), index=True)
    # The user's home region: their institution's, or that of the identity provider that created them.
    region_code: Mapped[str] = mapped_column(ForeignKey("region.code"))
    password_hash: Mapped[str | None] = mapped_column(String(200))
    locale: Mapped[str | None] = mapped_column(String(10))
    timezone: Mapped[str | None] = mapped_column(String(64))
    is_active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set when the user asked for deletion: their personal data is replaced by placeholders, the row stays for the
    # ledger and the audit log, which refer to it by id.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    institution: Mapped[Institution | None] = relationship(lazy="raise")


class ApiToken(Base):
    """A bearer token; only its SHA-256 is stored, the token itself is shown once."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    # Space-separated scopes (see identity.roles.SCOPES); empty means every scope, for tokens made before scopes.
    scopes: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(lazy="raise")


class WebSession(Base):
    """A signed-in browser; the cookie carries a random token whose SHA-256 is stored here."""

    __tablename__ = "web_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # How the session was opened: "password" or "oidc:<provider name>"; shown on the account page.
    method: Mapped[str] = mapped_column(String(60), default="password")
    auth_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    user: Mapped[User] = relationship(lazy="raise")


class Role(enum.StrEnum):
    """Roles beyond plain user; each is granted over a scope (see identity.roles)."""

    facility_staff = "facility_staff"
    facility_manager = "facility_manager"
    institution_admin = "institution_admin"
    region_authority = "region_authority"
    platform_admin = "platform_admin"


class RoleGrant(Base):
    """One role of one user over one facility, institution, region, or the whole platform."""

    __tablename__ = "role_grant"
    __table_args__ = (UniqueConstraint("user_id", "role", "scope_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=32, create_constraint=True))
    facility_id: Mapped[int | None] = mapped_column(ForeignKey("facility.id", ondelete="CASCADE"))
    institution_id: Mapped[int | None] = mapped_column(ForeignKey("institution.id", ondelete="CASCADE"))
    region_code: Mapped[str | None] = mapped_column(ForeignKey("region.code"))
    # "facility:12", "institution:3", "region:SC" or "platform": one column so the unique key has no NULLs.
    scope_key: Mapped[str] = mapped_column(String(64))
    granted_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LoginThrottle(Base):
    """Failed sign-ins per key (an e-mail or a client address), shared by every app process."""

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    failures: Mapped[int] = mapped_column(default=0)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PasswordReset(Base):
    """A password-reset link sent by e-mail; single use, short-lived, only its hash stored."""

    __tablename__ = "password_reset"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# --- upstream OpenID Connect providers (the platform as relying party) ---


class IdentityProvider(Base):
    """A regional or institutional OpenID Connect provider users may sign in with."""

    __tablename__ = "identity_provider"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Short slug used in URLs (/login/oidc/<name>) and on the CLI.
    name: Mapped[str] = mapped_column(String(40), unique=True)
    display_name_zh: Mapped[str] = mapped_column(String(200), default="")
    display_name_en: Mapped[str] = mapped_column(String(200), default="")
    region_code: Mapped[str] = mapped_column(ForeignKey("region.code"))
    issuer: Mapped[str] = mapped_column(String(500))
    client_id: Mapped[str] = mapped_column(String(200))
    client_secret: Mapped[str] = mapped_column(String(500), default="")
    scopes: Mapped[str] = mapped_column(String(200), default="openid email profile")
    # Only a provider trusted for linking may attach its identity to an existing account by verified e-mail.
    trusted_for_linking: Mapped[bool] = mapped_column(default=False)
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ExternalIdentity(Base):
    """A user's account at an upstream provider, keyed by (issuer, subject), never by e-mail."""

    __tablename__ = "external_identity"
    __table_args__ = (UniqueConstraint("issuer", "subject"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    provider_id: Mapped[int] = mapped_column(ForeignKey("identity_provider.id", ondelete="CASCADE"), index=True)
    issuer: Mapped[str] = mapped_column(String(500))
    subject: Mapped[str] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(254))
    email_verified: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class LoginState(Base):
    """An upstream sign-in in flight: what the callback must find (state, nonce, PKCE verifier, provider)."""

    __tablename__ = "oidc_login_state"

    id: Mapped[int] = mapped_column(primary_key=True)
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    provider_id: Mapped[int] = mapped_column(ForeignKey("identity_provider.id", ondelete="CASCADE"))
    # Binds the flight to the browser that started it (hash of a cookie), against login CSRF.
    browser_hash: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[str] = mapped_column(String(100))
    code_verifier: Mapped[str] = mapped_column(String(128))
    next_path: Mapped[str] = mapped_column(String(2000), default="/")
    # Set when a signed-in user links another identity from the account page.
    link_user_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


# --- the platform as OpenID Connect provider for member systems ---


class OidcClient(Base):
    """A member system (a LIMS, a supercomputing portal) that signs its users in through the platform."""

    __tablename__ = "oidc_client"

    id: Mapped[int] = mapped_column(primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), unique=True)
    # SHA-256 of the client secret; shown once when the client is registered.
    secret_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    # Newline-separated exact redirect URIs.
    redirect_uris: Mapped[str] = mapped_column(Text)
    # Trusted clients (run by the platform's members under agreement) skip the consent screen.
    trusted: Mapped[bool] = mapped_column(default=False)
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OidcAuthorizationCode(Base):
    """An authorization code: single use, short-lived, bound to client, redirect URI and PKCE challenge."""

    __tablename__ = "oidc_authorization_code"

    id: Mapped[int] = mapped_column(primary_key=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    client_pk: Mapped[int] = mapped_column(ForeignKey("oidc_client.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"))
    redirect_uri: Mapped[str] = mapped_column(String(2000))
    scope: Mapped[str] = mapped_column(String(500))
    nonce: Mapped[str | None] = mapped_column(String(500))
    code_challenge: Mapped[str] = mapped_column(String(128))
    code_challenge_method: Mapped[str] = mapped_column(String(10), default="S256")
    auth_time: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OidcAccessToken(Base):
    """An access token for the userinfo endpoint; revoked with its siblings when its code is replayed."""

    __tablename__ = "oidc_access_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    client_pk: Mapped[int] = mapped_column(ForeignKey("oidc_client.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"))
    code_id: Mapped[int | None] = mapped_column(ForeignKey("oidc_authorization_code.id", ondelete="CASCADE"))
    scope: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OidcConsent(Base):
    """What a user allowed a non-trusted client to see, remembered so they are asked once."""

    __tablename__ = "oidc_consent"
    __table_args__ = (UniqueConstraint("user_id", "client_pk"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"))
    client_pk: Mapped[int] = mapped_column(ForeignKey("oidc_client.id", ondelete="CASCADE"))
    scope: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SigningKey(Base):
    """A key that signs the platform's ID tokens. The newest unretired key signs; retired keys stay in JWKS a while."""

    __tablename__ = "oidc_signing_key"

    id: Mapped[int] = mapped_column(primary_key=True)
    kid: Mapped[str] = mapped_column(String(64), unique=True)
    algorithm: Mapped[str] = mapped_column(String(10), default="RS256")
    private_jwk: Mapped[str] = mapped_column(Text)
    public_jwk: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
