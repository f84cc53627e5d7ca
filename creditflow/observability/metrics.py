"""Prometheus metrics of creditflow: HTTP requests, the metering hot path, and the durable path's business figures.

Three sources, one exposition per process:

* **in-process counters** where the work happens: HTTP requests (API), usage events tracked or denied by
  code and the micro-credits they debited (wherever ``metering.track`` runs). With several API processes
  set ``PROMETHEUS_MULTIPROC_DIR`` before start-up (the client library's multi-process mode): every
  process writes its counters there and ``/metrics`` sums them.
* **database figures** read by the worker every ``metrics_refresh_seconds`` (``DatabaseStats``): top-ups
  and auto-recharges by outcome, outbox lag (age of the oldest unrelayed row), webhook lag (oldest
  unprocessed Stripe event), notification failures by channel, the last reconciliation's differences.
  They are the database's totals, so several workers report the same value (aggregate with ``max``).
* **the Temporal SDK's runtime telemetry** (workers): the Rust core serves it on a private loopback port
  and the worker's metrics endpoint appends it, so one scrape per worker sees both.

Money is counted in micro-credits (integers, exact as a float up to 2**53: 9 billion credits).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import typing
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from creditflow.domain.notifications import Channel

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# -- API and hot path (in-process) ---------------------------------------------------------------------

HTTP_REQUESTS = Counter("creditflow_http_requests", "HTTP requests answered, by route template and status.",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("creditflow_http_request_duration_seconds", "Time to answer an HTTP request.",
                         ["method", "route"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))
USAGE_EVENTS = Counter("creditflow_usage_events", "Usage events decided by the metering hot path: outcome "
                       "tracked (charged now), replayed (an idempotent repeat) or denied, with the reason code.",
                       ["outcome", "code"])
DEBITED_MICROS = Counter("creditflow_debited_micros", "Micro-credits debited by usage (1 credit = 1,000,000).")
# The journal's monthly partitions (creditflow.ledger.partitions, set by the maintenance run in the worker).
JOURNAL_PARTITIONS_CREATED = Counter("creditflow_journal_partitions_created", "Monthly journal partitions created "
                                     "ahead of time by the partition maintenance.")
JOURNAL_MONTHS_AHEAD = Gauge("creditflow_journal_partition_months_ahead", "Whole months after the current one "
                             "whose journal partition exists (alert below 1; -1: not even this month's).",
                             multiprocess_mode="max")
JOURNAL_DEFAULT_ROWS = Gauge("creditflow_journal_default_partition_rows", "Journal rows in the DEFAULT partition "
                             "(rows of a month that had no partition; 0 when all is well).", multiprocess_mode="max")

_TRACKED = USAGE_EVENTS.labels("tracked", "ok")
_REPLAYED = USAGE_EVENTS.labels("replayed", "ok")
_denied: dict[str, Any] = {}


def record_usage(allowed: bool, code: str, charged_micros: int, replayed: bool) -> None:
    """Count one decided usage event (a few hundred nanoseconds: it runs on the hot path)."""
    if not allowed:
        child = _denied.get(code)
        if child is None:
            child = _denied[code] = USAGE_EVENTS.labels("denied", code)
        child.inc()
    elif replayed:
        _REPLAYED.inc()
    else:
        _TRACKED.inc()
        if charged_micros:
            DEBITED_MICROS.inc(charged_micros)


def api_registry() -> CollectorRegistry:
    """What the API's ``/metrics`` shows: this process's metrics, or all processes' in multi-process mode."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)
    return registry


def exposition(registry: CollectorRegistry | Collector = REGISTRY) -> bytes:
    return generate_latest(registry)  # type: ignore[arg-type]


# -- Database figures (worker) -------------------------------------------------------------------------

