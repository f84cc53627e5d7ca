"""The billing-cycle stack for tests: settings and an account workflow on the time-skipping server."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle

from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, STRIPE_KEY
from workflows.contract import (
    ACCOUNT_WORKFLOW,
    AccountWorkflowInput,
    account_workflow_id,
)

ANCHOR = datetime(2025, 1, 31, 9, 30, tzinfo=UTC)  # a Jan 31 anchor: renews on the last day of short months


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1)


async def start_account(client: Client, queue: str, account: str) -> WorkflowHandle[Any, Any]:
    # The test server has no creditflow search attributes: the workflow publishes details only.
    return await client.start_workflow(
        ACCOUNT_WORKFLOW, AccountWorkflowInput(account_id=account, name="Acme", publish_search_attributes=False),
        id=account_workflow_id(account), task_queue=queue)
