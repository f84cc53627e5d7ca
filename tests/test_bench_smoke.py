"""The benchmarks import and parse their arguments (fast; the runs themselves are ``make bench*``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_http_imports_and_parses_its_arguments() -> None:
    from bench import http

    args = http.parse_args(["--quick", "--connections", "1", "8", "--json", "-"])
    assert (args.seconds, args.library_events, args.connections, args.endpoints, args.json) == (
        2.0, 2_000, [1, 8], ["track", "check", "batch"], "-")


def test_bench_http_help_runs_as_a_script() -> None:
    """Run as ``python bench/http.py``, the file must not shadow the standard library's ``http``."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "http.py"), "--help"], capture_output=True,
                         text=True, timeout=60, check=True, cwd=ROOT)
    assert "--connections" in out.stdout and "--quick" in out.stdout and "--json" in out.stdout


def test_bench_cycle_and_workflows_help_run_as_scripts() -> None:
    """``make bench-cycle`` / ``make bench-workflows`` run the files as scripts: bench/http.py must not shadow
    the standard library's ``http`` for them either."""
    for script, flags in (("billing_cycle.py", ("--accounts", "--invoice-render-processes", "--json")),
                          ("live_workflows.py", ("--steps", "--max-cached-workflows", "--json"))):
        out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True,
                             text=True, timeout=120, check=True, cwd=ROOT)
        assert all(flag in out.stdout for flag in flags), script


def test_bench_cycle_parses_its_sizes() -> None:
    from bench import billing_cycle, live_workflows

    assert billing_cycle.parse_args([]).accounts == [250, 500, 1000]
    assert billing_cycle.parse_args(["--accounts", "100,200"]).accounts == [100, 200]
    args = live_workflows.parse_args(["--steps", "10,20", "--max-cached-workflows", "50"])
    assert (args.accounts, args.steps, args.max_cached_workflows) == (10_000, [10, 20], 50)
