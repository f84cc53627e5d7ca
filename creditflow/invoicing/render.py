"""Render a drafted invoice to HTML (Jinja2, autoescaped) and to PDF from that same HTML.

The PDF comes from ``xhtml2pdf`` (pure Python on top of ReportLab): ``pip install`` is the whole
setup, with no system libraries, which is why it is used rather than WeasyPrint. One template
serves both outputs, so the PDF says exactly what the HTML says. The template uses only what
xhtml2pdf supports (tables for layout, CSS 2.1 basics) and the standard PDF fonts, which cover
Western European text (Latin-1 and the euro sign); other scripts would need a TTF font registered.

Amounts are formatted from integers and Decimals here, never through floats.
"""

from __future__ import annotations

import io
import logging
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
