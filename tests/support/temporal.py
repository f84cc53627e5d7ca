"""Temporal helpers for tests: polling workflow state, recorded histories and replay, a time-skipping server."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from tests.conftest import _temporal_cli
from workflows.auto_recharge import AutoRechargeWorkflow
from workflows.contract import (
    QUERY_STATE,
    AccountState,
    account_workflow_id,
)
from workflows.invoice import InvoiceWorkflow
from workflows.refund import RefundWorkflow
from workflows.topup import TopUpWorkflow

T = TypeVar("T")


async def eventually(fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Poll ``fetch`` until ``ok`` (workflow tasks and visibility are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await fetch()
            if ok(value):
                return value
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s; last value: {value!r}")
        await asyncio.sleep(0.05)


async def state_of(client: Client, account_id: str) -> AccountState:
    return await client.get_workflow_handle(account_workflow_id(account_id)).query(
        QUERY_STATE, result_type=AccountState)


@pytest.fixture
async def ts_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(Path(_temporal_cli()).parent / "temporal-test-server"),
        data_converter=pydantic_data_converter)
    try:
        yield env
    finally:
        await env.shutdown()


HISTORIES = Path(__file__).resolve().parent.parent / "histories"


def replayer() -> Replayer:
    return Replayer(workflows=[TopUpWorkflow, RefundWorkflow, AutoRechargeWorkflow, InvoiceWorkflow],
                    data_converter=pydantic_data_converter)


async def record_and_replay(client: Client, workflow_id: str, name: str) -> None:
    """Replay the closed workflow's fresh history, and save it as ``{folder}/{name}.json`` if not recorded yet."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    await replayer().replay_workflow(history)
    path = HISTORIES / name.split("_", 1)[0] / f"{name}.json"
    if not path.exists() or os.environ.get("CREDITFLOW_RECORD_HISTORIES") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(history.to_json())
