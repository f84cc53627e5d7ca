"""Where each PL/pgSQL function's current definition lives, and the check that it lives only there.

Numbered migrations (``ledger/migrations``) hold tables, types, triggers and data. Every function's current
definition is in ``ledger/functions/*.sql`` (one file per family, ``CREATE OR REPLACE``), applied after the
migrations on every ``migrate`` (:data:`FUNCTION_FILES` is the order). Migrations written before that rule
(:data:`FOLDED_MIGRATIONS`) define functions too; they stay as they are, because a database upgraded from an
older version replays them, and the files here then replace what they left.

    python -m creditflow.ledger.functions_check            # exit 1, naming each function out of place
    python -m creditflow.ledger.functions_check --latest cf_track   # a function's latest migration definition
    python -m creditflow.ledger.functions_check --extract  # rewrite functions/ from the migrations

``--extract`` builds each function's file text from the last migration that defines it (leading comments, the
``CREATE``, any later ``ALTER FUNCTION ... SET``). It is how functions/ was made, and stays safe to re-run only
while no definition in functions/ has been edited since; afterwards fold a migration's function into its file by
hand (``--latest`` prints it), and add the migration to :data:`FOLDED_MIGRATIONS`.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

LEDGER_DIR = Path(__file__).parent
MIGRATIONS_DIR = LEDGER_DIR / "migrations"
FUNCTIONS_DIR = LEDGER_DIR / "functions"

# Applied in this order after the migrations, all in one transaction. A LANGUAGE sql function is checked when it
# is created, so what it calls must come earlier (PL/pgSQL bodies are resolved only when they run).
FUNCTION_FILES: tuple[str, ...] = (
    "core.sql", "partitions.sql", "pricing.sql", "posting.sql", "holds.sql", "spend_control.sql", "watch.sql",
    "plans.sql", "metering.sql", "refunds.sql", "invoices.sql", "transfers.sql",
)

# Migrations whose function definitions are folded into functions/: they may define functions (history a
# database upgraded from their time replays); any other migration may not (the check names what it defines).
FOLDED_MIGRATIONS: frozenset[str] = frozenset({
    "0002_functions", "0006_refunds", "0007_auto_recharge", "0009_spend_control", "0011_alerts",
    "0012_subscriptions", "0013_plan_pricing", "0014_plan_changes", "0015_simulation_clock",
    "0016_payment_clawbacks", "0017_plan_expiry_floor", "0018_review_fixes", "0019_batch_lookups",
    "0021_track_group", "0022_hot_row_checks", "0023_4_dispute_returns", "0024_1_plan_expiry_ignores_holds",
    "0024_2_overage_billed_once", "0024_3_invoice_payment_reversals", "0027_clawback_cuts_holds",
    "0030_1_agent_plan_credits", "0030_2_number_rental", "0031_2_organizations", "0031_3_transfer_clawbacks",
    "0032_credit_systems",
    "0041_journal_partitions",  # defines the trigger function its journal_key trigger needs (partitions.sql)
})

# Which file a function goes to when --extract writes it (by family: what the function is for).
FAMILIES: dict[str, str] = {
    "core.sql": "cf_forbid_change cf_outbox_notify cf_now cf_utc_today",
    "partitions.sql": "cf_journal_key cf_journal_entry cf_ensure_journal_partitions cf_rollup_usage",
    "pricing.sql": "cf_charge_micros cf_price cf_plan_price cf_feature_system_fixed",
    "posting.sql": "cf_post cf_burn cf_burn_wallet cf_settle_burns cf_settle_account_burns cf_overage_sync",
    "holds.sql": "cf_expire_holds cf_live_held cf_expire_account_holds cf_hold cf_hold_unchecked cf_hold_reserve "
                 "cf_hold_settle cf_hold_release cf_cut_hold_reservations",
    "spend_control.sql": "cf_agent_controls cf_emit_spend_event cf_spend_gate cf_spend_record cf_refresh_spend "
                         "cf_balances_controlled cf_agent_plan cf_emit_plan_stop cf_purchase_resumes_agents",
    "watch.sql": "cf_balance_watch cf_refresh_watch",
    "plans.sql": "cf_expire_plan_credits cf_plan_credits_left",
    "metering.sql": "cf_track cf_track_batch cf_track_batch_fast cf_track_group",
    "refunds.sql": "cf_refund_prepare cf_refund_reserve cf_refund_release cf_refund_finalize cf_lock_lot_family "
                   "cf_clawback_moved_taken cf_clawback_part cf_clawback_lot cf_lot_return",
    "invoices.sql": "cf_invoice_overage_restore cf_invoice_restoration_move cf_rental_charge",
    "transfers.sql": "cf_transfer",
}

_TYPE_ALIASES = {"int": "integer", "int4": "integer", "int8": "bigint", "bool": "boolean", "int2": "smallint",
                 "timestamptz": "timestamp with time zone", "varchar": "character varying"}


@dataclass
class Statement:
    """One SQL statement with the comments that precede it (they explain it, so they travel with it)."""
    source: str  # file stem
    text: str  # comments + statement, without the trailing semicolon

    @property
    def code(self) -> str:
        """The statement without its leading comments."""
        return _strip_leading_comments(self.text)


@dataclass
class Definition:
    """A function's current definition: where it was last created, and what followed it."""
    name: str
    args: str  # normalized argument types: the identity PostgreSQL uses
    source: str
    create: Statement
    alters: list[Statement] = field(default_factory=list)
    renamed_from: str | None = None
    position: tuple[int, int] = (0, 0)  # (migration, statement) of the definition: what it calls came before

    @property
    def key(self) -> str:
        return f"{self.name}({self.args})"

    def sql(self) -> str:
        """The text functions/ holds for it: comments, ``CREATE OR REPLACE``, then any ``ALTER ... SET``."""
        text = self.create.text
        code = self.create.code
        head = text[: len(text) - len(code)]
        code = re.sub(r"^CREATE\s+(OR\s+REPLACE\s+)?FUNCTION\s+[\w.]+", f"CREATE OR REPLACE FUNCTION {self.name}",
                      code, count=1, flags=re.I)
        parts = [head + code + ";"]
        parts += [a.code + ";" for a in self.alters]
        return "\n".join(parts)


