"""``PartitionMaintenanceWorkflow``: keep the journal's coming monthly partitions ready and the daily usage rollups
current (docs/partitioning.md).

Started by the Temporal Schedule ``creditflow-partitions`` (daily by default; the worker creates it). One activity,
idempotent, so a retried or overlapping run changes nothing twice. Operators run the same maintenance with
``creditflow partitions ensure``.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.partitions import PartitionActivities
    from workflows.contract import (
        PARTITION_MAINTENANCE_WORKFLOW,
        PartitionMaintenanceInput,
        PartitionMaintenanceSummary,
    )

# Creating a month is instant; rolling up a first month of usage reads that month's partition once.
MAINTAIN_TIMEOUT = timedelta(minutes=30)
MAINTAIN_RETRY = RetryPolicy(initial_interval=timedelta(seconds=10), backoff_coefficient=2.0,
                             maximum_interval=timedelta(minutes=5), maximum_attempts=5)


@workflow.defn(name=PARTITION_MAINTENANCE_WORKFLOW)
class PartitionMaintenanceWorkflow:
    @workflow.run
    async def run(self, input: PartitionMaintenanceInput) -> PartitionMaintenanceSummary:
        summary = await workflow.execute_activity_method(
            PartitionActivities.maintain_partitions, input, start_to_close_timeout=MAINTAIN_TIMEOUT,
            retry_policy=MAINTAIN_RETRY, summary="create coming journal partitions, roll up usage")
        workflow.logger.info("journal partitions: created %s, %d months ahead, %d rows in DEFAULT",
                             summary.created, summary.months_ahead, summary.default_rows)
        return summary
