"""Invoice rendering: HTML (autoescaped Jinja2) and a PDF whose extracted text says exactly the same."""

from __future__ import annotations

import io
from decimal import Decimal

import pytest
from pypdf import PdfReader

from creditflow.invoicing.render import format_cents, format_quantity, format_usd, render_html, render_pdf
from tests.support.invoices import assert_run, draft


def pdf_lines(pdf: bytes) -> list[str]:
    reader = PdfReader(io.BytesIO(pdf))
    text = "\n".join(page.extract_text() for page in reader.pages)
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(("cents", "text"), [(0, "$0.00"), (5, "$0.05"), (2550, "$25.50"), (123456789, "$1,234,567.89"),
                                             (-1500, "-$15.00")])
def test_format_cents(cents: int, text: str) -> None:
    assert format_cents(cents) == text


def test_format_prices_and_quantities() -> None:
    assert [format_usd(Decimal(v)) for v in ("1.5", "199", "0.001", "-150", "1234.5")] == [
        "$1.50", "$199.00", "$0.001", "-$150.00", "$1,234.50"]
    assert [format_quantity(Decimal(v)) for v in ("1500", "12.50", "0.000001", "1E+3")] == [
        "1,500", "12.5", "0.000001", "1,000"]


def test_html_escapes_customer_text_and_shows_every_part() -> None:
    html = render_html(draft())
    assert "Müller &amp; Söhne &lt;GmbH&gt;" in html
    assert "<GmbH>" not in html
    for text in ("CF-3F2A9C1B4D5E-20260131", "2026-02-28", "2026-03-14", "2026-01-31 to 2026-02-28",
                 "PO number: PO-7781", "European VAT number (DE): DE123456789", "$215.85", "Top-up of $50.00",
                 "Creditflow Inc."):
        assert text in html


def test_pdf_text_has_the_invoice_exactly() -> None:
    pdf = render_pdf(draft())
    assert pdf.startswith(b"%PDF-")
    assert len(PdfReader(io.BytesIO(pdf)).pages) == 1
    lines = pdf_lines(pdf)
    assert lines[:2] == ["Invoice", "Creditflow Inc."]
    assert_run(lines, ["Invoice number", "CF-3F2A9C1B4D5E-20260131", "Issue date", "2026-02-28", "Due date",
                       "2026-03-14", "Billing period", "2026-01-31 to 2026-02-28", "Plan", "Growth"])
    assert_run(lines, ["Bill to", "Müller & Söhne <GmbH>", "Hauptstraße 5", "10115 Berlin", "Germany",
                       "PO number: PO-7781", "ap@mueller.example"])
    assert_run(lines, ["Tax registrations", "European VAT number (DE): DE123456789 [verified]",
                       "UK VAT number (GB): GB987654321 [unverified]"])
    assert_run(lines, ["1", "Growth plan, 2026-01-31 to 2026-02-28", "1 month", "$199.00", "$199.00"])
    assert_run(lines, ["2", "Phone number rental", "3 number", "$1.50", "$4.50"])
    assert_run(lines, ["3", "Overage drawn on the credit line", "1,234.5 credit", "$0.01", "$12.35"])
    assert_run(lines, ["Subtotal", "$215.85", "Total due", "$215.85"])
    assert_run(lines, ["voice", "2,750.5 minute", "22,004"])
    assert_run(lines, ["llm", "24,505 token", "2,450.5"])
    assert_run(lines, ["Total", "24,454.5"])
    assert_run(lines, ["Top-ups paid this period (informational)",
                       "Already charged when made; not included in the total due."])
    assert_run(lines, ["2026-02-03", "Top-up of $50.00", "5,000", "$50.00"])


def test_pdf_of_an_invoice_with_nothing_billed() -> None:
    lines = pdf_lines(render_pdf(draft(plan=None, recurring_charges=[], overage_credits=0, usage=[], top_ups=[],
                                       tax_registrations=[])))
    assert_run(lines, ["No charges this period", "$0.00", "Subtotal", "$0.00", "Total due", "$0.00"])
    assert "No usage this period" in lines
    assert not any(line.startswith(("Plan", "Tax registrations", "Top-ups")) for line in lines)