def split_statements(sql: str, source: str = "") -> list[Statement]:
    """Split SQL into statements at top-level semicolons (quotes, dollar quotes and comments respected)."""
    out: list[Statement] = []
    start = i = 0
    n = len(sql)
    while i < n:
        c = sql[i]
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c in ("'", '"'):
            j = i + 1
            while j < n:
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
        elif c == "$":
            m = re.match(r"\$([A-Za-z_]\w*)?\$", sql[i:])
            if m:
                j = sql.find(m.group(0), i + len(m.group(0)))
                i = n if j < 0 else j + len(m.group(0))
            else:
                i += 1
        elif c == ";":
            text = sql[start:i].strip("\n")
            if text.strip():
                out.append(Statement(source, text.rstrip()))
            start = i = i + 1
        else:
            i += 1
    tail = sql[start:].strip("\n")
    if _strip_leading_comments(tail).strip():
        out.append(Statement(source, tail.rstrip()))
    return out


def _strip_leading_comments(text: str) -> str:
    while True:
        stripped = text.lstrip()
        if stripped.startswith("--"):
            j = stripped.find("\n")
            text = "" if j < 0 else stripped[j + 1:]
        elif stripped.startswith("/*"):
            text = stripped[stripped.find("*/") + 2:]
        else:
            return stripped


def _arg_list(code: str, open_at: int) -> tuple[str, int]:
    """The text inside the parentheses opening at ``open_at``, and the index after the closing one."""
    depth = 0
    for j in range(open_at, len(code)):
        if code[j] == "(":
            depth += 1
        elif code[j] == ")":
            depth -= 1
            if depth == 0:
                return code[open_at + 1: j], j + 1
    raise ValueError(f"unbalanced parentheses: {code[:80]}")


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def _normalize_type(t: str) -> str:
    t = " ".join(t.lower().split())
    base, _, arr = t.partition("[")
    base = _TYPE_ALIASES.get(base.strip(), base.strip())
    return base + ("[" + arr if arr else "")


