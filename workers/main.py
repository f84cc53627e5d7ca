"""Composition root of the worker process: pool, Temporal client, Worker and outbox relay.

``workflow_classes`` and ``activity_functions`` are the single list of what a creditflow worker runs,
so tests and the CLI build the same worker.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.worker import Worker

from activities.accounts import AccountActivities
from activities.agents import AgentActivities
from activities.alerts import AlertActivities
from activities.auto_recharge import AutoRechargeActivities
from activities.billing_cycle import BillingCycleActivities
from activities.invoices import InvoiceActivities
from activities.notifications import NotificationActivities
from activities.partitions import PartitionActivities
from activities.payment_events import PaymentEventActivities
from activities.payments import PaymentActivities
from activities.reconcile import ReconcileActivities
from activities.refunds import RefundActivities
from activities.rentals import RentalActivities
from activities.topups import TopUpActivities
from creditflow.client import connect_temporal
from creditflow.config import Settings
from creditflow.invoicing.render import shutdown_render_pool
from creditflow.ledger.db import open_pool
from creditflow.ledger.plan_pricing import sync_plan_rates
from creditflow.observability.logs import log_startup
from creditflow.observability.worker import ActivityLogInterceptor, WorkerObservability
from creditflow.payments.gateway import StripeGateway
from creditflow.temporal_setup import ensure_partitions_schedule, ensure_reconcile_schedule, ensure_search_attributes
from workers.relay import OutboxRelay
from workflows.account import AccountWorkflow
from workflows.auto_recharge import AutoRechargeWorkflow
from workflows.invoice import InvoiceWorkflow
from workflows.partitions import PartitionMaintenanceWorkflow
from workflows.reconcile import ReconciliationWorkflow
from workflows.refund import RefundWorkflow
from workflows.rental import RentalWorkflow
from workflows.topup import TopUpWorkflow
from workflows.webhooks import WebhookRedeliveryWorkflow

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_RETRY_MAX_SECONDS = 30.0


def workflow_classes() -> list[type]:
    return [AccountWorkflow, TopUpWorkflow, RefundWorkflow, AutoRechargeWorkflow, InvoiceWorkflow,
            ReconciliationWorkflow, RentalWorkflow, WebhookRedeliveryWorkflow, PartitionMaintenanceWorkflow]


def activity_functions(pool: AsyncConnectionPool, settings: Settings,
                       gateway: StripeGateway | None = None) -> list[Callable[..., Any]]:
    """Activities bound to this process's resources (database pool, Stripe gateway from ``settings``; tests may
    pass a gateway of their own, e.g. one reporting Stripe answers the emulator cannot give)."""
    accounts = AccountActivities(pool, settings.recharge_policy())
    gateway = gateway or StripeGateway.from_settings(settings)
    payments = PaymentActivities(pool, gateway)
    topups = TopUpActivities(pool, gateway)
    notifications = NotificationActivities(pool, settings)
    refunds = RefundActivities(pool, gateway)
    recharge = AutoRechargeActivities(pool, settings.recharge_policy())
    invoices = InvoiceActivities(pool, gateway, settings)
    alerts = AlertActivities(pool, settings)
    agent_activities = AgentActivities(pool)
    payment_events = PaymentEventActivities(pool, gateway)
    cycle = BillingCycleActivities(pool, settings.plan_catalog())
    reconciliation = ReconcileActivities(pool, gateway, settings)
    partition_maintenance = PartitionActivities(pool)
    rentals = RentalActivities(pool)
    return [accounts.load_account, accounts.rebuild_account_state, payments.ensure_stripe_customer,
            recharge.load_auto_recharge, recharge.record_auto_recharge_attempt,
            cycle.start_subscription, cycle.set_pending_plan, cycle.renew_subscription, cycle.change_plan_now,
            payment_events.apply_payment_event, payment_events.credit_late_recharge, payment_events.credit_late_payment,
            agent_activities.set_agent_status, agent_activities.pause_for_limit, agent_activities.resume_system_paused,
            topups.record_topup_charge, topups.charge_topup, topups.poll_topup_payment, topups.cancel_topup_payment,
            topups.credit_topup, topups.mark_topup_charge, notifications.send_notification,
            refunds.check_refund, refunds.reserve_refund, refunds.refund_payment, refunds.finalize_refund,
            refunds.release_refund, refunds.mark_refund_pending, refunds.settle_pending_refund,
            alerts.fire_balance_alerts, alerts.send_daily_usage_alert,
            invoices.prepare_invoice, invoices.open_invoice, invoices.settle_invoice,
            invoices.record_invoice_payment_failure, invoices.check_earlier_invoice_charges,
            reconciliation.open_reconciliation, reconciliation.reconcile_with_stripe,
            reconciliation.verify_and_complete, reconciliation.fail_reconciliation, reconciliation.notify_operators,
            rentals.charge_rental, partition_maintenance.maintain_partitions]


def worker_options(settings: Settings) -> dict[str, int]:
    """The ``Worker`` options the settings decide (cache and concurrency, docs/scaling.md)."""
    return {"max_cached_workflows": settings.worker_max_cached_workflows,
            "max_concurrent_workflow_tasks": settings.worker_max_concurrent_workflow_tasks,
            "max_concurrent_activities": settings.worker_max_concurrent_activities}


def build_worker(client: Client, pool: AsyncConnectionPool, settings: Settings,
                 task_queue: str | None = None, gateway: StripeGateway | None = None, **options: Any) -> Worker:
    """The worker with every workflow and activity; ``options`` go to ``Worker`` (e.g. ``max_cached_workflows``)
    and override the settings' ``worker_options``."""
    interceptors = [ActivityLogInterceptor(), *options.pop("interceptors", [])]  # a log line per activity attempt
    defaults = worker_options(settings)
    if "tuner" in options:  # a tuner replaces the fixed slot counts (the SDK refuses both)
        defaults = {"max_cached_workflows": defaults["max_cached_workflows"]}
    options = {**defaults, **options}
    return Worker(client, task_queue=task_queue or settings.temporal_task_queue, interceptors=interceptors,
                  workflows=workflow_classes(), activities=activity_functions(pool, settings, gateway), **options)


