"""Scale-out: two API processes and two workers on one PostgreSQL and one Temporal server, as on two machines.

Both ``creditflow api`` processes (separate ports) meter usage into the same ledger; both workers poll the same task
queue and each runs an outbox relay, so auto-recharges and top-ups run on whichever worker takes them. Once the
recharges are done, the second worker is restarted with the test-only ``after_credit`` fault point armed (it is
polling before any top-up is sent): it SIGKILLs itself right after its first committed top-up credit, a kill -9 at a
known instant with other top-ups in flight. The first worker takes over once the killed activities' start-to-close
timeouts expire (``credit_topup`` 30 s). A Stripe call in flight on the dead worker (``charge_topup``,
``record_topup_charge``: ``STRIPE_TIMEOUT``, 3 minutes, not a setting) is ended by the test as the server would end
it after those 3 minutes (``time_out_stripe_attempts_of``), so the run does not wait them out. Measured on the
shared 2-core machine: the worker died 21 s in, four top-ups' ``credit_topup`` were retried (attempt 2) on the
survivor, all done 53 s in, 77 s with fixtures.

Numbers: 6 accounts (welcome bonus 5,000 credits each; auto-recharge on accounts 0-2 at threshold 1,000, +1,000).
Usage: per account 20 events of 200 credits alternating between the two APIs, 5 of them replayed through the OTHER
API (counted once), then 1 event of 100 (crosses the threshold: 900), later 5 events of 10 -> 4,150 per account.
Top-ups: per account 2 x $10 (1,000 credits), one through each API, 12 in all, in flight when the worker dies.
Expected: balance = 5,000 + 2,000 (+1,000 recharged) - 4,150 = 2,850 (3,850); one succeeded charge per request id
and per recharge; ``verify`` clean; the journal sums to zero; localstripe holds exactly the ledger's PaymentIntents.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import PendingActivityState, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.ledger.verify import verify
from creditflow.payments.gateway import StripeGateway
from creditflow.payments.topups import CHARGE_METADATA_KEY
from tests.conftest import ADMIN_KEY, STRIPE_KEY, free_port, new_card
from tests.support.auto_recharge import SETTINGS as RECHARGE_SETTINGS
from tests.support.ledger import assert_invariants
from tests.support.payments import CARDS, TOPUP, customer_of, intents_of
from tests.support.reconcile import reconcile_now
from tests.support.workers import (
    Workers,
    wait_exit,
    workers,  # noqa: F401 - fixture
)
from workflows.common import STRIPE_TIMEOUT
from workflows.contract import AutoRechargeOutcome, TopUpOutcome, auto_recharge_workflow_id, topup_workflow_id

pytestmark = [pytest.mark.temporal, pytest.mark.slow]

CREDITFLOW = Path(sys.executable).parent / "creditflow"
ACCOUNTS = 6
RECHARGING = 3  # accounts 0..2
WELCOME, THRESHOLD, RECHARGE, TOPUP_USD = 5000, 1000, 1000, 10
USAGE = 20 * 200 + 100 + 5 * 10


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=WELCOME, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1)


@pytest.fixture
async def apis(temporal_settings: Settings, tmp_path: Path) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Two ``creditflow api`` processes on two ports (as on two machines), one admin client on each."""
    s = temporal_settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITFLOW_")}
    env.update({
        "CREDITFLOW_DATABASE_URL": s.database_url, "CREDITFLOW_ADMIN_API_KEY": ADMIN_KEY,
        "CREDITFLOW_WELCOME_BONUS_CREDITS": str(WELCOME),
        "CREDITFLOW_TEMPORAL_ADDRESS": s.temporal_address, "CREDITFLOW_TEMPORAL_NAMESPACE": s.temporal_namespace,
        "CREDITFLOW_TEMPORAL_TASK_QUEUE": s.temporal_task_queue,
        "CREDITFLOW_STRIPE_API_BASE": s.stripe_api_base, "CREDITFLOW_STRIPE_API_KEY": STRIPE_KEY,
        "CREDITFLOW_STRIPE_RETRY_MAX_WAIT_SECONDS": "0.1",
        "CREDITFLOW_TOPUP_ANSWER_TIMEOUT_SECONDS": "3",  # in-flight top-ups answer 202 pending
        "CREDITFLOW_DB_POOL_MIN_SIZE": "1", "CREDITFLOW_DB_POOL_MAX_SIZE": "6",
    })
    procs: list[subprocess.Popen[bytes]] = []
    clients: list[httpx.AsyncClient] = []
    try:
        for n in range(2):
            port = free_port()
            log = (tmp_path / f"api-{n}.log").open("wb")
            procs.append(subprocess.Popen([str(CREDITFLOW), "api", "--port", str(port)], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
            log.close()
            clients.append(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}))
        deadline = time.monotonic() + 60
        for n, client in enumerate(clients):
            while True:
                try:
                    if (await client.get("/healthz", timeout=2)).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if procs[n].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"API {n} did not start:\n{(tmp_path / f'api-{n}.log').read_text()}")
                await asyncio.sleep(0.2)
        yield clients
    finally:
        for client in clients:
            await client.aclose()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def ok(resp: Any, status: int = 200) -> dict[str, Any]:
    r = await resp
    assert r.status_code == status, r.text
    return r.json()


