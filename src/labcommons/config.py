"""Settings, read once from LABCOMMONS_* environment variables; the defaults run the embedded demo."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LABCOMMONS_", env_file=None, extra="ignore")

    database_url: str = "sqlite:///./labcommons.db"
    # Secret for signing web sessions and CSRF tokens; the demo default must be replaced in production.
    secret_key: str = "labcommons-demo-secret-change-me"
    default_timezone: str = "Asia/Shanghai"
    default_locale: str = "zh_CN"
    # Cookies are marked Secure whenever the platform is served over https (see public_base_url); set this to
    # force either way.
    cookie_secure: bool = False
    # How far ahead the earliest-slot search looks.
    earliest_slot_horizon_days: int = 90
    sqlite_busy_timeout_seconds: float = 30.0
    db_pool_size: int = 10
    max_page_size: int = 100
    # Argon2id cost of local passwords (RFC 9106 "second recommended" defaults); tests lower them for speed.
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536

    # Where users reach the platform; links in e-mails and the OpenID Connect issuer are built from it.
    public_base_url: str = "http://127.0.0.1:8000"
    # Local e-mail/password accounts; large deployments may switch them off and rely on federation only.
    local_login_enabled: bool = True
    # Sign-in throttling: this many failures per e-mail or per client address within the window lock it out.
    login_max_failures: int = 5
    login_window_seconds: int = 900
    login_lockout_seconds: int = 900
    password_reset_lifetime_seconds: int = 3600

    # Outgoing mail. "smtp" sends through smtp_host; "console" logs messages (the embedded demo).
    mail_backend: str = "console"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_starttls: bool = False
    mail_from: str = "LabCommons <noreply@labcommons.local>"

    # Background jobs (e-mail, reminders). A server that owns its database runs them in a thread unless this is
    # off (then run `labcommons worker`); the poll interval bounds how late a due job starts.
    jobs_in_process: bool = True
    job_poll_seconds: float = 5.0
    job_max_attempts: int = 5
    # Retry n waits base * 2^(n-1) seconds, at most the maximum.
    job_retry_base_seconds: float = 30.0
    job_retry_max_seconds: float = 3600.0
    # A job running longer than this is taken to have lost its worker and is queued again.
    job_stale_minutes: int = 15
    # Workers record a heartbeat this often; a running job whose worker has been silent for job_worker_dead_seconds
    # (crashed, killed, host lost) is queued again at once instead of after job_stale_minutes.
    job_heartbeat_seconds: float = 5.0
    job_worker_dead_seconds: float = 30.0

    # The platform as OpenID Connect provider.
    oidc_code_lifetime_seconds: int = 60
    oidc_token_lifetime_seconds: int = 3600
    # A retired signing key stays in the JWKS this long, so tokens it signed still verify.
    oidc_key_grace_seconds: int = 86400
    # Upstream providers: plain-HTTP issuers are allowed only on loopback (demo and tests).
    oidc_http_timeout_seconds: float = 10.0

    # Result files of service orders: "local" keeps them under result_dir, "s3" in an S3-compatible bucket
    # (needs the optional extra `s3`, i.e. boto3). Uploads are spooled to result_tmp_dir (empty: the system's
    # temporary directory) while their SHA-256 is computed.
    result_store: Literal["local", "s3"] = "local"
    # Semantic ranking in matching when the `embeddings` extra is installed; off ranks by keywords alone.
    matching_embeddings: bool = True
    result_dir: str = "./data/results"
    result_tmp_dir: str = ""
    result_max_bytes: int = 2 * 1024**3
    s3_bucket: str = ""
    # Empty: AWS itself; set it for MinIO, Ceph RGW, or a cloud's S3-compatible service.
    s3_endpoint_url: str = ""
    s3_region: str = ""
    # Empty: boto3's usual credential chain (environment, instance role, ~/.aws).
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_prefix: str = ""

    # Hostile input. Request bodies above this size are refused with 413 before they are read (result uploads have
    # result_max_bytes instead); writes are limited per caller and minute, shared by every process through the
    # database (0 turns the limit off).
    max_body_bytes: int = 1024 * 1024
    write_rate_per_minute: int = 300
    # Behind a TLS-terminating proxy: trust its X-Forwarded-Proto (for HSTS and Secure cookies) and
    # X-Forwarded-For (for per-address limits). Only switch on when the proxy overwrites these headers.
    trust_proxy_headers: bool = False
    hsts_max_age_seconds: int = 31536000

    # The audit log's chain is an HMAC under this key (empty: derived from secret_key), so whoever can write to
    # the database but does not hold the key cannot rewrite the chain unnoticed.
    audit_key: str = ""
    # "inline" appends each transaction's entries to the chain at its commit, holding the chain's head until the
    # commit ends: every writer of the platform queues there. "deferred" records entries in the same transaction
    # with their own HMAC and a sealer (a thread in every server and worker, and every reader of the log) chains
    # them within about audit_seal_interval_seconds. "auto": deferred on PostgreSQL, inline on SQLite (whose writers
    # are serialised anyway).
    audit_sealing: Literal["auto", "inline", "deferred"] = "auto"
    audit_seal_interval_seconds: float = 1.0

    # Operations. Logs are one JSON object per line ("json", for collectors) or plain text ("text"); every
    # request gets an id (X-Request-ID, taken from a trusted proxy or made up) that its log lines carry.
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # Prometheus metrics at /metrics; with several worker processes they are added up across processes through
    # files in metrics_dir (empty: a fresh temporary directory made by `labcommons serve`).
    metrics_enabled: bool = True
    metrics_dir: str = ""

    @model_validator(mode="before")
    @classmethod
    def _secure_cookies_behind_https(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("cookie_secure") is None:
            data["cookie_secure"] = str(data.get("public_base_url", "")).startswith("https://")
        return data


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings object."""
    return Settings()
