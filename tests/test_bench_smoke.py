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