async def eventually_result(client: Client, workflow_id: str, result_type: type[Any]) -> Any:
    """The result of a workflow that another process starts (the account workflow, for a recharge) soon."""
    while True:
        try:
            return await client.get_workflow_handle(workflow_id, result_type=result_type).result()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            await asyncio.sleep(0.2)


async def polls_activities(client: Client, task_queue: str, pid: int) -> bool:
    """Whether the worker process ``pid`` is polling the task queue for activity tasks (identity ``pid@host``)."""
    answer = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
        namespace=client.namespace, task_queue=TaskQueue(name=task_queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY))
    return any(p.identity.startswith(f"{pid}@") for p in answer.pollers)


async def time_out_stripe_attempts_of(client: Client, workflow_ids: list[str], pid: int) -> list[tuple[str, str]]:
    """End now the attempts the killed worker ``pid`` held with the 3-minute ``STRIPE_TIMEOUT`` (``charge_topup``,
    ``record_topup_charge``), as the server does once that timeout expires: a failed attempt, retried on the survivor
    by the activity's policy. Waiting for it made this test take 3 minutes more whenever the kill caught a Stripe call
    (tests/test_fault_injection.py checks that timeout and policy in a history). Attempts with the 30 s ``DB_TIMEOUT``
    (the ``credit_topup`` the worker died in) are left to the server's own timeout. Returns (workflow, activity)."""
    ended = []
    for wf in workflow_ids:
        description = await client.get_workflow_handle(wf).describe()
        for act in description.raw_description.pending_activities:
            if (act.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                    and act.last_worker_identity.startswith(f"{pid}@")
                    and act.activity_options.start_to_close_timeout.ToTimedelta() == STRIPE_TIMEOUT):
                await client.get_async_activity_handle(
                    workflow_id=wf, run_id=description.run_id, activity_id=act.activity_id).fail(
                    RuntimeError(f"start-to-close timeout of the killed worker's {act.activity_type.name} attempt"
                                 " (ended early by the test)"))
                ended.append((wf, act.activity_type.name))
    return ended


def track(api: httpx.AsyncClient, account: str, value: int, key: str) -> Any:
    return api.post("/api/v1/billing/track", json={"account_id": account, "feature_id": "chat_message",
                                                    "value": value, "idempotency_key": key})


