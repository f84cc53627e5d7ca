"""A worker's observability: its metrics/health endpoint, the Temporal SDK's runtime telemetry, the database
figures, and one log line per activity attempt with the workflow and account it serves.

``WorkerObservability`` is set up before the Temporal client connects (the SDK's metrics belong to the runtime
the client is created with) and started once the worker runs; ``workers.main.run_worker`` wires it in.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from creditflow.observability import logs
from creditflow.observability.metrics import DatabaseStats, MetricsServer, free_loopback_port, temporal_runtime

log = logging.getLogger("creditflow.worker")
activity_log = logging.getLogger("creditflow.activity")

_ACCOUNT_ID = re.compile(r"acc_[0-9a-f]{32}")


def account_of(workflow_id: str | None, args: Any) -> str | None:
    """The account an activity works for: its input's ``account_id``, else the one in its workflow id
    (``account:acc_...``, ``topup:acc_...:...``)."""
    for arg in args or ():
        value = getattr(arg, "account_id", None)
        if isinstance(value, str):
            return value
    found = _ACCOUNT_ID.search(workflow_id or "")
    return found.group(0) if found else None


class _AttemptLogger(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        token = logs.new_context(workflow_id=info.workflow_id, run_id=info.workflow_run_id,
                                 activity=info.activity_type, attempt=info.attempt,
                                 account_id=account_of(info.workflow_id, input.args))
        started = time.perf_counter()
        try:
            result = await self.next.execute_activity(input)
        except ApplicationError as err:
            ms = (time.perf_counter() - started) * 1000
            if err.non_retryable:  # a refusal (card declined, ...): an outcome, said once at INFO
                activity_log.info("activity %s refused (%s: %s) in %.1fms", info.activity_type, err.type,
                                  err.message, ms, extra={"outcome": "refused", "code": err.type})
            else:
                activity_log.warning("activity %s attempt %d failed (%s: %s) in %.1fms; Temporal retries it",
                                     info.activity_type, info.attempt, err.type, err.message, ms,
                                     extra={"outcome": "failed", "code": err.type})
            raise
        except BaseException as err:
            activity_log.warning("activity %s attempt %d failed (%s: %s) in %.1fms", info.activity_type,
                                 info.attempt, type(err).__name__, err, (time.perf_counter() - started) * 1000,
                                 extra={"outcome": "failed"})
            raise
        else:
            activity_log.info("activity %s completed in %.1fms", info.activity_type,
                              (time.perf_counter() - started) * 1000, extra={"outcome": "completed"})
            return result
        finally:
            logs.end_context(token)


class ActivityLogInterceptor(Interceptor):
    """One line per activity attempt (completed, refused, or failed and retried), with its ids."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _AttemptLogger(next)


class WorkerObservability:
    """The endpoint, the SDK runtime and the figures of one worker process."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.enabled = settings.worker_metrics_port >= 0
        self.temporal_port = free_loopback_port() if self.enabled else None
        self.runtime = temporal_runtime(self.temporal_port) if self.temporal_port else None
        self.stats = DatabaseStats()
        self.server: MetricsServer | None = None
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self._stats_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while the Temporal worker and the outbox relay run and the database answered lately."""
        checks: dict[str, str] = {}
        for name, task in self.tasks.items():
            checks[name] = "running" if not task.done() else "stopped"
        if not self.tasks:
            checks["worker"] = "starting"
        stale = time.time() - self.stats.refreshed_at > 3 * self.settings.metrics_refresh_seconds + 10
        checks["database"] = self._stats_error or ("stale" if stale and self.stats.refreshed_at else "ok")
        ok = bool(self.tasks) and all(v in ("running", "ok") for v in checks.values())
        return ok, {"status": "ok" if ok else "unavailable", "checks": checks}

    def start(self, pool: Any) -> None:
        if not self.enabled:
            return
        from prometheus_client import REGISTRY

        if self.stats not in getattr(REGISTRY, "_collector_to_names", {}):
            REGISTRY.register(self.stats)
        self.server = MetricsServer(self.settings.worker_metrics_host, self.settings.worker_metrics_port,
                                    REGISTRY, self.temporal_port, self.health).start()
        if self.settings.worker_metrics_port_file:
            Path(self.settings.worker_metrics_port_file).write_text(f"{self.server.port}\n")
        log.info("worker metrics and health on %s (health: /healthz)", self.server.url,
                 extra={"metrics_url": self.server.url})
        self._task = asyncio.create_task(self._refresh(pool), name="metrics-refresh")

    async def _refresh(self, pool: Any) -> None:
        while True:
            try:
                await self.stats.refresh(pool)
                self._stats_error = None
            except Exception as exc:  # the database away: health says so; the loop goes on
                self._stats_error = f"unavailable: {type(exc).__name__}"
                log.warning("could not read the metrics figures from the database: %s", exc)
            await asyncio.sleep(self.settings.metrics_refresh_seconds)

    def stop(self) -> None:
        from prometheus_client import REGISTRY

        if self._task:
            self._task.cancel()
        if self.server:
            self.server.stop()
        if self.stats in getattr(REGISTRY, "_collector_to_names", {}):
            REGISTRY.unregister(self.stats)
