"""The operator CLI in tests: settings read from the environment (the test's database), wide tables."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pytest
from rich.console import Console

from creditflow import ops_cli
from creditflow.config import get_settings


@contextmanager
def cli_environment(monkeypatch: pytest.MonkeyPatch, database_url: str, env: dict[str, str] | None = None,
                    consoles: Iterable[Console] = (ops_cli.console,)) -> Iterator[None]:
    """The CLI's settings come from ``CREDITFLOW_*`` variables (cached: cleared on the way in and out); its tables
    are printed 250 columns wide so that no cell wraps in the output a test reads."""
    monkeypatch.setenv("CREDITFLOW_DATABASE_URL", database_url)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    for console in consoles:
        monkeypatch.setattr(console, "width", 250)
    try:
        yield
    finally:
        get_settings.cache_clear()
