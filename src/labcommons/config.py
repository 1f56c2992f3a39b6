"""Settings, read once from LABCOMMONS_* environment variables; the defaults run the embedded demo."""

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LABCOMMONS_", env_file=None, extra="ignore")

    database_url: str = "sqlite:///./labcommons.db"
    # Secret for signing web sessions and CSRF tokens; the demo default must be replaced in production.
    secret_key: str = "labcommons-demo-secret-change-me"
    default_timezone: str = "Asia/Shanghai"
    default_locale: str = "zh_CN"
    # Cookies are marked Secure unless explicitly served over plain HTTP (the embedded demo).
    cookie_secure: bool = False
    # How far ahead the earliest-slot search looks.
    earliest_slot_horizon_days: int = 90
    sqlite_busy_timeout_seconds: float = 30.0
    db_pool_size: int = 10
    max_page_size: int = 100
    # Argon2id cost of local passwords (RFC 9106 "second recommended" defaults); tests lower them for speed.
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings object."""
    return Settings()
