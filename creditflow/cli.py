"""The ``creditflow`` command: run the stack (dev, api, worker), migrate, and operate the ledger."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from creditflow.agents_cli import agents_app
from creditflow.charges_cli import charges
from creditflow.config import Settings, get_settings
from creditflow.observability.logs import configure_logging
from creditflow.ops_cli import accounts_app, keys_app, wallet_app
from creditflow.partitions_cli import partitions_app
from creditflow.payment_events_cli import payment_events_app
from creditflow.reconcile_cli import reconcile
from creditflow.refund_cli import refund
from creditflow.replay_cli import replay
from creditflow.simulate_cli import simulate
from creditflow.topup_cli import topup
from creditflow.verify_cli import verify_command

app = typer.Typer(
    help="creditflow: durable billing engine (credit wallet, PostgreSQL ledger, Temporal, Stripe).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
ratecard_app = typer.Typer(help="Show and load the rate card (features and credits per unit).", no_args_is_help=True)
app.add_typer(ratecard_app, name="ratecard")
app.add_typer(accounts_app, name="accounts")
app.add_typer(keys_app, name="keys")
app.add_typer(wallet_app, name="wallet")
app.add_typer(agents_app, name="agents")
app.add_typer(payment_events_app, name="payment-events")
app.add_typer(partitions_app, name="partitions")
app.command("topup")(topup)
app.command("refund")(refund)
app.command("simulate")(simulate)
app.command("verify")(verify_command)
app.command("reconcile")(reconcile)
app.command("charges")(charges)
app.command("replay")(replay)

console = Console()


def _require_database(settings: Settings) -> str:
    if not settings.database_url:
        console.print("[red]CREDITFLOW_DATABASE_URL is not set[/red] (creditflow dev sets it for the embedded stack).")
        raise typer.Exit(2)
    return settings.database_url


@app.command()
def dev(
    data_dir: Annotated[Path | None, typer.Option(
        help="Where PostgreSQL, Temporal and localstripe keep their data between runs "
             "(default CREDITFLOW_DATA_DIR or .data).")] = None,
    api_port: Annotated[int | None, typer.Option(
        help="API port (default CREDITFLOW_API_PORT or 8000; 0 picks a free one).")] = None,
    temporal_port: Annotated[int | None, typer.Option(help="Temporal gRPC port (default: a free one).")] = None,
    temporal_ui_port: Annotated[int | None, typer.Option(help="Temporal UI port (default: a free one).")] = None,
    stripe_port: Annotated[int | None, typer.Option(help="localstripe port (default: a free one).")] = None,
    demo: Annotated[bool, typer.Option(
        help="Also create demo accounts and drive realistic usage traffic through the API.")] = False,
    demo_events: Annotated[int, typer.Option(min=1, max=100_000, help="Usage events sent by --demo.")] = 240,
    infra_only: Annotated[bool, typer.Option(
        help="Start PostgreSQL, Temporal and localstripe only; print the environment to run the API "
             "and worker yourself (e.g. under a debugger).")] = False,
) -> None:
    """Run the whole stack locally: embedded PostgreSQL, Temporal dev server + UI, localstripe, migrations,
    worker and API. Prints every URL and the admin key; Ctrl-C stops everything."""
    from creditflow.embedded import DevOptions, run_dev

    settings = get_settings()
    options = DevOptions(
        data_dir=data_dir or settings.data_dir,
        api_port=settings.api_port if api_port is None else api_port,
        temporal_port=temporal_port, temporal_ui_port=temporal_ui_port, stripe_port=stripe_port,
        demo=demo, demo_events=demo_events, infra_only=infra_only,
    )
    raise typer.Exit(run_dev(options, settings, console))


@app.command()
def migrate(as_json: Annotated[bool, typer.Option("--json", help="Print JSON (what was applied).")] = False) -> None:
    """Apply pending database migrations and seed the default rate card on a fresh database."""
    from creditflow.ledger.bootstrap import prepare_database

    settings = get_settings()
    result = prepare_database(_require_database(settings), settings.ratecard_path)
    applied = result.applied
    if as_json:
        print(json.dumps({"applied": list(applied), "ratecard_seeded": bool(result.ratecard_seeded)}))
        return
    console.print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
    if result.ratecard_seeded:
        console.print("default rate card loaded")


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default CREDITFLOW_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default CREDITFLOW_API_PORT).")] = None,
    workers: Annotated[int, typer.Option(
        min=1, help="Processes serving the port (each its own database pool and metering coalescer). With more "
                    "than one, /metrics sums all of them through PROMETHEUS_MULTIPROC_DIR (a fresh temporary "
                    "directory if unset).")] = 1,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    import uvicorn

    from creditflow.api.app import create_app

    settings = get_settings()
    _require_database(settings)
    configure_logging(settings.log_level, settings.log_format)
    bind = {"host": host or settings.api_host, "port": port or settings.api_port, "log_config": None,
            "access_log": False}
    if workers == 1:
        uvicorn.run(create_app(settings), **bind)  # type: ignore[arg-type]
        return
    import os
    import tempfile

    from creditflow.observability.metrics import MULTIPROC_ENV

    # Set before the worker processes start (spawned: they import prometheus_client with it set).
    os.environ.setdefault(MULTIPROC_ENV, tempfile.mkdtemp(prefix="creditflow-metrics-"))
    console.print(f"API: {workers} processes on {bind['host']}:{bind['port']}, metrics in {os.environ[MULTIPROC_ENV]}")
    # A spawned process imports the whole CLI before it can answer the supervisor's health ping: uvicorn's 5 s
    # default kills and respawns it forever on a loaded machine.
    uvicorn.run("creditflow.api.app:app_from_environment", factory=True, workers=workers,  # type: ignore[arg-type]
                timeout_worker_healthcheck=60, **bind)


@app.command()
def worker() -> None:
    """Run the Temporal worker (workflows and activities) and the outbox relay."""
    from workers.main import run_worker

    settings = get_settings()
    _require_database(settings)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(run_worker(settings))


@app.command("worker-health")
def worker_health(
    url: Annotated[str | None, typer.Option(help="The worker's health URL (default: from its port settings).")] = None,
    port: Annotated[int | None, typer.Option(help="The worker's metrics port.")] = None,
) -> None:
    """Exit 0 when the local worker is healthy, 1 otherwise (a compose/Kubernetes health check)."""
    from creditflow.observability.probe import check_worker, worker_health_url

    target = worker_health_url(get_settings(), url, port)
    if target is None:
        console.print("no worker port: pass --port, or set CREDITFLOW_WORKER_METRICS_PORT (or _PORT_FILE)")
        raise typer.Exit(2)
    ok, detail = check_worker(target)
    console.print(detail, soft_wrap=True, highlight=False)
    raise typer.Exit(0 if ok else 1)


@ratecard_app.command("show")
def ratecard_show(as_json: Annotated[bool, typer.Option("--json", help="Print JSON (exact numbers).")] = False) -> None:
    """List features and the rate in force now."""
    from creditflow.ledger.db import open_pool
    from creditflow.ledger.ratecard import list_features

    url = _require_database(get_settings())

    async def run() -> None:
        pool = open_pool(url, 1, 2)
        await pool.open()
        try:
            features = await list_features(pool)
        finally:
            await pool.close()
        if as_json:
            from creditflow.ops_cli import dumps

            print(dumps(features))
            return
        table = Table("feature", "channel", "unit", "credits/unit", "base", "since")
        for f in features:
            table.add_row(f.id, f.channel, f.unit, str(f.credits_per_unit), f.base_feature_id or "",
                          f.effective_at.isoformat() if f.effective_at else "")
        console.print(table)

    asyncio.run(run())


@ratecard_app.command("load")
def ratecard_load(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="YAML rate card file.")],
    effective_at: Annotated[datetime | None, typer.Option(help="When the rates take effect (default now).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (the rate card in force after).")] = False,
) -> None:
    """Load a rate card file; changed rates become new versions (effective now or at --effective-at)."""
    from creditflow.ledger.db import open_pool
    from creditflow.ledger.ratecard import load_ratecard

    url = _require_database(get_settings())

    async def run() -> None:
        pool = open_pool(url, 1, 2)
        await pool.open()
        try:
            features = await load_ratecard(pool, path, effective_at)
        finally:
            await pool.close()
        if as_json:
            from creditflow.ops_cli import dumps

            print(dumps({"path": str(path), "features": features}))
            return
        console.print(f"loaded {len(features)} features from {path}")

    asyncio.run(run())


if __name__ == "__main__":
    app()