_STATS_SQL = {
    "charges": "SELECT kind, status, count(*) AS n FROM stripe_charges GROUP BY kind, status",
    "outbox": "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS age"
              " FROM outbox WHERE dispatched_at IS NULL",
    "webhooks": "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(received_at)), 0) AS age"
                " FROM stripe_events WHERE processed_at IS NULL",
    "notifications": "SELECT channel, count(*) AS n FROM notification_deliveries WHERE status = 'failed'"
                     " GROUP BY channel",
    "reconciliation": "SELECT reported, repaired, violations, extract(epoch FROM finished_at) AS finished"
                      " FROM reconciliation_runs WHERE status = 'completed' ORDER BY finished_at DESC LIMIT 1",
}

# The channels a notification is delivered on (creditflow.domain.notifications.Channel): each exported, 0 included.
NOTIFICATION_CHANNELS = typing.get_args(Channel)

# A charge's status as an outcome an operator reads (pending and requires_action are still open).
CHARGE_OUTCOMES = {"succeeded": "succeeded", "failed": "failed", "canceled": "canceled", "pending": "pending",
                   "requires_action": "pending"}


@dataclass(eq=False)  # registered by identity in the registry
class DatabaseStats(Collector):
    """The durable path's business figures, read from the database by :meth:`refresh` and served from memory
    (a scrape never waits for the database)."""

    charges: dict[tuple[str, str], int] = field(default_factory=dict)
    outbox_pending: int = 0
    outbox_lag: float = 0.0
    webhooks_pending: int = 0
    webhook_lag: float = 0.0
    notification_failures: dict[str, int] = field(default_factory=dict)
    reconciliation: dict[str, float] = field(default_factory=dict)
    refreshed_at: float = 0.0

    async def refresh(self, pool: Any) -> None:
        async with pool.connection() as conn:
            rows = {name: await (await conn.execute(sql)).fetchall() for name, sql in _STATS_SQL.items()}
        charges: dict[tuple[str, str], int] = {}
        for r in rows["charges"]:
            key = (r["kind"], CHARGE_OUTCOMES.get(r["status"], r["status"]))
            charges[key] = charges.get(key, 0) + int(r["n"])
        self.charges = charges
        self.outbox_pending, self.outbox_lag = int(rows["outbox"][0]["n"]), float(rows["outbox"][0]["age"])
        self.webhooks_pending, self.webhook_lag = int(rows["webhooks"][0]["n"]), float(rows["webhooks"][0]["age"])
        self.notification_failures = {r["channel"]: int(r["n"]) for r in rows["notifications"]}
        last = rows["reconciliation"][0] if rows["reconciliation"] else None
        self.reconciliation = {} if last is None else {
            "reported": float(last["reported"]), "repaired": float(last["repaired"]),
            "violations": float(last["violations"] or 0), "finished": float(last["finished"])}
        self.refreshed_at = time.time()

    def collect(self) -> Iterator[Any]:
        topups = CounterMetricFamily("creditflow_topups", "Top-ups (customer-initiated charges) by outcome.",
                                     labels=["outcome"])
        recharges = CounterMetricFamily("creditflow_auto_recharges", "Auto-recharge charges by outcome.",
                                        labels=["outcome"])
        invoices = CounterMetricFamily("creditflow_invoice_charges", "Invoice charges by outcome.", labels=["outcome"])
        families = {"topup": topups, "auto_recharge": recharges, "invoice": invoices}
        # Every outcome is exported, 0 included: a rate or ratio over a series that appears only with its first
        # failure would see no change at that first failure, and a dashboard would show "no data" instead of 0.
        for kind, family in families.items():
            for outcome in sorted(set(CHARGE_OUTCOMES.values())):
                family.add_metric([outcome], self.charges.get((kind, outcome), 0))
        for (kind, outcome), n in sorted(self.charges.items()):
            if kind in families and outcome not in CHARGE_OUTCOMES.values():
                families[kind].add_metric([outcome], n)  # a status this code does not know yet
        yield from families.values()
        yield GaugeMetricFamily("creditflow_outbox_lag_seconds", "Age of the oldest outbox row not yet relayed "
                                "to its workflow (0: none pending).", value=self.outbox_lag)
        yield GaugeMetricFamily("creditflow_outbox_pending", "Outbox rows not yet relayed.", value=self.outbox_pending)
        yield GaugeMetricFamily("creditflow_webhook_lag_seconds", "Age of the oldest received Stripe event not yet "
                                "processed (0: none pending).", value=self.webhook_lag)
        yield GaugeMetricFamily("creditflow_webhooks_pending", "Stripe events received and not yet processed.",
                                value=self.webhooks_pending)
        failures = CounterMetricFamily("creditflow_notification_failures", "Notification deliveries given up "
                                       "(status failed), by channel.", labels=["channel"])
        for channel in sorted(set(NOTIFICATION_CHANNELS) | set(self.notification_failures)):
            failures.add_metric([channel], self.notification_failures.get(channel, 0))
        yield failures
        differences = GaugeMetricFamily("creditflow_reconciliation_differences", "Differences between the ledger "
                                        "and Stripe in the last completed reconciliation, by how they ended.",
                                        labels=["resolution"])
        for resolution in ("reported", "repaired"):
            differences.add_metric([resolution], self.reconciliation.get(resolution, 0.0))
        yield differences
        yield GaugeMetricFamily("creditflow_reconciliation_violations", "Invariant violations `creditflow verify` "
                                "found after the last completed reconciliation.",
                                value=self.reconciliation.get("violations", 0.0))
        yield GaugeMetricFamily("creditflow_reconciliation_last_completed_timestamp_seconds", "When the last "
                                "reconciliation completed (0: never).", value=self.reconciliation.get("finished", 0.0))
        yield GaugeMetricFamily("creditflow_stats_refreshed_timestamp_seconds", "When the database figures "
                                "above were last read.", value=self.refreshed_at)


