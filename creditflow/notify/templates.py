"""Jinja2 templates of every notification, one file per event kind with one block per channel part.

``templates/{kind}.j2`` extends ``templates/_layout.j2`` and overrides its blocks: ``email_subject``,
``email_body``, ``slack`` and ``sms``. A block a kind does not override, and a kind with no file at all,
falls back to the layout's generic text, so a new event kind is delivered (generically) before it has words
of its own. Customer webhooks are not templated: they carry the event as data (see ``channels.py``).

Amounts are integers in the payload, named by their unit, and rendered exactly by filters (never floats):
``*_micros`` are micro-credits (``{{ p.balance_micros | credits }}`` -> ``1,234.5``), ``*_cents`` are US cents
(``| usd`` -> ``$25.50``) and plain ``credits`` are whole credits (``| whole``). ``credits_of(p, "balance")``
takes ``balance_micros`` or else ``balance`` as an exact decimal string (``"1234.5"``), and ``usd_of(p, "amount")``
takes ``amount_cents`` or else an already formatted ``"$25.00"``, so workflows may send either form. A float in
a payload is a template error (the channel is reported ``failed: template_error``), never a rounded number.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound

from creditflow.domain.money import AmountError, micros_to_credits, to_decimal
from creditflow.domain.topups import format_usd

TEMPLATES_DIR = Path(__file__).parent / "templates"
LAYOUT = "_layout.j2"

# Names the workflows used before the templates existed, mapped to the kind they render as.
ALIASES = {"receipt": "topup.receipt"}

# Event kinds with a template of their own, with the channels each goes to when the notification does not name
# its channels (only those with a destination; "log" always). Unknown kinds: email and webhook.
ALERT = ("email", "slack", "sms", "webhook")
DEFAULT_CHANNELS: dict[str, tuple[str, ...]] = {
    "topup.receipt": ("email", "webhook"),
    "refund.succeeded": ("email", "webhook"),
    "refund.failed": ("email", "webhook"),
    "auto_recharge.succeeded": ("email", "webhook"),
    "auto_recharge.failed": ("email", "slack", "webhook"),
    "auto_recharge.disabled": ALERT,
    "auto_recharge.daily_cap_reached": ("email", "slack", "webhook"),
    "balance.low": ALERT,
    "limit.reached": ALERT,
    "usage.daily_threshold": ALERT,
    "invoice.issued": ("email", "webhook"),
    "invoice.past_due": ALERT,
    "agent.paused": ("slack", "webhook"),
    "agent.resumed": ("slack", "webhook"),
    "recurring_charge.failed": ("email", "slack", "webhook"),
}
GENERIC_CHANNELS = ("email", "webhook")
PARTS = ("email_subject", "email_body", "slack", "sms")


def canonical_kind(kind: str) -> str:
    return ALIASES.get(kind, kind)


def default_channels(kind: str) -> tuple[str, ...]:
    return DEFAULT_CHANNELS.get(canonical_kind(kind), GENERIC_CHANNELS)


def _integer(value: Any, what: str) -> int:
    """Money in a payload is an integer (or its decimal string); floats and booleans are refused."""
    if isinstance(value, bool | float):
        raise TemplateError(f"{what} must be an integer amount, not {type(value).__name__} {value!r}")
    if isinstance(value, Decimal):
        if value != value.to_integral_value():
            raise TemplateError(f"{what} must be an integer amount, got {value}")
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"{what} must be an integer amount, got {value!r}") from exc


def credits_filter(micros: Any) -> str:
    """Micro-credits as exact credits with thousands separators: 1234500000 -> ``1,234.5``."""
    return f"{micros_to_credits(_integer(micros, 'micro-credits')):,}"


def whole_filter(credits: Any) -> str:
    """Whole credits with thousands separators: 2500 -> ``2,500``."""
    return f"{_integer(credits, 'credits'):,}"


def usd_filter(cents: Any) -> str:
    """US cents as dollars: 2550 -> ``$25.50`` (negative amounts keep their sign in front)."""
    value = _integer(cents, "cents")
    return format_usd(value) if value >= 0 else "-" + format_usd(-value)


def credits_of(payload: dict[str, Any], name: str) -> str:
    """``{name}_micros`` rendered as credits, else ``{name}`` given in credits (integer or decimal string)."""
    if f"{name}_micros" in payload:
        return credits_filter(payload[f"{name}_micros"])
    if name not in payload or payload[name] is None:
        raise TemplateError(f"the payload has neither {name}_micros nor {name}")
    try:
        value = to_decimal(payload[name])
    except AmountError as exc:
        raise TemplateError(f"{name}: {exc}") from exc
    exponent = value.as_tuple().exponent
    return f"{value.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else value:,}"


def usd_of(payload: dict[str, Any], name: str) -> str:
    """``{name}_cents`` rendered as dollars, else ``{name}`` already formatted (``"$25.00"``)."""
    if f"{name}_cents" in payload:
        return usd_filter(payload[f"{name}_cents"])
    value = payload.get(name)
    if isinstance(value, str) and value.startswith(("$", "-$")):
        return value
    raise TemplateError(f"the payload has neither {name}_cents nor a formatted {name}")


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES_DIR), undefined=StrictUndefined, autoescape=False,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.filters.update(credits=credits_filter, whole=whole_filter, usd=usd_filter)
    env.globals.update(credits_of=credits_of, usd_of=usd_of)
    return env


@dataclass(frozen=True)
class Rendered:
    """The text of one notification for every templated channel."""

    email_subject: str
    email_body: str
    slack: str
    sms: str


def render(kind: str, payload: dict[str, Any], *, account_id: str, account_name: str) -> Rendered:
    """Render every part of ``kind``'s template (or the generic one); raises ``TemplateError`` on bad data."""
    env = environment()
    name = canonical_kind(kind)
    try:
        template = env.get_template(f"{name}.j2")
    except TemplateNotFound:
        template = env.get_template(LAYOUT)
    context = {"kind": name, "p": payload, "account_id": account_id, "account_name": account_name}
    parts = {part: template.render(context, part=part).strip() for part in PARTS}
    subject = " ".join(parts["email_subject"].split())  # one header line, whatever the template's layout
    return Rendered(email_subject=subject, email_body=parts["email_body"] + "\n", slack=parts["slack"],
                    sms=" ".join(parts["sms"].split()))
