"""Typed Temporal client for other services, and the public contract (names, ids, signals, queries).

Anything that talks to creditflow's workflows goes through here or uses the documented names below with
a plain Temporal client and the pydantic data converter.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from typing import Any

from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode

from creditflow.config import Settings
from creditflow.domain.notifications import Notification
from creditflow.domain.topups import TopUpError, quote
from creditflow.errors import CreditflowError
from creditflow.observability.tracing import temporal_interceptors
from workflows.contract import (
    ACCOUNT_WORKFLOW,
    ACCOUNT_WORKFLOW_ID_PREFIX,
    INVOICE_WORKFLOW,
    QUERY_STATE,
    RECONCILIATION_WORKFLOW,
    REFUND_WORKFLOW,
    RENTAL_WORKFLOW,
    SA_ACCOUNT_ID,
    SA_PLAN,
    SA_STATUS,
    SEARCH_ATTRIBUTES,
    SIGNAL_OUTBOX_EVENT,
    SIGNAL_PAY_INVOICE_NOW,
    SIGNAL_PAYMENT_EVENT,
    SIGNAL_REFUND_EVENT,
    TOPUP_WORKFLOW,
    UPDATE_CHANGE_PLAN,
    UPDATE_PAUSE_AGENT,
    UPDATE_REFUND_ANSWER,
    UPDATE_RESUME_AGENT,
    UPDATE_TOPUP_ANSWER,
    WEBHOOK_REDELIVERY_WORKFLOW,
    AccountState,
    AccountWorkflowInput,
    AgentCommand,
    AgentStatus,
    InvoicePayNow,
    InvoiceWorkflowInput,
    OutboxEvent,
    PaymentEvent,
    PlanChange,
    ReconcileInput,
    ReconcileSummary,
    RefundInput,
    RefundOutcome,
    RentalInput,
    SubscriptionState,
    TopUpInput,
    TopUpOutcome,
    TopUpTerms,
    account_workflow_id,
    invoice_workflow_id,
    refund_workflow_id,
    rental_workflow_id,
    topup_workflow_id,
    webhook_redelivery_workflow_id,
)

__all__ = [
    "ACCOUNT_WORKFLOW", "ACCOUNT_WORKFLOW_ID_PREFIX", "QUERY_STATE", "SA_ACCOUNT_ID", "SA_PLAN", "SA_STATUS",
    "SEARCH_ATTRIBUTES", "SIGNAL_OUTBOX_EVENT", "AccountState", "AccountWorkflowInput", "CreditflowClient",
    "OutboxEvent", "PaymentEvent", "RefundInput", "RefundOutcome", "TopUpInput", "TopUpOutcome", "TopUpTerms",
    "account_workflow_id",
    "connect_temporal", "refund_workflow_id", "signal_with_start_account",
    "topup_input", "topup_workflow_id",
]


async def connect_temporal(settings: Settings, runtime: Runtime | None = None) -> Client:
    """A Temporal client for the configured cluster, with the pydantic data converter (and, for workers, the
    runtime that exports the SDK's metrics). With tracing on, its calls and the workers built on it are traced."""
    return await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace,
                                data_converter=pydantic_data_converter, runtime=runtime,
                                interceptors=temporal_interceptors(settings))


def account_search_attributes(account_id: str, enabled: bool = True) -> TypedSearchAttributes | None:
    """``CreditflowAccountId`` at start, so a workflow is filterable from its first event; None where the cluster
    has none of creditflow's attributes (CREDITFLOW_TEMPORAL_SEARCH_ATTRIBUTES=false)."""
    return TypedSearchAttributes([SearchAttributePair(SA_ACCOUNT_ID, account_id)]) if enabled else None


def _start_options(account_id: str, name: str | None, search_attributes: bool = True) -> dict[str, Any]:
    """Start options shared by every way of starting an account workflow.

    The search attributes make the account filterable from its first event; the workflow upserts them
    itself afterwards. A running workflow is reused (an account has exactly one), a closed one (e.g.
    terminated by an operator) is started again."""
    label = f"{name} ({account_id})" if name else account_id
    return {
        "id": account_workflow_id(account_id),
        "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        "id_reuse_policy": WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        "search_attributes": account_search_attributes(account_id, search_attributes),
        "static_summary": f"Account {label}",
        "static_details": "Entity workflow of one creditflow account: receives its outbox events "
                          "(deduplicated), answers the `state` query.",
    }


