"""Cluster setup for creditflow: register its search attributes (Keyword) in a namespace.

The embedded dev server gets them with ``--search-attribute`` flags (``dev_server_args``); a
self-hosted cluster with ``ensure_search_attributes``. Temporal Cloud does not accept this operator call:
add them there with ``tcld`` or the Cloud UI.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
)
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

from workflows.contract import (
    PARTITION_MAINTENANCE_WORKFLOW,
    PARTITIONS_SCHEDULE_ID,
    RECONCILE_SCHEDULE_ID,
    RECONCILIATION_WORKFLOW,
    SEARCH_ATTRIBUTES,
    PartitionMaintenanceInput,
    ReconcileInput,
)


def dev_server_args(keys: Sequence[SearchAttributeKey[str]] = SEARCH_ATTRIBUTES) -> list[str]:
    """``temporal server start-dev`` flags that register the search attributes."""
    args: list[str] = []
    for key in keys:
        args += ["--search-attribute", f"{key.name}=Keyword"]
    return args


async def ensure_search_attributes(client: Client, namespace: str,
                                   keys: Sequence[SearchAttributeKey[str]] = SEARCH_ATTRIBUTES) -> list[str]:
    """Register the missing Keyword attributes; idempotent. Returns the names it added."""
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace))
    existing = set(listed.custom_attributes) | set(listed.system_attributes)
    missing = [key.name for key in keys if key.name not in existing]
    if missing:
        try:
            await client.operator_service.add_search_attributes(AddSearchAttributesRequest(
                namespace=namespace,
                search_attributes={name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in missing},
            ))
        except RPCError as err:
            # Another process registered them between our list and add.
            if err.status != RPCStatusCode.ALREADY_EXISTS:
                raise
    return missing


async def ensure_reconcile_schedule(client: Client, *, task_queue: str, interval_hours: int,
                                    schedule_id: str = RECONCILE_SCHEDULE_ID) -> ScheduleHandle | None:
    """Create (or bring up to date) the Schedule that starts ``ReconciliationWorkflow`` every ``interval_hours``;
    0 deletes it. Idempotent, and safe when several workers start at once. Runs do not overlap: a run still going
    when the next is due makes the schedule skip that one (the next covers its window: runs start at the last
    completed run's end)."""
    return await _ensure_interval_schedule(
        client, schedule_id, interval_hours,
        ScheduleActionStartWorkflow(RECONCILIATION_WORKFLOW, ReconcileInput(trigger="schedule"),
                                    id=f"reconcile:{schedule_id}", task_queue=task_queue))


async def ensure_partitions_schedule(client: Client, *, task_queue: str, interval_hours: int, months_ahead: int,
                                     schedule_id: str = PARTITIONS_SCHEDULE_ID) -> ScheduleHandle | None:
    """Create (or bring up to date) the Schedule that starts ``PartitionMaintenanceWorkflow`` every
    ``interval_hours`` (0 deletes it): the journal's coming months are created ahead of time, and the days that
    are over rolled up. Idempotent, like the workflow it starts; runs do not overlap."""
    return await _ensure_interval_schedule(
        client, schedule_id, interval_hours,
        ScheduleActionStartWorkflow(PARTITION_MAINTENANCE_WORKFLOW,
                                    PartitionMaintenanceInput(months_ahead=months_ahead),
                                    id=f"partitions:{schedule_id}", task_queue=task_queue))


async def _ensure_interval_schedule(client: Client, schedule_id: str, interval_hours: int,
                                    action: ScheduleActionStartWorkflow) -> ScheduleHandle | None:
    """Create or update the Schedule ``schedule_id`` (every ``interval_hours``, overlapping runs skipped); 0
    deletes it. Safe when several workers start at once."""
    handle = client.get_schedule_handle(schedule_id)
    if interval_hours <= 0:
        try:
            await handle.delete()
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
        return None
    schedule = Schedule(
        action=action,
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(hours=interval_hours))]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:
        await handle.update(lambda _: ScheduleUpdate(schedule=schedule))
    return handle
