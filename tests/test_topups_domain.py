"""Top-up rules (pure): bounds, whole cents, packages, exactly one of amount and package."""

from __future__ import annotations

from decimal import Decimal

import pytest

from creditflow.config import Settings
from creditflow.domain.topups import CreditPackage, TopUpError, TopUpPolicy, cents_to_usd, format_usd, quote

POLICY = TopUpPolicy()


@pytest.mark.parametrize(("amount", "cents"), [(5, 500), ("5.00", 500), (Decimal("25.5"), 2550), ("4999.99", 499999),
                                               (5000, 500000), ("12.34", 1234)])
def test_amounts_within_bounds(amount: object, cents: int) -> None:
    q = quote(POLICY, amount_usd=amount)
    assert (q.amount_cents, q.credits, q.package_id) == (cents, cents, None)
    assert q.amount_usd == Decimal(cents) / 100


@pytest.mark.parametrize(("amount", "code"), [
    ("4.99", "amount_out_of_range"), ("5000.01", "amount_out_of_range"), (0, "amount_out_of_range"),
    (-5, "amount_out_of_range"), ("25.001", "invalid_amount"), ("1e-3", "invalid_amount"),
    (25.0, "invalid_amount"), (True, "invalid_amount"), ("abc", "invalid_amount"), ("NaN", "invalid_amount"),
])
def test_refused_amounts(amount: object, code: str) -> None:
    with pytest.raises(TopUpError) as caught:
        quote(POLICY, amount_usd=amount)
    assert caught.value.code == code


def test_packages() -> None:
    starter = quote(POLICY, package_id="starter")
    assert (starter.amount_cents, starter.credits, starter.package_id) == (1000, 1000, "starter")
    assert quote(POLICY, package_id="growth").credits == 5000
    with pytest.raises(TopUpError) as caught:
        quote(POLICY, package_id="platinum")
    assert caught.value.code == "unknown_package"
    bonus = TopUpPolicy(packages=(CreditPackage(id="bonus", name="Bonus", price_usd="20", credits=2500),))
    assert (quote(bonus, package_id="bonus").amount_cents, quote(bonus, package_id="bonus").credits) == (2000, 2500)
    with pytest.raises(ValueError):
        CreditPackage(id="odd", name="Odd", price_usd="1.005", credits=100)
    with pytest.raises(ValueError):
        CreditPackage(id="Bad Id", name="x", price_usd=1, credits=100)


def test_exactly_one_of_amount_and_package() -> None:
    for kwargs in ({}, {"amount_usd": 25, "package_id": "growth"}):
        with pytest.raises(TopUpError) as caught:
            quote(POLICY, **kwargs)  # type: ignore[arg-type]
        assert caught.value.code == "invalid_amount"


def test_settings_configure_bounds_and_packages() -> None:
    settings = Settings(topup_min_usd=Decimal(10), topup_max_usd=Decimal(100),  # type: ignore[call-arg]
                        topup_packages=[{"id": "mini", "name": "Mini", "price_usd": "9.99", "credits": 999}])
    policy = settings.topup_policy()
    with pytest.raises(TopUpError):
        quote(policy, amount_usd="9.99")
    assert quote(policy, package_id="mini").amount_cents == 999
    with pytest.raises(TopUpError):
        quote(policy, package_id="starter")


def test_formatting_is_exact() -> None:
    assert (format_usd(2550), format_usd(500000), format_usd(7)) == ("$25.50", "$5,000.00", "$0.07")
    assert cents_to_usd(2501) == Decimal("25.01")
