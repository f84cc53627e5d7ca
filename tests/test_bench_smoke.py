"""The benchmarks import and parse their arguments (fast; the runs themselves are ``make bench*``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_http_imports_and_parses_its_arguments() -> None:
    from bench import http_load as http

    args = http.parse_args(["--quick", "--connections", "1", "8", "--json", "-"])
    assert (args.seconds, args.library_events, args.connections, args.endpoints, args.json) == (
        2.0, 2_000, [1, 8], ["track", "check", "batch"], "-")


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_every_bench_script_runs_as_a_script(script: str) -> None:
    """``make bench*`` runs ``python bench/NAME.py``: the bench directory then comes first on ``sys.path``, so a
    bench file named like a standard module (``http.py`` did) breaks every other bench that imports it."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:")


def test_bench_cycle_parses_its_sizes() -> None:
    from bench import billing_cycle, live_workflows

    assert billing_cycle.parse_args([]).accounts == [250, 500, 1000]
    assert billing_cycle.parse_args(["--accounts", "100,200"]).accounts == [100, 200]
    args = live_workflows.parse_args(["--steps", "10,20", "--max-cached-workflows", "50"])
    assert (args.accounts, args.steps, args.max_cached_workflows) == (10_000, [10, 20], 50)