# -- The worker's endpoint -----------------------------------------------------------------------------


def free_loopback_port() -> int:
    """A loopback port free now, for the Temporal core's private Prometheus endpoint (which cannot take 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def temporal_runtime(prometheus_port: int) -> Any:
    """A Temporal runtime whose SDK metrics (workflow/activity task latencies, slots, polls, failures) are
    served by the core on ``127.0.0.1:prometheus_port``, read by :class:`MetricsServer`."""
    from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(
        bind_address=f"127.0.0.1:{prometheus_port}", durations_as_seconds=True)))


class MetricsServer:
    """The worker's HTTP endpoint: ``/metrics`` (creditflow's metrics, then the Temporal SDK's) and ``/healthz``
    (``health()``: 200 when healthy, 503 otherwise, with a JSON body). ``port=0`` picks a free port, so several
    workers on one host never fight over one; :attr:`port` is the one bound."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry | Collector = REGISTRY,
                 temporal_port: int | None = None,
                 health: Callable[[], tuple[bool, dict[str, Any]]] | None = None) -> None:
        self._registry = registry
        self._temporal_url = f"http://127.0.0.1:{temporal_port}/metrics" if temporal_port else None
        self._health = health or (lambda: (True, {"status": "ok"}))
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def body(self) -> bytes:
        parts = [exposition(self._registry)]
        if self._temporal_url:
            try:
                with urllib.request.urlopen(self._temporal_url, timeout=2.0) as resp:  # noqa: S310 (loopback)
                    parts.append(resp.read())
            except OSError as exc:  # the core not serving yet: creditflow's metrics still go out
                log.debug("Temporal SDK metrics not readable: %s", exc)
        return b"".join(parts)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self
        import json

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, server.body())
                elif path in ("/healthz", "/readyz"):
                    ok, details = server._health()
                    self._send(200 if ok else 503, "application/json", json.dumps(details).encode())
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s: not worth a log line
                return

        return Handler


def sample(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample's value from an exposition text (tests and `creditflow` commands read metrics with it)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(s.value)
    return None


def samples(text: str, prefix: str) -> Iterable[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix):
                yield s.name, dict(s.labels), float(s.value)