def identity_args(arg_text: str, named: bool) -> str:
    """Argument types as PostgreSQL identifies a function (OUT arguments and defaults left out)."""
    types = []
    for arg in _split_top(arg_text):
        arg = re.split(r"\s+DEFAULT\s+|\s*=\s*", arg.strip(), maxsplit=1, flags=re.I)[0]
        words = arg.split()
        mode = words[0].upper() if words else ""
        if mode in ("IN", "OUT", "INOUT", "VARIADIC"):
            if mode == "OUT":
                continue
            words = words[1:]
        if named and len(words) > 1:
            words = words[1:]
        types.append(_normalize_type(" ".join(words)))
    return ", ".join(types)


_CREATE = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+([\w.]+)\s*\(", re.I)
_ALTER = re.compile(r"ALTER\s+FUNCTION\s+([\w.]+)\s*\(", re.I)
_DROP = re.compile(r"DROP\s+FUNCTION\s+(?:IF\s+EXISTS\s+)?([\w.]+)\s*\(", re.I)


def _signature(code: str, m: re.Match[str], named: bool) -> tuple[str, str, str]:
    args, end = _arg_list(code, m.end() - 1)
    name = m.group(1).lower().removeprefix("public.")
    return name, identity_args(args, named), code[end:]


def migration_files() -> list[Path]:
    return sorted(p for p in MIGRATIONS_DIR.glob("*.sql") if not p.name.endswith(".rollback.sql"))


def replay_migrations(paths: list[Path] | None = None) -> tuple[dict[str, Definition], dict[str, set[str]]]:
    """Replay the migrations' function statements: each surviving function's latest definition, and for each
    migration the functions it creates (helpers in pg_temp left out: they vanish with the session)."""
    current: dict[str, Definition] = {}
    created: dict[str, set[str]] = {}
    for fi, path in enumerate(paths if paths is not None else migration_files()):
        for si, st in enumerate(split_statements(path.read_text(), path.stem)):
            code = st.code
            if m := _CREATE.match(code):
                name, args, _ = _signature(code, m, named=True)
                if name.startswith("pg_temp."):
                    continue
                d = Definition(name, args, path.stem, st, position=(fi, si))
                current[d.key] = d
                created.setdefault(path.stem, set()).add(d.key)
            elif m := _DROP.match(code):
                name, args, _ = _signature(code, m, named=False)
                current.pop(f"{name}({args})", None)
            elif m := _ALTER.match(code):
                name, args, rest = _signature(code, m, named=False)
                key = f"{name}({args})"
                if key not in current:
                    continue
                if r := re.match(r"\s*RENAME\s+TO\s+(\w+)", rest, re.I):
                    d = current.pop(key)
                    d.renamed_from, d.name = d.name, r.group(1).lower()
                    current[d.key] = d
                else:
                    current[key].alters.append(st)
    return current, created


def function_files() -> dict[str, dict[str, str]]:
    """For each file of functions/, the functions it defines: key -> statement code."""
    out: dict[str, dict[str, str]] = {}
    for path in sorted(FUNCTIONS_DIR.glob("*.sql")):
        defs: dict[str, str] = {}
        for st in split_statements(path.read_text(), path.stem):
            code = st.code
            if m := _CREATE.match(code):
                name, args, _ = _signature(code, m, named=True)
                defs[f"{name}({args})"] = code
        out[path.name] = defs
    return out


def problems() -> list[str]:
    """Everything out of place, each naming the function and the file to fix (empty when all is well)."""
    found: list[str] = []
    files = function_files()
    listed = set(FUNCTION_FILES)
    found += [f"functions/{f} is not listed in FUNCTION_FILES (creditflow/ledger/functions_check.py)"
              for f in sorted(set(files) - listed)]
    found += [f"FUNCTION_FILES names functions/{f}, which does not exist" for f in FUNCTION_FILES if f not in files]
    where: dict[str, list[str]] = {}
    for fname, defs in files.items():
        for key, code in defs.items():
            where.setdefault(key, []).append(fname)
            if not re.match(r"CREATE\s+OR\s+REPLACE\s", code, re.I):
                found.append(f"{key} in functions/{fname}: write CREATE OR REPLACE (the file is applied every time)")
    found += [f"{key} is defined in several files: {', '.join(fs)}" for key, fs in sorted(where.items())
              if len(fs) > 1]
    current, created = replay_migrations()
    for source, keys in sorted(created.items()):
        if source not in FOLDED_MIGRATIONS:
            found += [f"{key} is defined in migration {source}.sql: move today's definition into functions/ "
                      f"(its family's file), and add {source} to FOLDED_MIGRATIONS" for key in sorted(keys)]
    found += [f"{key} (last defined in migration {d.source}.sql) is not in functions/: the migrations would "
              f"leave it as they defined it" for key, d in sorted(current.items()) if key not in where]
    return found


def family_of(name: str) -> str:
    for fname, names in FAMILIES.items():
        if name in names.split():
            return fname
    raise KeyError(f"{name}: add it to a family in FAMILIES (creditflow/ledger/functions_check.py)")


def extract() -> dict[str, str]:
    """The functions/ files' text built from the migrations (each function's latest definition)."""
    current, _ = replay_migrations()
    order = {f: i for i, f in enumerate(FUNCTION_FILES)}
    texts: dict[str, list[str]] = {}
    for d in sorted(current.values(), key=lambda d: d.position):
        texts.setdefault(family_of(d.name), []).append(d.sql())
    out = {}
    for fname in sorted(texts, key=order.__getitem__):
        header = (f"-- {fname.removesuffix('.sql')}: today's definitions (creditflow/ledger/functions_check.py"
                  f" and docs/development.md, \"Database functions\"). Edit here; no migration.\n")
        out[fname] = header + "\n\n".join(texts[fname]) + "\n"
    return out


def edited_since_extraction() -> list[str]:
    """Functions whose functions/ definition differs from their last definition in a folded migration: edited
    in functions/ since, so --extract would undo the edit."""
    current, _ = replay_migrations()
    files = {k: code for defs in function_files().values() for k, code in defs.items()}
    return [key for key, d in current.items() if d.source in FOLDED_MIGRATIONS and key in files
            and _split_create(d.sql()) != files[key]]


def _split_create(text: str) -> str:
    """The CREATE statement's code in a definition's text, as function_files() reads it back."""
    return next(st.code for st in split_statements(text) if _CREATE.match(st.code))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m creditflow.ledger.functions_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extract", action="store_true", help="rewrite functions/ from the migrations")
    parser.add_argument("--latest", metavar="NAME", help="print NAME's latest definition in the migrations")
    args = parser.parse_args(argv)
    if args.latest:
        current, _ = replay_migrations()
        hits = [d for d in current.values() if d.name == args.latest.lower()]
        for d in hits:
            print(f"-- {d.key}: migration {d.source}.sql\n{d.sql()}\n")
        return 0 if hits else 1
    if args.extract:
        if edited := edited_since_extraction():
            print("functions/ holds edits the migrations do not: fold by hand (--latest NAME prints a migration's "
                  "definition): " + ", ".join(edited), file=sys.stderr)
            return 1
        try:
            texts = extract()
        except KeyError as exc:
            print(exc.args[0], file=sys.stderr)
            return 1
        FUNCTIONS_DIR.mkdir(exist_ok=True)
        for fname, text in texts.items():
            (FUNCTIONS_DIR / fname).write_text(text)
            print(f"wrote functions/{fname}")
    found = problems()
    for p in found:
        print(p, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
