"""Rate card rules: a feature other features are based on cannot get a base itself (bases are one level deep,
never a chain). Real PostgreSQL."""

from __future__ import annotations

import pytest
from psycopg_pool import AsyncConnectionPool

from creditflow.errors import CreditflowError
from creditflow.ledger import ratecard


async def test_a_base_feature_cannot_get_a_base(pool: AsyncConnectionPool) -> None:
    spec = ratecard.FeatureSpec(id="base2", channel="x", unit="u", credits_per_unit=100)
    await ratecard.put_feature(pool, spec)
    chained = ratecard.FeatureSpec(id="voice_minute", channel="voice", unit="minute", integer_only=False,
                                   base_feature_id="base2", credits_per_unit=10)
    with pytest.raises(CreditflowError) as refused:
        await ratecard.put_feature(pool, chained)
    assert refused.value.code == "validation_error"
