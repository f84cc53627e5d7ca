"""Settings read from the environment (``CREDITFLOW_*``), one object shared by every process.

Every external service is reachable by configuration so the same code runs on the embedded dev
stack and in production: PostgreSQL by URL, Temporal by address/namespace, Stripe by key and base.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CREDITFLOW_", env_file=None, extra="ignore")

    # PostgreSQL: any server by URL. Empty means "the embedded server" (dev stack and tests only).
    database_url: str = ""
    db_pool_min_size: int = Field(default=2, ge=1)
    db_pool_max_size: int = Field(default=20, ge=1)

    # Temporal: any cluster by address and namespace.
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "creditflow"

    # Stripe: the official SDK, pointed at localstripe in dev/tests and at Stripe in production.
    stripe_api_key: SecretStr = SecretStr("sk_test_creditflow_localstripe")
    stripe_api_base: str = ""
    stripe_webhook_secret: SecretStr = SecretStr("")
    # Rate limits, 5xx and network errors are retried this many times in all (exponential backoff
    # capped at the wait below) before a call reports ``payment_provider_unavailable``.
    stripe_max_attempts: int = Field(default=4, ge=1, le=10)
    stripe_retry_max_wait_seconds: float = Field(default=2.0, ge=0, le=60)
    stripe_timeout_seconds: float = Field(default=30.0, gt=0, le=120)

    # HTTP API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    admin_api_key: SecretStr | None = None

    # Ledger policy.
    welcome_bonus_credits: int = Field(default=5000, ge=0, le=10_000_000)
    hold_ttl_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    # How often the worker expires overdue holds (reads and writes already ignore them meanwhile).
    hold_sweep_interval_seconds: float = Field(default=30.0, gt=0)
    ratecard_path: Path | None = None

    # Outbox relay.
    outbox_poll_interval_seconds: float = Field(default=2.0, gt=0)
    outbox_batch_size: int = Field(default=100, ge=1)

    # Embedded stack (creditflow dev).
    data_dir: Path = Path(".data")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings`` instead of using this."""
    return Settings()
