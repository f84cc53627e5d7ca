"""Worker settings for scale (docs/scaling.md, "Billing cycles and live workflows"): the workflow cache and slot
counts come from the settings, and invoice PDFs render in other processes with the same result."""

from __future__ import annotations

import io
import os

import psutil
import pytest
from psycopg_pool import AsyncConnectionPool
from pypdf import PdfReader
from temporalio.client import Client

from creditflow.config import Settings
from creditflow.invoicing import render
from creditflow.invoicing.render import InvoiceRenderError, html_to_pdf, pdf_from_html, render_html
from tests.support.invoices import draft
from workers.main import build_worker


def pdf_text(pdf: bytes) -> tuple[int, list[str]]:
    reader = PdfReader(io.BytesIO(pdf))
    return len(reader.pages), [line.strip() for page in reader.pages for line in page.extract_text().splitlines()
                               if line.strip()]


def test_worker_settings_default_to_ten_workflow_tasks_and_one_render_process() -> None:
    s = Settings()
    assert (s.worker_max_cached_workflows, s.worker_max_concurrent_workflow_tasks,
            s.worker_max_concurrent_activities, s.invoice_render_processes) == (1000, 10, 100, 1)


async def test_worker_takes_its_cache_and_slots_from_the_settings(temporal_client: Client, pool: AsyncConnectionPool,
                                                                  settings: Settings) -> None:
    tuned = settings.model_copy(update={"worker_max_cached_workflows": 7, "worker_max_concurrent_workflow_tasks": 5,
                                        "worker_max_concurrent_activities": 3})
    config = build_worker(temporal_client, pool, tuned, task_queue="scaling-settings-1").config()
    assert (config["max_cached_workflows"], config["max_concurrent_workflow_tasks"],
            config["max_concurrent_activities"]) == (7, 5, 3)
    # An explicit option (tests pass max_cached_workflows=0) still wins over the setting.
    config = build_worker(temporal_client, pool, tuned, task_queue="scaling-settings-2",
                          max_cached_workflows=0).config()
    assert (config["max_cached_workflows"], config["max_concurrent_activities"]) == (0, 3)


async def test_a_pdf_rendered_in_a_render_process_is_the_same_document() -> None:
    html = render_html(draft())
    here = pdf_text(html_to_pdf(html))
    elsewhere = await pdf_from_html(html, processes=1)
    assert pdf_text(elsewhere) == here
    assert here[0] == 1 and "Total due" in " ".join(here[1])
    children = [p.pid for p in psutil.Process().children()]
    pool = render._pool
    assert pool is not None
    render_pids = [p.pid for p in pool._processes.values()]  # type: ignore[union-attr]
    assert render_pids and all(pid in children and pid != os.getpid() for pid in render_pids)


async def test_a_dead_render_process_fails_one_render_and_is_replaced() -> None:
    html = render_html(draft())
    await pdf_from_html(html, processes=1)
    pool = render._pool
    assert pool is not None
    for process in list(pool._processes.values()):  # type: ignore[union-attr]
        process.kill()
        process.join()
    with pytest.raises(InvoiceRenderError):
        await pdf_from_html(html, processes=1)
    assert pdf_text(await pdf_from_html(html, processes=1)) == pdf_text(html_to_pdf(html))
    assert render._pool is not pool
    render.shutdown_render_pool()
    assert render._pool is None