async def signal_with_start_account(client: Client, task_queue: str, account_id: str, event: OutboxEvent,
                                    *, name: str | None = None, rpc_timeout: timedelta | None = None,
                                    search_attributes: bool = True) -> WorkflowHandle[Any, Any]:
    """Deliver ``event`` to ``account:{account_id}``, starting the workflow if it is not running."""
    return await client.start_workflow(
        ACCOUNT_WORKFLOW, AccountWorkflowInput(account_id=account_id, name=name,
                                               publish_search_attributes=search_attributes),
        task_queue=task_queue, start_signal=SIGNAL_OUTBOX_EVENT, start_signal_args=[event], rpc_timeout=rpc_timeout,
        **_start_options(account_id, name, search_attributes),
    )


def topup_input(settings: Settings, account_id: str, request_id: str, *, amount_usd: object = None,
                package_id: str | None = None, payment_method_id: str | None = None,
                credit_system: str | None = None) -> TopUpInput:
    """Validate a top-up request against the configured bounds and packages (``amount_out_of_range``,
    ``unknown_package``, ``invalid_amount``) and build the workflow's input."""
    try:
        q = quote(settings.topup_policy(), amount_usd=amount_usd, package_id=package_id)
    except TopUpError as exc:
        raise CreditflowError(exc.code, str(exc)) from exc
    return TopUpInput(
        account_id=account_id, request_id=request_id, description=q.description,
        terms=TopUpTerms(amount_cents=q.amount_cents, credits=q.credits, package_id=q.package_id,
                         payment_method_id=payment_method_id, credit_system=credit_system),
        payment_expiry_seconds=settings.topup_payment_expiry_seconds,
        poll_interval_seconds=settings.topup_poll_interval_seconds)


