"""Settings read from the environment (``CREDITFLOW_*``), one object shared by every process.

Every external service is reachable by configuration so the same code runs on the embedded dev
stack and in production: PostgreSQL by URL, Temporal by address/namespace, Stripe by key and base.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from creditflow.domain.plans import PlanCatalog, load_plan_catalog
from creditflow.domain.recharge import (
    DEFAULT_MAX_CONSECUTIVE_FAILURES,
    DEFAULT_MAX_PER_DAY,
    DEFAULT_RETRY_BASE_SECONDS,
    DEFAULT_RETRY_MAX_SECONDS,
    RechargePolicy,
)
from creditflow.domain.topups import DEFAULT_MAX_USD, DEFAULT_MIN_USD, DEFAULT_PACKAGES, CreditPackage, TopUpPolicy
from creditflow.ledger.coalescer import DEFAULT_WRITERS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CREDITFLOW_", env_file=None, extra="ignore")

    # PostgreSQL: any server by URL. Empty means "the embedded server" (dev stack and tests only).
    database_url: str = ""
    db_pool_min_size: int = Field(default=2, ge=1)
    db_pool_max_size: int = Field(default=20, ge=1)
    # Metering: concurrent ``track`` calls of one process share transactions through at most this many
    # writers at a time (see creditflow/ledger/coalescer.py); more writers mean smaller groups.
    track_writers: int = Field(default=DEFAULT_WRITERS, ge=1, le=64)

    # Temporal: any cluster by address and namespace.
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "creditflow"
    # False where the cluster has none of creditflow's search attributes (Temporal's time-skipping test server; a
    # Temporal Cloud namespace before they are added with tcld): workflows are then started and run without them.
    temporal_search_attributes: bool = True
    # The worker's Temporal settings (docs/scaling.md, "Billing cycles and live workflows"): workflows kept in memory
    # between tasks (an evicted one replays its history on its next task; bounds the worker's memory), and the
    # workflow / activity tasks one worker process runs at once. Workflow tasks all run on one interpreter (the GIL):
    # more at once only makes each one slower, and past the 10 s workflow-task timeout they fail and are redone (the
    # SDK's default of 100 stalled a worker under load), so 10 rather than the SDK's 100.
    worker_max_cached_workflows: int = Field(default=1000, ge=0, le=1_000_000)
    worker_max_concurrent_workflow_tasks: int = Field(default=10, ge=2, le=10_000)
    worker_max_concurrent_activities: int = Field(default=100, ge=1, le=10_000)

    # Stripe: the official SDK, pointed at localstripe in dev/tests and at Stripe in production.
    stripe_api_key: SecretStr = SecretStr("sk_test_creditflow_localstripe")
    stripe_api_base: str = ""
    stripe_webhook_secret: SecretStr = SecretStr("")
    # Rate limits, 5xx and network errors are retried this many times in all (exponential backoff
    # capped at the wait below) before a call reports ``payment_provider_unavailable``.
    stripe_max_attempts: int = Field(default=4, ge=1, le=10)
    stripe_retry_max_wait_seconds: float = Field(default=2.0, ge=0, le=60)
    stripe_timeout_seconds: float = Field(default=30.0, gt=0, le=120)

    # Top-ups: bounds of a custom amount in USD (whole cents), the credit packages
    # (CREDITFLOW_TOPUP_PACKAGES as JSON: [{"id", "name", "price_usd", "credits"}]), how long the API waits
    # for the workflow's answer, and how long a client-secret payment may stay unpaid (polled meanwhile).
    topup_min_usd: Decimal = Field(default=DEFAULT_MIN_USD, gt=0)
    topup_max_usd: Decimal = Field(default=DEFAULT_MAX_USD, gt=0)
    topup_packages: list[CreditPackage] = Field(default_factory=lambda: list(DEFAULT_PACKAGES))
    topup_answer_timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    topup_payment_expiry_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    topup_poll_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    # Hosted checkout (docs/checkout.md): Stripe.js and the publishable key the page loads (``creditflow dev`` points
    # them at the emulator; empty key: the page says payments are not configured), how long a checkout link stays
    # open.
    stripe_js_url: str = "https://js.stripe.com/v3/"
    stripe_publishable_key: str = ""
    checkout_session_expiry_seconds: int = Field(default=24 * 3600, ge=1, le=7 * 24 * 3600)
    # The public origin of this API (``https://billing.example.com``) in the links it hands out: checkout and portal
    # links. Empty: the origin the request came to (right unless a proxy changes the host).
    public_url: str = Field(default="", max_length=500)

    # Auto-recharge: attempts per UTC day (declined or not), consecutive failures before it is
    # disabled, and the back-off after a failure (doubling from the base, capped).
    auto_recharge_max_per_day: int = Field(default=DEFAULT_MAX_PER_DAY, ge=1, le=100)
    auto_recharge_max_consecutive_failures: int = Field(default=DEFAULT_MAX_CONSECUTIVE_FAILURES, ge=1, le=100)
    auto_recharge_retry_base_seconds: int = Field(default=DEFAULT_RETRY_BASE_SECONDS, ge=1)
    auto_recharge_retry_max_seconds: int = Field(default=DEFAULT_RETRY_MAX_SECONDS, ge=1)

    # Notifications. A channel whose settings are missing is reported ``skipped: not_configured``
    # (never retried), so the dev stack and tests run without any of them. Timeouts stay well below the
    # ``send_notification`` activity's start-to-close timeout (30 s): the channels are sent concurrently.
    smtp_host: str = ""  # empty: email is not configured
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_from: str = "creditflow <billing@localhost>"
    smtp_starttls: bool = True  # upgrade with STARTTLS (port 587); False for a plain local relay
    smtp_use_tls: bool = False  # implicit TLS (port 465)
    smtp_timeout_seconds: float = Field(default=10.0, gt=0, le=25)
    # SMS through a Twilio-compatible API: POST {base}/2010-04-01/Accounts/{sid}/Messages.json.
    sms_api_base: str = "https://api.twilio.com"
    sms_account_sid: str = ""  # empty: SMS is not configured
    sms_auth_token: SecretStr = SecretStr("")
    sms_from_number: str = ""
    sms_timeout_seconds: float = Field(default=10.0, gt=0, le=25)
    slack_timeout_seconds: float = Field(default=10.0, gt=0, le=25)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=25)
    # A channel is tried at most this many times per notification, then reported ``failed``.
    notify_max_attempts: int = Field(default=5, ge=1, le=50)
    # How long a claimed (in-flight) channel send is protected from a concurrent attempt of the activity.
    notify_claim_seconds: float = Field(default=60.0, gt=0, le=3600)
    # Destination URLs (Slack, webhooks) are chosen by customers and called by the worker: https only, and not
    # to loopback or private IP addresses, unless allowed here (a private network, the tests' local receivers).
    notify_allow_http_urls: bool = False
    notify_allow_private_urls: bool = False

    # HTTP API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    admin_api_key: SecretStr | None = None
    # Each API process remembers a resolved key this long (0: every request queries); another process's revocation
    # is seen within it.
    api_key_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    # Operator commands: with no database URL, read-only answers (wallet history/show, agents list/events, charges)
    # come from this API with the admin key, so on-call needs no database credentials.
    api_url: str = ""

    # Ledger policy.
    welcome_bonus_credits: int = Field(default=5000, ge=0, le=10_000_000)
    hold_ttl_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    # How often the worker expires overdue holds (reads and writes already ignore them meanwhile).
    hold_sweep_interval_seconds: float = Field(default=30.0, gt=0)
    ratecard_path: Path | None = None
    # Billing: the plan catalog file (None: the packaged plans.default.yaml) and the seller
    # named on invoices.
    plans_path: Path | None = None
    invoice_seller_name: str = Field(default="creditflow", min_length=1, max_length=200)
    # Invoices: days from issue to due date (0: due on issue), and when charging the default card fails
    # (declined, or no card), how many attempts in all and how long the workflow waits between them.
    invoice_due_days: int = Field(default=0, ge=0, le=365)
    invoice_charge_attempts: int = Field(default=4, ge=1, le=20)
    invoice_retry_interval_seconds: int = Field(default=3 * 24 * 3600, ge=1, le=90 * 24 * 3600)
    # Invoice PDFs are rendered (xhtml2pdf, ~0.1 s of CPU each) in this many worker subprocesses, so a billing cycle's
    # invoices use another core and never block the worker's event loop; 0: in the worker process itself.
    invoice_render_processes: int = Field(default=1, ge=0, le=64)

    # Customer portal (docs/portal.md): a session link is valid for minutes and opens once; the session
    # then lasts this long after the last page opened. The platform's name and logo head every page; links go to
    # ``public_url``.
    portal_link_ttl_minutes: float = Field(default=5, gt=0, le=24 * 60)
    portal_session_idle_minutes: float = Field(default=60, gt=0, le=24 * 60)
    platform_name: str = Field(default="creditflow", min_length=1, max_length=100)
    platform_logo_url: str = Field(default="", max_length=500)

    # Reconciliation with Stripe (ReconciliationWorkflow on a Temporal Schedule, created by the worker).
    # 0: no schedule (run `creditflow reconcile` by hand). ``stripe_list_filters``: ask Stripe to filter lists
    # by date (None: yes for Stripe itself, no when ``stripe_api_base`` points elsewhere, e.g. the emulator).
    reconcile_interval_hours: int = Field(default=24, ge=0, le=24 * 31)
    # The journal's monthly partitions (docs/partitioning.md): the Schedule's period (0: no schedule) and how many
    # months after the current one it keeps ready.
    partition_interval_hours: int = Field(default=24, ge=0, le=24 * 31)
    partition_months_ahead: int = Field(default=3, ge=1, le=24)
    reconcile_grace_seconds: int = Field(default=900, ge=0, le=7 * 24 * 3600)
    stripe_list_filters: bool | None = None
    # Who hears about reconciliation differences and ledger violations (email, through the SMTP settings).
    operator_email: str = ""

    # Outbox relay.
    outbox_poll_interval_seconds: float = Field(default=2.0, gt=0)
    outbox_batch_size: int = Field(default=100, ge=1)

    # Observability (docs/operations.md). Logs: ``text`` (readable) or ``json`` (one object per line).
    log_level: str = Field(default="INFO", pattern=r"(?i)^(debug|info|warning|error)$")
    log_format: str = Field(default="text", pattern=r"^(text|json)$")
    # The worker's metrics and health endpoint (/metrics, /healthz): 0 picks a free port (several workers on one
    # host never fight; the port is logged and written to ``worker_metrics_port_file`` when set); -1: none.
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=0, ge=-1, le=65535)
    worker_metrics_port_file: Path | None = None
    # How often the worker reads the business figures (outbox lag, charges by outcome, ...) from the database.
    metrics_refresh_seconds: float = Field(default=15.0, gt=0, le=3600)
    # Traces (OpenTelemetry; the ``otel`` extra): ``off``, ``console`` (stdout) or ``otlp`` (to ``otel_endpoint``,
    # an OTLP/HTTP collector base URL; empty: the exporter's default, http://localhost:4318). Off adds nothing.
    otel_traces: Literal["off", "console", "otlp"] = "off"
    otel_service_name: str = Field(default="creditflow", min_length=1, max_length=200)
    otel_endpoint: str = Field(default="", max_length=500)

    # Embedded stack (creditflow dev).
    data_dir: Path = Path(".data")

    def stripe_lists_filtered(self) -> bool:
        return self.stripe_list_filters if self.stripe_list_filters is not None else not self.stripe_api_base

    def recharge_policy(self) -> RechargePolicy:
        return RechargePolicy(max_per_day=self.auto_recharge_max_per_day,
                              max_consecutive_failures=self.auto_recharge_max_consecutive_failures,
                              retry_base_seconds=self.auto_recharge_retry_base_seconds,
                              retry_max_seconds=self.auto_recharge_retry_max_seconds)

    def plan_catalog(self) -> PlanCatalog:
        """The plan catalog from ``plans_path`` (validated; raises ``PlanCatalogError`` with every problem)."""
        return load_plan_catalog(self.plans_path)

    def topup_policy(self) -> TopUpPolicy:
        return TopUpPolicy(min_usd=self.topup_min_usd, max_usd=self.topup_max_usd,
                           packages=tuple(self.topup_packages))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings`` instead of using this."""
    return Settings()
