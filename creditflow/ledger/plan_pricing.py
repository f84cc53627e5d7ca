"""Plan rates in the ledger database, so the metering hot path prices plan accounts in its transaction.

``sync_plan_rates`` writes, for every plan of the catalog and every priced feature of the rate card, the rate
``creditflow.domain.plans.Plan.rate_for`` resolves while plan credits last and once they are spent (toll-free
and features a plan does not list included), so the SQL side (migration 0013, ``cf_plan_price``) does a plain
lookup. It is idempotent (unchanged rows are not rewritten) and mirrors the catalog exactly (rows of plans or
features no longer resolved are removed; the hot path then falls back to the rate card).

It runs at API and worker start and after a rate change through ``PUT /features/{id}``. Rates that derive from
the card (unlisted features, the toll-free surcharge) are resolved with the card *in force at sync time*: a rate
version scheduled for later (``effective_at`` in the future) reaches plan accounts at the next sync.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from psycopg_pool import AsyncConnectionPool

from creditflow.domain.plans import CardRate, PlanCatalog

log = logging.getLogger(__name__)

# Serializes concurrent syncs (API and worker starting together) so their deletes and upserts do not interleave.
_SYNC_LOCK_KEY = 0x6366_706C_616E  # "cfplan"


PlanRates = dict[tuple[str, str], tuple[Decimal, Decimal]]


def resolve_plan_rates(catalog: PlanCatalog, card: dict[str, CardRate]) -> PlanRates:
    """(plan id, feature id) -> (rate while plan credits last, overage rate), by the catalog's own rules."""
    rates: PlanRates = {}
    for plan in catalog.plans:
        for feature_id in card:
            try:
                in_plan = plan.rate_for(feature_id, card, plan_credits_left=True)
                overage = plan.rate_for(feature_id, card, plan_credits_left=False)
            except KeyError:  # a surcharge whose base has no rate yet: leave it to the card
                continue
            rates[(plan.id, feature_id)] = (in_plan, overage)
    return rates


async def sync_plan_rates(pool: AsyncConnectionPool, catalog: PlanCatalog) -> int:
    """Write the catalog's resolved plan rates to ``plan_rates``; returns how many rows changed (0: in sync)."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SYNC_LOCK_KEY,))
        # The credit systems plans include credits in exist (created as the rate card creates features), so a renewal
        # never fails on a system the catalog names.
        systems = sorted({s for plan in catalog.plans for s in plan.included_system_credits})
        await conn.execute(
            "INSERT INTO credit_systems (id, name) SELECT id, initcap(replace(replace(id, '-', ' '), '_', ' '))"
            " FROM unnest(%s::text[]) AS id ON CONFLICT (id) DO NOTHING", (systems,))
        rows = await (await conn.execute(
            "SELECT f.id, f.base_feature_id, (SELECT r.credits_per_unit FROM feature_rates r WHERE r.feature_id = f.id"
            " AND r.effective_at <= now() ORDER BY r.effective_at DESC LIMIT 1) AS own FROM features f")).fetchall()
        card = {r["id"]: CardRate(credits_per_unit=r["own"], base_feature_id=r["base_feature_id"])
                for r in rows if r["own"] is not None}
        resolved = resolve_plan_rates(catalog, card)
        keys = sorted(resolved)
        deleted = await conn.execute(
            "DELETE FROM plan_rates WHERE (plan_id, feature_id) NOT IN"
            " (SELECT * FROM unnest(%s::text[], %s::text[]))", ([k[0] for k in keys], [k[1] for k in keys]))
        upserted = await conn.execute(
            "INSERT INTO plan_rates (plan_id, feature_id, credits_per_unit, overage_credits_per_unit)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::numeric[], %s::numeric[])"
            " ON CONFLICT (plan_id, feature_id) DO UPDATE SET credits_per_unit = EXCLUDED.credits_per_unit,"
            " overage_credits_per_unit = EXCLUDED.overage_credits_per_unit, updated_at = now()"
            " WHERE (plan_rates.credits_per_unit, plan_rates.overage_credits_per_unit)"
            " IS DISTINCT FROM (EXCLUDED.credits_per_unit, EXCLUDED.overage_credits_per_unit)",
            ([k[0] for k in keys], [k[1] for k in keys], [resolved[k][0] for k in keys],
             [resolved[k][1] for k in keys]))
        changed = (deleted.rowcount or 0) + (upserted.rowcount or 0)
    if changed:
        log.info("plan rates synced: %d rows changed (%d plans, %d features)", changed, len(catalog.plans), len(card))
    return changed