async def connect_with_retry(settings: Settings, runtime: Runtime | None = None) -> Client:
    """Wait for Temporal instead of crashing when the worker starts first (docker compose, dev stack)."""
    delay = 1.0
    while True:
        try:
            return await connect_temporal(settings, runtime)
        except RuntimeError as err:  # the SDK reports connection failures as RuntimeError
            log.warning("Temporal at %s not reachable (%s); retrying in %.0f s",
                        settings.temporal_address, err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, CONNECT_RETRY_MAX_SECONDS)


async def register_search_attributes(client: Client, settings: Settings) -> None:
    """Workflows and the relay need the attributes registered; do it here for self-hosted clusters.

    Temporal Cloud refuses this call (they are added with tcld there), so a failure is only logged."""
    try:
        added = await ensure_search_attributes(client, settings.temporal_namespace)
    except Exception as err:
        log.warning("could not register search attributes (%s); register them on the cluster", err)
    else:
        if added:
            log.info("registered search attributes: %s", ", ".join(added))


async def schedule_reconciliation(client: Client, settings: Settings) -> None:
    """The daily reconciliation with Stripe (CREDITFLOW_RECONCILE_INTERVAL_HOURS; 0: none). A failure is logged,
    not fatal: the worker's other work does not depend on it."""
    try:
        await ensure_reconcile_schedule(client, task_queue=settings.temporal_task_queue,
                                        interval_hours=settings.reconcile_interval_hours)
    except Exception as err:
        log.warning("could not create the reconciliation schedule (%s); run `creditflow reconcile` by hand", err)
    else:
        log.info("reconciliation schedule: every %d h", settings.reconcile_interval_hours)


async def schedule_partition_maintenance(client: Client, settings: Settings) -> None:
    """The journal's coming monthly partitions, created ahead of time (CREDITFLOW_PARTITION_INTERVAL_HOURS; 0:
    none). A failure is logged, not fatal: inserts still land (in the DEFAULT partition) without it."""
    try:
        await ensure_partitions_schedule(client, task_queue=settings.temporal_task_queue,
                                         interval_hours=settings.partition_interval_hours,
                                         months_ahead=settings.partition_months_ahead)
    except Exception as err:
        log.warning("could not create the partition schedule (%s); run `creditflow partitions ensure` by hand", err)
    else:
        log.info("partition maintenance schedule: every %d h", settings.partition_interval_hours)


async def run_worker(settings: Settings) -> None:
    """Run the worker and the outbox relay until SIGINT/SIGTERM, then shut both down cleanly."""
    pool = open_pool(settings.database_url, settings.db_pool_min_size, settings.db_pool_max_size)
    await pool.open()
    await sync_plan_rates(pool, settings.plan_catalog())  # the hot path prices plan accounts from plan_rates
    observability = WorkerObservability(settings)  # before connecting: the SDK's metrics live in the runtime
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        client = await _until_stopped(connect_with_retry(settings, observability.runtime), stop)
        if client is None:
            return
        await register_search_attributes(client, settings)
        await schedule_reconciliation(client, settings)
        await schedule_partition_maintenance(client, settings)
        worker = build_worker(client, pool, settings)
        relay = OutboxRelay(pool, client, settings)
        tasks = [asyncio.create_task(worker.run(), name="temporal-worker"),
                 asyncio.create_task(relay.run(), name="outbox-relay"),
                 asyncio.create_task(stop.wait(), name="stop")]
        observability.tasks = {"worker": tasks[0], "relay": tasks[1]}
        observability.start(pool)
        log_startup("worker", settings, metrics_url=observability.server.url if observability.server else None)
        log.info("worker running on task queue %r (Temporal %s, namespace %s)",
                 settings.temporal_task_queue, settings.temporal_address, settings.temporal_namespace)
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        tasks[1].cancel()
        tasks[2].cancel()
        if not tasks[0].done():
            await worker.shutdown()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if task in done and isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError):
                raise result
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        observability.stop()
        shutdown_render_pool()
        await pool.close()


async def _until_stopped(coro: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """``coro``'s result, or None if ``stop`` is set first."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()
