"""Workflows import only contracts, pure domain code and activity definitions: never a module that does I/O.

Workflow code runs in Temporal's sandbox and is replayed; a type imported from an I/O module (the notification
service, the Stripe gateway, the ledger) drags that module into every workflow and invites calling it from workflow
code. Activity modules are allowed (typed activity calls, as Temporal's samples do).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_CREDITFLOW = ("creditflow.domain",)
FORBIDDEN_PREFIX = "creditflow."


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_workflows_import_no_io_module() -> None:
    offending = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for path in sorted((ROOT / "workflows").glob("*.py"))
                 for line, module in _imports(path)
                 if module.startswith(FORBIDDEN_PREFIX) and not module.startswith(ALLOWED_CREDITFLOW)]
    assert offending == []


def test_domain_code_is_pure() -> None:
    """creditflow/domain imports nothing that does I/O (database, Stripe, HTTP, Temporal client)."""
    io = ("psycopg", "psycopg_pool", "stripe", "httpx", "temporalio.client", "creditflow.ledger", "creditflow.payments",
          "creditflow.notify", "creditflow.invoicing", "creditflow.api", "creditflow.config")
    offending = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for path in sorted((ROOT / "creditflow" / "domain").glob("*.py"))
                 for line, module in _imports(path)
                 if module.startswith(io)]
    assert offending == []


def _imported_test_modules(path: Path) -> list[tuple[int, str]]:
    """``tests.test_x`` imported in any form: ``from tests.test_x import y``, ``import tests.test_x``,
    ``from tests import test_x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names if alias.name.startswith("tests.test_"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("tests.test_"):
                found.append((node.lineno, node.module))
            elif node.module == "tests":
                found.extend((node.lineno, f"tests.{a.name}") for a in node.names if a.name.startswith("test_"))
    return found


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/support/ (fixtures used everywhere in conftest.py): a test module imported by
    others lends them its module-level code and fixtures, and moving or renaming a test breaks unrelated files."""
    tests = ROOT / "tests"
    offending = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for path in sorted([*tests.glob("*.py"), *(tests / "support").glob("*.py")])
                 for line, module in _imported_test_modules(path)]
    assert offending == []