@pytest.mark.timeout(900)  # the waits below are bounded one by one; a loaded CI machine needs the sum
async def test_two_apis_two_workers_one_killed_ledger_exact(
        apis: list[httpx.AsyncClient], workers: Workers, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
        temporal_client: Client, temporal_settings: Settings) -> None:
    started = time.monotonic()
    survivor, second = workers.start(), workers.start()
    a, b = apis

    accounts = [(await ok(apis[i % 2].post("/api/v1/accounts", json={
        "name": f"Scale {i}", "billing_email": f"s{i}@acme.test"}), 201))["id"] for i in range(ACCOUNTS)]
    for i, account in enumerate(accounts):
        await ok(apis[i % 2].post(CARDS, json={"account_id": account, "payment_method_id": new_card(sdk)}), 201)
    for account in accounts[:RECHARGING]:
        await ok(b.put(RECHARGE_SETTINGS, json={"account_id": account, "enabled": True, "threshold": THRESHOLD,
                                                 "recharge_amount": RECHARGE}))

    # Usage through both APIs alternately; 5 keys per account replayed through the other API.
    await asyncio.gather(*(ok(track(apis[k % 2], acc, 200, f"u-{k}")) for acc in accounts for k in range(20)))
    replays = await asyncio.gather(*(ok(track(apis[(k + 1) % 2], acc, 200, f"u-{k}"))
                                     for acc in accounts for k in range(5)))
    assert len(replays) == 5 * ACCOUNTS
    for i, acc in enumerate(accounts):
        assert (await ok(apis[i % 2].get("/api/v1/billing/balance", params={"account_id": acc})))["balance"] == 1000
    await asyncio.gather(*(ok(track(apis[i % 2], acc, 100, "cross")) for i, acc in enumerate(accounts)))

    # The recharges run on both workers and finish before the top-ups raise the balances back up.
    recharges = await asyncio.wait_for(asyncio.gather(*(eventually_result(
        temporal_client, auto_recharge_workflow_id(acc, 1), AutoRechargeOutcome)
        for acc in accounts[:RECHARGING])), 180)
    assert [r.status for r in recharges] == ["succeeded"] * RECHARGING, recharges
    # The second worker is restarted with the fault armed: it dies at its first ledger credit, i.e. in a top-up.
    second.terminate()
    assert await wait_exit(second, 30) == 0, (workers.logs / "worker-1.log").read_text()
    doomed = workers.start("after_credit")
    deadline = time.monotonic() + 60
    while not await polls_activities(temporal_client, temporal_settings.temporal_task_queue, doomed.pid):
        assert doomed.poll() is None and time.monotonic() < deadline, (workers.logs / "worker-2.log").read_text()
        await asyncio.sleep(0.2)

    # 12 top-ups through both APIs at once; the doomed worker dies in the middle of them.
    topups = [asyncio.ensure_future(apis[j].post(TOPUP, json={
        "account_id": acc, "amount_usd": TOPUP_USD, "request_id": f"t-{'ab'[j]}"}))
        for acc in accounts for j in (0, 1)]
    assert await wait_exit(doomed, 90) == -signal.SIGKILL, (workers.logs / "worker-2.log").read_text()
    killed_at = time.monotonic() - started
    answers = await asyncio.gather(*topups)
    assert {r.status_code for r in answers} <= {200, 202}, [r.text for r in answers]
    ids = [topup_workflow_id(acc, f"t-{x}") for acc in accounts for x in "ab"]
    ended_early = await time_out_stripe_attempts_of(temporal_client, ids, doomed.pid)
    # Usage keeps flowing through both APIs while the survivor takes over.
    await asyncio.gather(*(ok(track(apis[(i + k) % 2], acc, 10, f"late-{k}"))
                           for i, acc in enumerate(accounts) for k in range(5)))

    outcomes = await asyncio.wait_for(asyncio.gather(
        *(temporal_client.get_workflow_handle(wf, result_type=TopUpOutcome).result() for wf in ids)), 330)
    assert [o.status for o in outcomes] == ["succeeded"] * 2 * ACCOUNTS, outcomes
    assert survivor.poll() is None, (workers.logs / "worker-0.log").read_text()

    # A killed top-up activity really ran again on the survivor (the takeover was exercised), and the activities of
    # the top-ups and recharges ran on more than one worker process.
    retried, ran_on = [], set()
    for wf in ids + [auto_recharge_workflow_id(acc, 1) for acc in accounts[:RECHARGING]]:
        history = await temporal_client.get_workflow_handle(wf).fetch_history()
        started_events = [e.activity_task_started_event_attributes for e in history.events
                          if e.HasField("activity_task_started_event_attributes")]
        retried += [(wf, e.attempt) for e in started_events if e.attempt >= 2]
        ran_on |= {e.identity.split("@")[0] for e in started_events}
    assert any(wf.startswith("topup:") for wf, _ in retried), f"no top-up activity retried after the kill: {retried}"
    assert str(survivor.pid) in ran_on and ran_on & {str(second.pid), str(doomed.pid)}, (ran_on, workers.procs)

    extra_pis: dict[str, str] = {}  # a second PaymentIntent of a credited charge -> its account
    for i, acc in enumerate(accounts):
        recharged = RECHARGE if i < RECHARGING else 0
        expected = WELCOME + 2 * TOPUP_USD * 100 + recharged - USAGE
        for api in apis:  # both processes read the same ledger
            assert (await ok(api.get("/api/v1/billing/balance", params={"account_id": acc})))["balance"] == expected
        async with pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT id, kind, request_id, status, payment_intent_id, ledger_txn_id, amount_cents"
                " FROM stripe_charges"
                " WHERE account_id = %s ORDER BY kind, request_id", (acc,))).fetchall()
            credits = await (await conn.execute(
                "SELECT type, amount_micros, metadata->>'payment_intent_id' AS pi FROM journal"
                " WHERE account_id = %s AND type IN ('purchase', 'auto_recharge')", (acc,))).fetchall()
            usage = (await (await conn.execute(
                "SELECT -sum(amount_micros) AS s FROM journal WHERE account_id = %s AND type = 'usage'",
                (acc,))).fetchone())["s"]
        topup_rows = [r for r in rows if r["kind"] == "topup"]
        recharge_rows = [r for r in rows if r["kind"] == "auto_recharge"]
        assert [(r["request_id"], r["status"], r["amount_cents"]) for r in topup_rows] == [
            ("t-a", "succeeded", 1000), ("t-b", "succeeded", 1000)]
        assert [(r["status"], r["amount_cents"]) for r in recharge_rows] == [("succeeded", 1000)] * (i < RECHARGING)
        assert all(r["ledger_txn_id"] for r in rows)
        assert usage == USAGE * MICROS_PER_CREDIT
        # The ledger credited each charge's PaymentIntent once.
        ledger_pis = sorted(c["pi"] for c in credits)
        assert len(ledger_pis) == len(set(ledger_pis)) == len(rows)
        assert ledger_pis == sorted(r["payment_intent_id"] for r in rows)
        assert all(c["amount_micros"] == 1000 * MICROS_PER_CREDIT for c in credits)
        # Stripe's side: every PaymentIntent the ledger credited, and nothing else except a second PaymentIntent of
        # the SAME charge. The emulator ignores idempotency keys: a worker killed after Stripe created a charge's
        # PaymentIntent and before its id was committed makes the retry create another under the same key
        # (`creditflow:topup:{charge}`), where Stripe itself returns the first. Reconciliation reports each such
        # one as `duplicate_payment`, so an operator sees it.
        stripe_pis = intents_of(sdk, await customer_of(pool, acc))
        assert all(pi.status == "succeeded" and pi.amount == 1000 for pi in stripe_pis), stripe_pis
        assert set(ledger_pis) <= {pi.id for pi in stripe_pis}
        charge_ids = {r["id"] for r in rows}
        for pi in stripe_pis:
            if pi.id not in ledger_pis:
                assert pi.metadata[CHARGE_METADATA_KEY] in charge_ids, pi
                extra_pis[pi.id] = acc

    async with pool.connection() as conn:
        total = await (await conn.execute("SELECT sum(amount_micros) AS s, count(*) AS n FROM journal_lines"
                                          )).fetchone()
        unbalanced = await (await conn.execute("SELECT txn_id FROM journal_lines GROUP BY txn_id"
                                               " HAVING sum(amount_micros) <> 0")).fetchall()
    assert (total["s"], unbalanced) == (0, []), total  # every entry has its counter entry, per transaction
    await assert_invariants(pool)
    report = await verify(pool)
    assert report.ok and report.accounts_checked >= ACCOUNTS, report.violations
    if extra_pis:
        result = await reconcile_now(pool, StripeGateway.from_settings(temporal_settings))
        reported = {d.stripe_id: d.account_id for d in result.differences if d.kind == "duplicate_payment"}
        assert {pi: reported.get(pi) for pi in extra_pis} == extra_pis, result.differences
    print(f"scale-out: worker killed at {killed_at:.1f} s, all done in {time.monotonic() - started:.1f} s, "
          f"retried activities {retried}, ended early {ended_early}, {total['n']} journal lines")