class CreditflowClient:
    """What other services need from creditflow's workflows, typed."""

    def __init__(self, client: Client, task_queue: str, *, search_attributes: bool = True) -> None:
        self.temporal = client
        self.task_queue = task_queue
        self.search_attributes = search_attributes  # False: the cluster has none of creditflow's attributes

    @classmethod
    async def connect(cls, settings: Settings) -> CreditflowClient:
        return cls(await connect_temporal(settings), settings.temporal_task_queue,
                   search_attributes=settings.temporal_search_attributes)

    def _account_start(self, account_id: str) -> tuple[AccountWorkflowInput, dict[str, Any]]:
        return (AccountWorkflowInput(account_id=account_id, publish_search_attributes=self.search_attributes),
                _start_options(account_id, None, self.search_attributes))

    async def start_reconciliation(self, since: datetime | None = None) -> WorkflowHandle[Any, ReconcileSummary]:
        """Reconcile the ledger with Stripe now (``reconcile:manual:{uuid}``); ``since`` None: from the watermark."""
        return await self.temporal.start_workflow(
            RECONCILIATION_WORKFLOW, ReconcileInput(since=since, trigger="manual"),
            id=f"reconcile:manual:{uuid.uuid4().hex}", task_queue=self.task_queue, result_type=ReconcileSummary)

    def account_handle(self, account_id: str) -> WorkflowHandle[Any, Any]:
        return self.temporal.get_workflow_handle(account_workflow_id(account_id))

    async def account_state(self, account_id: str) -> AccountState:
        """The account workflow's ``state`` query."""
        return await self.account_handle(account_id).query(QUERY_STATE, result_type=AccountState)

    async def ensure_account_workflow(self, account_id: str) -> WorkflowHandle[Any, Any]:
        """Start the account's workflow unless it is running (no event is delivered).

        A plain start with the USE_EXISTING conflict policy does atomically what signal-with-start
        does, without a dummy signal in the history."""
        input, options = self._account_start(account_id)
        return await self.temporal.start_workflow(ACCOUNT_WORKFLOW, input, task_queue=self.task_queue, **options)

    async def topup(self, input: TopUpInput, *, wait: timedelta) -> TopUpOutcome | None:
        """Start ``topup:{account_id}:{request_id}`` (or join the running one: a repeated request never starts
        a second charge) and wait up to ``wait`` for its answer; None if it is not decided by then (the
        workflow keeps going). A request id reused with other terms is ``idempotency_conflict``; Temporal
        unreachable is ``workflow_unavailable``."""
        label = f"{input.account_id} / {input.request_id}"
        input = input.model_copy(update={"publish_search_attributes": self.search_attributes})
        start = WithStartWorkflowOperation(
            TOPUP_WORKFLOW, input, id=topup_workflow_id(input.account_id, input.request_id),
            task_queue=self.task_queue, id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=account_search_attributes(input.account_id, self.search_attributes),
            static_summary=f"Top-up {input.description} ({label})",
            static_details="Charges the card (or hands out a client secret), credits the wallet once, "
                           "sends a receipt. Query `status` for the outcome.",
            result_type=TopUpOutcome)
        return await self._answer(UPDATE_TOPUP_ANSWER, input.terms, start, TopUpOutcome, wait)

    async def refund(self, input: RefundInput, *, wait: timedelta) -> RefundOutcome | None:
        """Start ``refund:{account_id}:{request_id}`` (or join the running one: a repeated request never refunds
        twice) and wait up to ``wait`` for its answer; None if it is not decided by then (the workflow keeps
        going). A request id reused with other terms is ``idempotency_conflict``; Temporal unreachable is
        ``workflow_unavailable``."""
        purchase = input.terms.purchase_transaction_id or input.terms.payment_intent_id
        input = input.model_copy(update={"publish_search_attributes": self.search_attributes})
        start = WithStartWorkflowOperation(
            REFUND_WORKFLOW, input, id=refund_workflow_id(input.account_id, input.request_id),
            task_queue=self.task_queue, id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=account_search_attributes(input.account_id, self.search_attributes),
            static_summary=f"Refund of {purchase} ({input.account_id} / {input.request_id})",
            static_details="Reserves the unused purchased credits, refunds them through Stripe, finalizes or "
                           "releases the reservation. Query `status` for the outcome.",
            result_type=RefundOutcome)
        return await self._answer(UPDATE_REFUND_ANSWER, input.terms, start, RefundOutcome, wait)

    async def set_agent_status(self, account_id: str, command: AgentCommand, *, paused: bool,
                               wait: timedelta = timedelta(seconds=30)) -> AgentStatus:
        """Pause or resume an agent through ``account:{account_id}`` (the single writer of agent status);
        returns the agent's new status. Refusals come back as ``CreditflowError`` (``invalid_transition``,
        ``unknown_agent``)."""
        return await self._account_update(account_id, UPDATE_PAUSE_AGENT if paused else UPDATE_RESUME_AGENT,
                                          command, AgentStatus, wait)

    async def change_plan(self, account_id: str, change: PlanChange,
                          wait: timedelta = timedelta(seconds=30)) -> SubscriptionState:
        """Subscribe, change plan at the next renewal, or cancel, through ``account:{account_id}`` (the single
        writer of cycle state); returns the subscription. Refusals: ``unknown_plan``, ``no_subscription``."""
        return await self._account_update(account_id, UPDATE_CHANGE_PLAN, change, SubscriptionState, wait)

    async def _account_update(self, account_id: str, update: str, arg: Any, result_type: type[Any],
                              wait: timedelta) -> Any:
        """An update of the account workflow, starting it first if it is not running."""
        input, options = self._account_start(account_id)
        start = WithStartWorkflowOperation(ACCOUNT_WORKFLOW, input, task_queue=self.task_queue, **options)
        result = await self._answer(update, arg, start, result_type, wait)
        if result is None:
            raise CreditflowError("workflow_unavailable", "the account workflow did not answer in time")
        return result

    async def _answer(self, update: str, arg: Any, start: WithStartWorkflowOperation[Any, Any],
                      result_type: type[Any], wait: timedelta) -> Any:
        """Update-with-start, waiting at most ``wait``: the workflow's refusal comes back as the
        matching ``CreditflowError``; Temporal unreachable is ``workflow_unavailable``."""
        try:
            return await asyncio.wait_for(self.temporal.execute_update_with_start_workflow(
                update, arg, start_workflow_operation=start, result_type=result_type), wait.total_seconds())
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            # On our timeout the SDK turns the cancellation into WorkflowUpdateRPCTimeoutOrCancelledError (no worker
            # took the update yet, or it is still running): not decided, the workflow keeps going.
            return None
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.type:
                raise CreditflowError(cause.type, cause.message) from err
            raise
        except RPCError as err:
            raise CreditflowError("workflow_unavailable", "the workflow service is unavailable; try again later",
                                  details={"reason": err.message}) from err

    async def pay_invoice_now(self, input: InvoiceWorkflowInput, payment_method_id: str | None = None) -> None:
        """Charge an issued invoice now: signal ``pay_now`` to ``invoice:{account_id}:{period_key}``, starting a run
        if none is running (signal-with-start). A new run finds the stored invoice and makes ``input.charge_attempts``
        attempts numbered after the earlier ones, which it first reads back from Stripe (one payment per invoice).
        Temporal unreachable is ``workflow_unavailable``."""
        input = input.model_copy(update={"publish_search_attributes": self.search_attributes})
        try:
            await self.temporal.start_workflow(
                INVOICE_WORKFLOW, input, id=invoice_workflow_id(input.account_id, input.key()),
                task_queue=self.task_queue, start_signal=SIGNAL_PAY_INVOICE_NOW,
                start_signal_args=[InvoicePayNow(payment_method_id=payment_method_id)],
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                search_attributes=account_search_attributes(input.account_id, self.search_attributes),
                static_summary=f"Pay invoice {input.key()} now ({input.account_id})")
        except RPCError as err:
            raise CreditflowError("workflow_unavailable", "the workflow service is unavailable; try again later",
                                  details={"reason": err.message}) from err

    async def start_rental(self, account_id: str, charge_id: str, anchor: datetime) -> None:
        """Start the monthly schedule of a recurring charge, ``rental:{account_id}:{charge_id}`` (one running is
        kept). Temporal unreachable is ``workflow_unavailable``."""
        try:
            await self.temporal.start_workflow(
                RENTAL_WORKFLOW, RentalInput(account_id=account_id, charge_id=charge_id, anchor=anchor),
                id=rental_workflow_id(account_id, charge_id), task_queue=self.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                search_attributes=account_search_attributes(account_id, self.search_attributes),
                static_summary=f"Monthly rental {charge_id} ({account_id})")
        except RPCError as err:
            raise CreditflowError("workflow_unavailable", "the workflow service is unavailable; try again later",
                                  details={"reason": err.message}) from err

    async def signal_payment_event(self, account_id: str, request_id: str, event: PaymentEvent, *,
                                   rpc_timeout: timedelta = timedelta(seconds=10)) -> bool:
        """Wake ``topup:{account_id}:{request_id}`` (signal ``payment_event``): it re-reads the PaymentIntent now.

        False if that workflow is no longer running (it has already reached its outcome); Temporal
        unreachable is ``workflow_unavailable``."""
        handle = self.temporal.get_workflow_handle(topup_workflow_id(account_id, request_id))
        try:
            await handle.signal(SIGNAL_PAYMENT_EVENT, event, rpc_timeout=rpc_timeout)
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return False
            raise CreditflowError("workflow_unavailable", "the workflow service is unavailable; try again later",
                                  details={"reason": err.message}) from err
        return True

    async def signal_refund_event(self, account_id: str, request_id: str, *,
                                  rpc_timeout: timedelta = timedelta(seconds=10)) -> bool:
        """Wake ``refund:{account_id}:{request_id}`` (signal ``refund_event``): Stripe's word on its pending refund
        was applied to the refund row, so it reads the row now instead of at its next poll. False if that workflow is
        no longer running; Temporal unreachable is ``workflow_unavailable``."""
        handle = self.temporal.get_workflow_handle(refund_workflow_id(account_id, request_id))
        try:
            await handle.signal(SIGNAL_REFUND_EVENT, rpc_timeout=rpc_timeout)
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return False
            raise CreditflowError("workflow_unavailable", "the workflow service is unavailable; try again later",
                                  details={"reason": err.message}) from err
        return True

    async def redeliver_webhook(self, notification: Notification, key: str) -> None:
        """Start ``webhook-redelivery:{account_id}:{key}`` (a running one is kept; a finished one may run again: it
        sends nothing already sent). Temporal unreachable is ``workflow_unavailable``."""
        try:
            await self.temporal.start_workflow(
                WEBHOOK_REDELIVERY_WORKFLOW, notification,
                id=webhook_redelivery_workflow_id(notification.account_id, key), task_queue=self.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                search_attributes=account_search_attributes(notification.account_id, self.search_attributes),
                static_summary=f"Redeliver webhook {notification.kind} ({notification.account_id})")
        except RPCError as err:
            raise CreditflowError("workflow_unavailable", "the workflow service is unavailable; try again later",
                                  details={"reason": err.message}) from err
