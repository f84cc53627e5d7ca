"""Features and their versioned rates (the "credit system"): the rate in force at time t is the
latest version with ``effective_at <= t``; the rate used is stored on every usage item."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, field_validator

from creditflow.domain.money import AmountError, validate_rate
from creditflow.errors import CreditflowError
from creditflow.ledger.credit_systems import DEFAULT_SYSTEM
from creditflow.ledger.models import Feature

DEFAULT_RATECARD = Path(__file__).resolve().parent.parent / "ratecard.default.yaml"


class FeatureSpec(BaseModel):
    """A feature definition and the rate to put in force (from a file or ``PUT /features/{id}``)."""

    id: str
    name: str | None = None
    channel: str
    unit: str
    integer_only: bool = True
    base_feature_id: str | None = None
    credits_per_unit: Decimal
    # The credit system the feature draws on (seed 003), fixed at creation; None: the default (or, for an existing
    # feature, the one it has).
    credit_system: str | None = None

    @field_validator("credits_per_unit", mode="before")
    @classmethod
    def _exact_rate(cls, value: Any) -> Decimal:
        try:
            return validate_rate(value)
        except AmountError as exc:
            raise ValueError(str(exc)) from exc


def _norm(value: Decimal | None) -> Decimal | None:
    if value is None:
        return None
    return value.quantize(Decimal(1)) if value == value.to_integral_value() else value.normalize()


async def put_feature(pool: AsyncConnectionPool, spec: FeatureSpec, effective_at: datetime | None = None) -> Feature:
    """Create or update a feature and add a rate version (from now, or from ``effective_at``).

    An unchanged rate adds no version, so loading the same card twice is a no-op."""
    async with pool.connection() as conn, conn.transaction():
        system = await _credit_system(conn, spec)
        if spec.base_feature_id is not None:
            base = await (await conn.execute("SELECT base_feature_id, credit_system_id FROM features WHERE id = %s",
                                             (spec.base_feature_id,))).fetchone()
            if base is None:
                raise CreditflowError("unknown_feature", f"base feature {spec.base_feature_id} does not exist")
            if base["base_feature_id"] is not None or spec.base_feature_id == spec.id:
                raise CreditflowError("validation_error", "a base feature cannot itself have a base")
            if base["credit_system_id"] != system:
                raise CreditflowError("validation_error", f"base feature {spec.base_feature_id} draws on credit"
                                      f" system {base['credit_system_id']}, not {system}", param="credit_system")
            based_on_this = await (await conn.execute(
                "SELECT id FROM features WHERE base_feature_id = %s LIMIT 1", (spec.id,))).fetchone()
            if based_on_this is not None:
                raise CreditflowError("validation_error", f"{spec.id} is the base of {based_on_this['id']}:"
                                      " a base feature cannot itself have a base")
        await conn.execute(
            "INSERT INTO features (id, name, channel, unit, integer_only, base_feature_id, credit_system_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name,"
            " channel = EXCLUDED.channel, unit = EXCLUDED.unit, integer_only = EXCLUDED.integer_only,"
            " base_feature_id = EXCLUDED.base_feature_id",
            (spec.id, spec.name or spec.id.replace("_", " ").capitalize(), spec.channel, spec.unit,
             spec.integer_only, spec.base_feature_id, system))
        current = await (await conn.execute(
            "SELECT credits_per_unit FROM feature_rates WHERE feature_id = %s"
            " AND effective_at <= coalesce(%s, now()) ORDER BY effective_at DESC LIMIT 1",
            (spec.id, effective_at))).fetchone()
        if current is None or current["credits_per_unit"] != spec.credits_per_unit or effective_at is not None:
            await conn.execute(
                "INSERT INTO feature_rates (feature_id, credits_per_unit, effective_at)"
                " VALUES (%s, %s, coalesce(%s, now())) ON CONFLICT (feature_id, effective_at)"
                " DO UPDATE SET credits_per_unit = EXCLUDED.credits_per_unit",
                (spec.id, spec.credits_per_unit, effective_at))
    return await get_feature(pool, spec.id)


async def _credit_system(conn: AsyncConnection[Any], spec: FeatureSpec) -> str:
    """The system the feature draws on: the one it has (another is ``credit_system_fixed``: API processes cache it),
    else the one named (it must exist), else the default."""
    row = await (await conn.execute("SELECT credit_system_id FROM features WHERE id = %s FOR UPDATE",
                                    (spec.id,))).fetchone()
    if row is not None:
        if spec.credit_system is not None and spec.credit_system != row["credit_system_id"]:
            raise CreditflowError("credit_system_fixed", f"feature {spec.id} draws on credit system"
                                  f" {row['credit_system_id']}; a feature's credit system cannot change (create a"
                                  " feature with another id)", param="credit_system")
        return str(row["credit_system_id"])
    if spec.credit_system is None:
        return DEFAULT_SYSTEM
    found = await (await conn.execute("SELECT 1 FROM credit_systems WHERE id = %s", (spec.credit_system,))).fetchone()
    if found is None:
        raise CreditflowError("unknown_credit_system", f"no credit system {spec.credit_system}",
                              param="credit_system")
    return spec.credit_system


async def list_features(pool: AsyncConnectionPool) -> list[Feature]:
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT f.*, f.credits_per_unit AS rate,"
            " (SELECT x.credit_system_id FROM features x WHERE x.id = f.id) AS credit_system,"
            " (SELECT row_to_json(r) FROM (SELECT credits_per_unit, effective_at FROM feature_rates"
            "   WHERE feature_id = f.id AND effective_at <= now() ORDER BY effective_at DESC LIMIT 1) r) AS own,"
            " (SELECT coalesce(json_agg(json_build_object('credits_per_unit', credits_per_unit::text,"
            "   'effective_at', effective_at) ORDER BY effective_at), '[]'::json)"
            "   FROM feature_rates WHERE feature_id = f.id AND effective_at > now()) AS scheduled"
            " FROM feature_prices f ORDER BY f.id")).fetchall()
    features = []
    for r in rows:
        own = r["own"] or {}
        features.append(Feature(
            id=r["id"], name=r["name"], channel=r["channel"], unit=r["unit"], integer_only=r["integer_only"],
            base_feature_id=r["base_feature_id"], credits_per_unit=_norm(r["rate"]), credit_system=r["credit_system"],
            own_credits_per_unit=_norm(Decimal(str(own["credits_per_unit"]))) if own else None,
            effective_at=own.get("effective_at"), scheduled=r["scheduled"]))
    return features


async def get_feature(pool: AsyncConnectionPool, feature_id: str) -> Feature:
    for feature in await list_features(pool):
        if feature.id == feature_id:
            return feature
    raise CreditflowError("unknown_feature", f"no feature {feature_id}")


def read_ratecard(path: Path) -> list[FeatureSpec]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("features"), list):
        raise CreditflowError("validation_error", f"{path}: expected a mapping with a 'features' list")
    specs = [FeatureSpec.model_validate(item) for item in data["features"]]
    # Bases first, so a based feature can reference one defined in the same file.
    return sorted(specs, key=lambda s: s.base_feature_id is not None)


async def load_ratecard(pool: AsyncConnectionPool, path: Path = DEFAULT_RATECARD,
                        effective_at: datetime | None = None) -> list[Feature]:
    for spec in read_ratecard(path):
        await put_feature(pool, spec, effective_at)
    return await list_features(pool)


async def ensure_default_ratecard(pool: AsyncConnectionPool, path: Path | None = None) -> bool:
    """Seed the rate card on a fresh database (no features yet); returns whether it did."""
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT count(*) AS n FROM features")).fetchone()
    if row["n"]:
        return False
    await load_ratecard(pool, path or DEFAULT_RATECARD)
    return True
