"""Every function's current definition lives in creditflow/ledger/functions/ and nowhere else: a fresh database and
one upgraded from an older version end with the same function bodies and triggers, and migrate is idempotent.

Numbered migrations keep tables, types, triggers and data (a database upgraded from any version replays them);
functions/ is applied after them every time (docs/development.md, "Database functions")."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

from creditflow.ledger import functions_check
from creditflow.ledger.db import migrate
from creditflow.ledger.functions_check import function_files, problems, replay_migrations
from tests.support.migrations import apply_numbered, new_database

# A version released before functions/ existed: its database has only the migrations through this one.
OLD_RELEASE = "0024_4_invoice_credit_balance"

FUNCTIONS_SQL = """
    SELECT p.oid::regprocedure::text AS sig, pg_get_functiondef(p.oid) AS def, p.prosrc AS body
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'public' AND p.prokind = 'f'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')"""
TRIGGERS_SQL = """
    SELECT t.tgrelid::regclass::text || '.' || t.tgname AS name, pg_get_triggerdef(t.oid) AS def
    FROM pg_trigger t WHERE NOT t.tgisinternal"""




def functions(url: str) -> dict[str, str]:
    """pg_get_functiondef of every function in the schema, by signature."""
    with psycopg.connect(url) as conn:
        return {sig: d for sig, d, _ in conn.execute(FUNCTIONS_SQL).fetchall()}


def bodies(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return {sig: body for sig, _, body in conn.execute(FUNCTIONS_SQL).fetchall()}


def triggers(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute(TRIGGERS_SQL).fetchall())  # type: ignore[arg-type]


def _sig(key: str) -> str:
    """functions_check's key (``cf_x(text, bigint)``) as regprocedure prints it."""
    return key.replace(", ", ",")


def _body(code: str) -> str:
    """The dollar-quoted body of a CREATE FUNCTION statement: what PostgreSQL stores as prosrc."""
    m = re.search(r"\bAS\s+(\$\w*\$)", code, re.I)
    assert m, code[:120]
    start = m.end()
    return code[start: code.index(m.group(1), start)]


def _create_code(code: str) -> str:
    return re.sub(r"^CREATE\s+(OR\s+REPLACE\s+)?FUNCTION\s+", "CREATE OR REPLACE FUNCTION ", code, flags=re.I)


def test_each_function_is_defined_in_functions_dir_and_no_new_migration_defines_one() -> None:
    """The static check (`python -m creditflow.ledger.functions_check`) finds nothing out of place."""
    assert problems() == []


def test_a_new_migration_that_defines_a_function_is_named(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """As when a branch's migration redefines cf_track: the check names the function and the migration."""
    extra = tmp_path / "0099_track_change.sql"
    extra.write_text("-- a change\nCREATE OR REPLACE FUNCTION cf_track(p_account text, p_feature text, "
                     "p_quantity numeric, p_agent text, p_key text, p_hash bytea, p_metadata jsonb, "
                     "p_probe boolean DEFAULT false) RETURNS cf_track_result LANGUAGE plpgsql AS $$ BEGIN END $$;\n"
                     "CREATE FUNCTION pg_temp.backfill_helper() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;\n")
    real = functions_check.migration_files()
    monkeypatch.setattr(functions_check, "migration_files", lambda: [*real, extra])
    assert problems() == [
        "cf_track(text, text, numeric, text, text, bytea, jsonb, boolean) is defined in migration "
        "0099_track_change.sql: move today's definition into functions/ (its family's file), and add "
        "0099_track_change to FOLDED_MIGRATIONS"]


def test_functions_dir_reproduces_todays_migrations_byte_for_byte(pg_server_url: str) -> None:
    """Moving the definitions changed nothing: every function whose functions/ text is its latest migration's
    has the same pg_get_functiondef as a database built from the numbered migrations alone, and the set of
    functions and triggers is the same. (A function edited since in functions/ is left out of the comparison.)"""
    current, _ = replay_migrations()
    files = {k: code for defs in function_files().values() for k, code in defs.items()}
    unchanged = {_sig(k) for k, d in current.items() if _create_code(d.create.code) == files[k]}
    assert unchanged  # when functions/ was made, all 55: the files were extracted from the migrations
    with new_database(pg_server_url) as numbered, new_database(pg_server_url) as full:
        apply_numbered(numbered)
        migrate(full)
        before, after = functions(numbered), functions(full)
        # Functions added since in functions/ alone (no migration defines them) are the only extra ones.
        only_in_files = {_sig(k) for k in files if k not in current}
        assert set(after) == set(before) | only_in_files
        assert {sig: before[sig] for sig in unchanged} == {sig: after[sig] for sig in unchanged}
        assert triggers(numbered) == triggers(full)


@pytest.mark.parametrize("release", [OLD_RELEASE, "all numbered"])
def test_fresh_and_upgraded_databases_end_with_identical_functions_and_triggers(pg_server_url: str,
                                                                                release: str) -> None:
    """An old release's database (numbered migrations through OLD_RELEASE, or all of them: the release just
    before functions/) upgraded by migrate ends exactly as a fresh one."""
    with new_database(pg_server_url) as fresh, new_database(pg_server_url) as upgraded:
        migrate(fresh)
        applied = apply_numbered(upgraded, None if release == "all numbered" else release)
        assert len(applied) >= 30
        migrate(upgraded)
        assert functions(upgraded) == functions(fresh)
        assert triggers(upgraded) == triggers(fresh)


def test_every_function_after_migrate_has_the_body_from_functions_dir(pg_server_url: str) -> None:
    """functions/ is the single source: each function any numbered migration left, and no other, exists after
    migrate with exactly the body written in functions/."""
    current, _ = replay_migrations()
    files = {_sig(k): code for defs in function_files().values() for k, code in defs.items()}
    assert {_sig(k) for k in current} <= set(files)
    with new_database(pg_server_url) as url:
        migrate(url)
        got = bodies(url)
    assert set(got) == set(files)
    assert {sig: got[sig] for sig in files} == {sig: _body(code) for sig, code in files.items()}


def test_migrate_twice_changes_nothing(pg_server_url: str) -> None:
    with new_database(pg_server_url) as url:
        assert len(migrate(url)) >= 40
        first = (functions(url), triggers(url))
        assert migrate(url) == []
        assert (functions(url), triggers(url)) == first


def test_a_function_change_reaches_an_up_to_date_database(pg_server_url: str) -> None:
    """functions/ is applied on every migrate, not only when a numbered migration is pending (yoyo's post-apply
    hooks would be): a database whose function differs from functions/ gets the file's definition back."""
    with new_database(pg_server_url) as url:
        migrate(url)
        expected = functions(url)["cf_now()"]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE OR REPLACE FUNCTION cf_now() RETURNS timestamptz LANGUAGE sql STABLE AS "
                         "$$ SELECT now() - interval '1 day' $$")
        assert functions(url)["cf_now()"] != expected
        assert migrate(url) == []
        assert functions(url)["cf_now()"] == expected
