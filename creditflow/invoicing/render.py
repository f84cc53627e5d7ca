"""Render a drafted invoice to HTML (Jinja2, autoescaped) and to PDF from that same HTML.

The PDF comes from ``xhtml2pdf`` (pure Python on top of ReportLab): ``pip install`` is the whole
setup, with no system libraries, which is why it is used rather than WeasyPrint. One template
serves both outputs, so the PDF says exactly what the HTML says. The template uses only what
xhtml2pdf supports (tables for layout, CSS 2.1 basics) and the standard PDF fonts, which cover
Western European text (Latin-1 and the euro sign); other scripts would need a TTF font registered.

Amounts are formatted from integers and Decimals here, never through floats.
"""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from creditflow.domain.invoices import InvoiceDraft

TEMPLATES = Path(__file__).resolve().parent / "templates"
INVOICE_TEMPLATE = "invoice.html"


class InvoiceRenderError(RuntimeError):
    """The PDF renderer reported an error for an invoice's HTML."""


def format_cents(cents: int) -> str:
    """2550 -> "$25.50", 123456 -> "$1,234.56", -1500 -> "-$15.00"."""
    sign = "-" if cents < 0 else ""
    whole, rest = divmod(abs(cents), 100)
    return f"{sign}${whole:,}.{rest:02d}"


def format_usd(amount: Decimal) -> str:
    """An exact USD price with at least two decimals: 1.5 -> "$1.50", 0.001 -> "$0.001"."""
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    cents = amount.quantize(Decimal("0.01"))
    shown = cents if amount == cents else amount.normalize()
    return f"{sign}${shown:,f}"


def format_quantity(value: Decimal | int) -> str:
    """Exact, no exponent, thousands separated: 1500 -> "1,500", 12.5 -> "12.5"."""
    value = Decimal(value)
    if value == value.to_integral_value():
        return f"{value.quantize(Decimal(1)):,f}"
    return f"{value.normalize():,f}"


def format_date(value: datetime) -> str:
    """UTC calendar date, ISO order, so no locale can misread it."""
    return f"{value:%Y-%m-%d}"


@lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(cents=format_cents, usd=format_usd, qty=format_quantity, date=format_date)
    return env


def render_html(draft: InvoiceDraft) -> str:
    """The invoice as a standalone HTML document (every customer-supplied string escaped)."""
    return _environment().get_template(INVOICE_TEMPLATE).render(invoice=draft)


def html_to_pdf(html: str) -> bytes:
    """PDF bytes from HTML with xhtml2pdf; its errors are raised, not written into the document."""
    from xhtml2pdf import pisa  # imported here: ReportLab is slow to import and only rendering needs it

    out = io.BytesIO()
    # xhtml2pdf logs every CSS property it ignores at WARNING; keep the worker's log for real problems.
    logger = logging.getLogger("xhtml2pdf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        status = pisa.CreatePDF(html, dest=out, encoding="utf-8")
    finally:
        logger.setLevel(level)
    if status.err:
        raise InvoiceRenderError(f"xhtml2pdf reported {status.err} error(s) rendering the invoice")
    return out.getvalue()


def render_pdf(draft: InvoiceDraft) -> bytes:
    """The invoice as a PDF, from the same HTML as :func:`render_html`."""
    return html_to_pdf(render_html(draft))


_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _render_pool(processes: int) -> ProcessPoolExecutor:
    """The process-wide render pool (started on first use; ``spawn``: never fork a process that runs threads)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != processes:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=False)
            _pool = ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"))
            _pool_size = processes
        return _pool


def _discard_pool(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


def shutdown_render_pool() -> None:
    """Stop the render processes (the worker calls it on shutdown; a new render starts them again)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


async def pdf_from_html(html: str, processes: int = 0) -> bytes:
    """:func:`html_to_pdf` off the event loop, in ``processes`` render processes (0: here, blocking the loop).

    Rendering is pure CPU (~0.1 s per invoice, the GIL held throughout): in a thread it would still stall the
    worker's event loop, so the work goes to other processes, which also lets a billing cycle use several cores.
    Same function, same HTML, so the same document. A render process that died is replaced and the error raised
    (the activity is retried)."""
    if processes <= 0:
        return html_to_pdf(html)
    pool = _render_pool(processes)
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, html_to_pdf, html)
    except BrokenProcessPool as exc:
        _discard_pool(pool)
        raise InvoiceRenderError("an invoice render process died; the rendering is retried") from exc
