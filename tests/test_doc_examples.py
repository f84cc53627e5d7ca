"""The documentation's examples work as written: a newcomer copies them into a shell next to `creditflow dev`.

The ```bash blocks of each file in DOC_EXAMPLES run in order in one bash session (`set -euo pipefail`, so a
failing curl or a typo fails the test) in a directory whose `.data` is the data dir of a real `creditflow dev
--data-dir .data --api-port P` stack; the examples find the API and its admin key in `.data/dev-stack.json`,
as a reader's do. The answers they document (`# {...}` comments, `...` eliding what varies) must be what the
stack answers. Blocks a reader should not paste (`make dev`, production commands) are fenced ```console or
```text. The fast tests keep docs/configuration.md complete and the docs free of settings that do not exist.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from creditflow.config import Settings
from creditflow.embedded import STATE_FILE
from tests.support.dev_stack import Dev, clean_env, start

ROOT = Path(__file__).resolve().parent.parent
# Each file whose ```bash blocks run, with what its run must print beyond its documented answers.
DOC_EXAMPLES: dict[str, tuple[str, ...]] = {
    "README.md": ('"credits_charged":245', '"replayed":false'),
    "docs/quickstart.md": ('"replayed":true', "HTTP 403", "5 of 5 (credits; sum of all 5: +27715)",
                           "2 events; now active"),
}
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
# Variables that only the tests read (documented in docs/development.md), on top of the settings.
TEST_ONLY_VARS = {"CREDITFLOW_TEST_DATABASE_URL", "CREDITFLOW_MODEL_EXAMPLES", "CREDITFLOW_MODEL_STEPS",
                  "CREDITFLOW_MODEL_REPORT", "CREDITFLOW_FUZZ_EXAMPLES", "CREDITFLOW_RECORD_HISTORIES",
                  "CREDITFLOW_FAULT_INJECT", "CREDITFLOW_CHROMIUM", "CREDITFLOW_ARTIFACTS"}


def bash_blocks(doc: str) -> list[str]:
    return BLOCK.findall((ROOT / doc).read_text())


def documented_answers(block: str) -> list[str]:
    """The fragments of the answers a block shows: a comment starting ``# {`` and its ``#  `` continuation
    lines, joined and cut at each ``...`` (ids, times and long tails vary)."""
    answers: list[str] = []
    for line in block.splitlines():
        if line.startswith("# {"):
            answers.append(line[2:].strip())
        elif line.startswith("#  ") and answers:
            answers[-1] += line[1:].strip()
    return [part for answer in answers for part in answer.split("...") if part.strip(" ,{}")]


def run_blocks(doc: str, cwd: Path, env: dict[str, str]) -> str:
    script = "set -euo pipefail\n" + "\n".join(bash_blocks(doc))
    out = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{doc}: exit {out.returncode}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
    return out.stdout


@pytest.fixture
def dev_runs() -> Iterator[list[Dev]]:
    runs: list[Dev] = []
    yield runs
    for run in runs:
        run.kill()


def test_every_doc_with_examples_has_bash_blocks_and_documented_answers() -> None:
    for doc in DOC_EXAMPLES:
        blocks = bash_blocks(doc)
        assert blocks, f"{doc} has no ```bash block"
        assert any(documented_answers(b) for b in blocks), f"{doc} documents no answer"
    assert "dev-stack.json" in bash_blocks("README.md")[0], "the first block reads the URL and key from dev-stack.json"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_doc_examples_run_as_written_against_creditflow_dev(tmp_path: Path, dev_runs: list[Dev]) -> None:
    stack = start(dev_runs, tmp_path / ".data", tmp_path / "dev.log")
    assert (tmp_path / ".data" / STATE_FILE).stat().st_mode & 0o777 == 0o600  # it holds the admin key
    # `.venv/bin/creditflow` as after `make dev` in a checkout; the stack's environment, nothing of the test's.
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = clean_env()
    for doc, expected in DOC_EXAMPLES.items():
        out = run_blocks(doc, tmp_path, env)
        for fragment in (*documented_answers("\n".join(bash_blocks(doc))), *expected):
            assert fragment in out, f"{doc}: {fragment!r} not in the output:\n{out}"
    assert stack.popen.poll() is None, stack.output()
    stack.stop()


def test_every_setting_is_documented_in_configuration_md() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f"CREDITFLOW_{name.upper()}" for name in Settings.model_fields
               if f"`CREDITFLOW_{name.upper()}`" not in page]
    assert missing == []


def test_the_docs_name_only_settings_that_exist() -> None:
    known = {f"CREDITFLOW_{name.upper()}" for name in Settings.model_fields} | TEST_ONLY_VARS
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        # Whole names only: `CREDITFLOW_MODEL_*` names a family, not a setting.
        named = set(re.findall(r"CREDITFLOW_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_*])", path.read_text()))
        assert named - known == set(), path.name


def anchors(path: Path) -> set[str]:
    """GitHub's ids of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_doc_links_point_to_pages_and_sections_that_exist() -> None:
    """A section moved to another page leaves no dangling link behind."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            page = (path.parent / target) if target else path
            assert page.exists(), f"{path.name} links to {target}"
            if anchor and page.suffix == ".md":
                assert anchor in anchors(page), f"{path.name} links to {target}#{anchor}"
