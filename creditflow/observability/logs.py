"""Structured logs: one set-up for every process, ids on every line, secrets scrubbed, refusals quiet.

``configure_logging`` installs one handler on the root logger: JSON lines (``CREDITFLOW_LOG_FORMAT=json``, for
production log pipelines) or readable text (the default, for a terminal). Every record carries the request id
(``creditflow.api.request_context``), and the account and workflow ids of the work it belongs to (bound by the
API's access log and the worker's activity interceptor through :func:`bind`). Every line passes
:func:`scrub` last, so API keys, Stripe keys and webhook secrets, bearer tokens, database passwords and card
numbers never reach the output whatever a caller logged.

Refusals are expected outcomes, not faults: the Temporal SDK logs a failed activity attempt at WARNING with its
traceback; for a final refusal (a non-retryable ``ApplicationError``, i.e. a ``CreditflowError`` code such as
``card_declined``) :class:`RefusalFilter` drops that and the worker's attempt line says it at INFO with its code.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import Any, TextIO

from creditflow.api.request_context import current_request_id

# The fields of the unit of work a line belongs to. A mutable dict per unit (request, activity attempt) so a
# value bound deep inside (the account an endpoint resolved) is seen by the outer access-log line too.
_context: ContextVar[dict[str, Any] | None] = ContextVar("creditflow_log_context", default=None)

CONTEXT_FIELDS = ("request_id", "account_id", "workflow_id", "run_id", "activity", "attempt")

# What a LogRecord has by itself; anything else on a record came from ``extra=`` and is logged as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

_SECRETS = [
    (re.compile(r"\b(cf_(?:sk|admin)_)[A-Za-z0-9_\-]{8,}"), r"\1***"),
    (re.compile(r"\b((?:sk|rk|pk)_(?:test|live)_)[A-Za-z0-9_]{6,}"), r"\1***"),
    (re.compile(r"\b(whsec_)[A-Za-z0-9_+/=\-]{6,}"), r"\1***"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]{6,}"), r"\1***"),
    (re.compile(r"(?i)((?:password|passwd|secret|token|api_key|auth_token)\s*[=:]\s*['\"]?)[^\s'\",}&]+"), r"\1***"),
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^:/@\s]+:)[^@/\s]+(@)"), r"\1***\2"),  # user:password@ in URLs
]
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return f"{digits[:6]}***{digits[-4:]}" if _luhn(digits) else match.group(0)


# Cheap prefilters: most lines hold no secret and cost only a lower-cased substring scan and one digit search.
_KEYWORDS = ("cf_", "_test_", "_live_", "whsec_", "bearer", "passw", "secret", "token", "api_key", "://")
_DIGITS = re.compile(r"[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]")


def scrub(text: str) -> str:
    """``text`` with every secret the patterns know replaced by ``***`` (keeping a prefix to tell them apart).
    Card numbers (13-19 digits passing the Luhn check) keep their first 6 and last 4 digits, as on receipts."""
    lowered = text.lower()
    if any(k in lowered for k in _KEYWORDS):
        for pattern, replacement in _SECRETS:
            text = pattern.sub(replacement, text)
    return _CARD.sub(_mask_card, text) if _DIGITS.search(text) else text


def bind(**fields: Any) -> None:
    """Add fields (account_id, workflow_id, ...) to the current unit of work's log context."""
    ctx = _context.get()
    if ctx is not None:
        ctx.update({k: v for k, v in fields.items() if v is not None})


def new_context(**fields: Any) -> Any:
    """Start a unit of work's context; returns the token for :func:`end_context`."""
    return _context.set({k: v for k, v in fields.items() if v is not None})


def end_context(token: Any) -> None:
    _context.reset(token)


def context_fields() -> dict[str, Any]:
    fields = dict(_context.get() or {})
    rid = current_request_id()
    if rid is not None:
        fields.setdefault("request_id", rid)
    return fields


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = context_fields()
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context fields and any ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        line.update(_record_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return scrub(json.dumps(line, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """``12:00:01.234 INFO  logger: message  key=value ...`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        fields = " ".join(f"{k}={v}" for k, v in _record_fields(record).items())
        line = f"{stamp} {record.levelname:<5} {record.name}: {record.getMessage()}" + (f"  {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


class RefusalFilter(logging.Filter):
    """Drops the SDK's WARNING-with-traceback for an activity's final refusal (a non-retryable
    ``ApplicationError``): the worker's attempt line already says it at INFO with its code."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and record.exc_info and record.exc_info[1] is not None:
            from temporalio.exceptions import ApplicationError

            err = record.exc_info[1]
            if isinstance(err, ApplicationError) and err.non_retryable:
                return False
        return True


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Install creditflow's handler on the root logger (replacing earlier ones: uvicorn's, a previous call's)."""
    # The logging docs' optimisations: no caller lookup (a stack walk per record) nor thread/process names,
    # which no creditflow line prints; the per-request access line runs on the metering path.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the access log below has the ids and the route
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Stripe/localstripe call otherwise
    logging.getLogger("stripe").setLevel(logging.WARNING)
    refusal = RefusalFilter()
    for name in ("temporalio.activity", "temporalio.worker._activity"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RefusalFilter) for f in lg.filters):
            lg.addFilter(refusal)
    return handler


def redact_url(url: str) -> str:
    """A URL or connection string fit for a start-up line (its password replaced)."""
    return scrub(url)


def log_startup(process: str, settings: Any, **more: Any) -> None:
    """The start-up line: what this process is and what it connected to (passwords scrubbed)."""
    from creditflow import __version__

    logging.getLogger(f"creditflow.{process}").info(
        "creditflow %s %s started: database %s, Temporal %s (namespace %s, task queue %s), Stripe %s",
        process, __version__, redact_url(settings.database_url or "(embedded)"), settings.temporal_address,
        settings.temporal_namespace, settings.temporal_task_queue, settings.stripe_api_base or "api.stripe.com",
        extra={"event": "startup", "service": process, **more})
