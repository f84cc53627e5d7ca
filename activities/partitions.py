"""Partition maintenance activity: a thin adapter over ``creditflow.ledger.partitions.maintain`` (idempotent: it
creates only the months that have no partition yet and rewrites the rollups of the days it covers)."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from temporalio import activity

from activities.errors import translating_errors
from creditflow.ledger import partitions
from workflows.contract import PartitionMaintenanceInput, PartitionMaintenanceSummary


class PartitionActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @activity.defn(name="maintain_partitions")
    @translating_errors
    async def maintain_partitions(self, input: PartitionMaintenanceInput) -> PartitionMaintenanceSummary:
        done = await partitions.maintain(self._pool, input.months_ahead)
        return PartitionMaintenanceSummary(created=done.created, months_ahead=done.months_ahead,
                                           default_rows=done.default_rows, rollup_rows=done.rollup_rows)
