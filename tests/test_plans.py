"""The plan catalog: the packaged default (exact numbers), rate resolution, and refused files."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from creditflow.config import Settings
from creditflow.domain.plans import (
    DEFAULT_PLANS_PATH,
    CardRate,
    PlanCatalogError,
    UnknownPlanError,
    load_plan_catalog,
    parse_plan_catalog,
)
from creditflow.ledger.ratecard import DEFAULT_RATECARD, read_ratecard

CARD = {spec.id: CardRate(credits_per_unit=spec.credits_per_unit, base_feature_id=spec.base_feature_id)
        for spec in read_ratecard(DEFAULT_RATECARD)}
D = Decimal


def test_default_catalog_exact_numbers() -> None:
    catalog = load_plan_catalog(card=CARD)  # also checked against the default rate card
    assert catalog.ids == ("starter", "growth", "scale")
    assert catalog.currency == "USD"
    summary = [(p.id, p.name, p.monthly_fee_usd, p.monthly_fee_cents, p.included_credits) for p in catalog.plans]
    assert summary == [("starter", "Starter", D(49), 4900, 5000), ("growth", "Growth", D(199), 19900, 22000),
                       ("scale", "Scale", D(499), 49900, 60000)]
    assert catalog.get("starter").rates == {"voice_minute": D(9)}
    assert catalog.get("starter").overage_rates == {"voice_minute": D(10)}
    assert catalog.get("growth").rates == {"voice_minute": D(8), "transfer_minute": D(4), "chat_message": D("0.8")}
    assert catalog.get("growth").overage_rates == {"voice_minute": D(9), "transfer_minute": D(5),
                                                   "chat_message": D(1)}
    assert catalog.get("scale").rates == {"voice_minute": D(7), "transfer_minute": D(3), "chat_message": D("0.5"),
                                          "llm_tokens": D("0.08")}
    assert catalog.get("scale").overage_rates == {"voice_minute": D(8), "transfer_minute": D(4),
                                                  "chat_message": D("0.8"), "llm_tokens": D("0.1")}
    assert str(catalog.get("growth").rates["chat_message"]) == "0.8"  # read from YAML text, never a float


def test_settings_load_the_packaged_catalog_or_a_configured_file(tmp_path: Path) -> None:
    assert Settings().plans_path is None
    assert Settings().plan_catalog() == load_plan_catalog(DEFAULT_PLANS_PATH)
    assert Settings().invoice_seller_name == "creditflow"
    custom = tmp_path / "plans.yaml"
    custom.write_text("plans:\n  - {id: solo, name: Solo, monthly_fee_usd: 9.99, included_credits: 1000}\n")
    catalog = Settings(plans_path=custom).plan_catalog()
    assert (catalog.ids, catalog.get("solo").monthly_fee_cents) == (("solo",), 999)


@pytest.mark.parametrize(("plan_id", "feature", "in_plan", "overage"), [
    ("starter", "voice_minute", D(9), D(10)),
    ("starter", "voice_minute_tollfree", D(11), D(12)),  # plan voice rate + the card's flat 2 credits/min
    ("starter", "chat_message", D(1), D(1)),  # not on the plan: the card's rate both ways
    ("growth", "voice_minute", D(8), D(9)),
    ("growth", "voice_minute_tollfree", D(10), D(11)),
    ("growth", "chat_message", D("0.8"), D(1)),
    ("growth", "llm_tokens", D("0.1"), D("0.1")),
    ("scale", "voice_minute", D(7), D(8)),
    ("scale", "transfer_minute", D(3), D(4)),
    ("scale", "llm_tokens", D("0.08"), D("0.1")),
    ("scale", "phone_number", D(150), D(150)),
])
def test_rate_resolution(plan_id: str, feature: str, in_plan: Decimal, overage: Decimal) -> None:
    plan = load_plan_catalog().get(plan_id)
    assert plan.rate_for(feature, CARD, plan_credits_left=True) == in_plan
    assert plan.rate_for(feature, CARD, plan_credits_left=False) == overage


def test_lower_per_minute_rates_on_higher_plans() -> None:
    catalog = load_plan_catalog()
    voice = [p.rate_for("voice_minute", CARD, plan_credits_left=True) for p in catalog.plans]
    assert voice == [D(9), D(8), D(7)]
    assert all(rate < CARD["voice_minute"].credits_per_unit for rate in voice)


def test_unknown_plan() -> None:
    with pytest.raises(UnknownPlanError) as caught:
        load_plan_catalog().get("platinum")
    assert str(caught.value) == "no plan 'platinum'; the catalog has starter, growth, scale"
    assert caught.value.code == "unknown_plan"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plans.yaml"
    path.write_text(text)
    return path


PLAN = "  - {id: basic, name: Basic, monthly_fee_usd: 10, included_credits: 1000"


@pytest.mark.parametrize(("text", "message"), [
    ("plans:\n  - {id: basic, name: Basic, monthly_fee_usd: 49.005, included_credits: 1000}\n",
     "plans[0] (basic).monthly_fee_usd: $49.005 is not a whole number of cents"),
    ("plans:\n  - {id: basic, name: Basic, monthly_fee_usd: -1, included_credits: 1000}\n",
     "plans[0] (basic).monthly_fee_usd: Input should be greater than or equal to 0"),
    ("plans:\n" + PLAN + ".5}\n",
     "plans[0] (basic).included_credits: included credits must be a whole number of credits, got 1000.5"),
    ("plans:\n  - {id: basic, name: Basic, monthly_fee_usd: 10, included_credits: true}\n",
     "plans[0] (basic).included_credits: amounts must be integers or decimal strings, not floats/booleans"),
    ("plans:\n" + PLAN + ", rates: {voice_minute: -1}}\n",
     "plans[0] (basic).rates: voice_minute: credits_per_unit cannot be negative"),
    ("plans:\n" + PLAN + ", rates: {voice_minute: 0.1234567}}\n",
     "plans[0] (basic).rates: voice_minute: credits_per_unit has more than 6 decimals"),
    ("plans:\n" + PLAN + ", rates: {voice_minute: 9}, overage_rates: {voice_minute: 8}}\n",
     "plans[0] (basic): overage rate of voice_minute (8) is below its plan rate (9)"),
    ("plans:\n" + PLAN + ", seats: 3}\n", "plans[0] (basic).seats: Extra inputs are not permitted"),
    ("plans:\n" + PLAN + "}\n" + PLAN + "}\n", "plan id 'basic' appears twice"),
    ("plans:\n  - {id: Basic Plan, name: Basic, monthly_fee_usd: 10, included_credits: 1}\n",
     "plans[0] (Basic Plan).id: plan ids are 1-50 lowercase letters, digits, _ and -, starting with a letter or digit"),
    ("plans:\n  - {id: basic, monthly_fee_usd: 10, included_credits: 1}\n", "plans[0] (basic).name: Field required"),
    ("currency: EUR\nplans:\n" + PLAN + "}\n", "currency: only USD is supported (1 credit = 1 US cent)"),
    ("plans: []\n", "the catalog has no plans"),
    ("- starter\n", "expected a mapping with a 'plans' list"),
])
def test_bad_files_are_refused_with_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PlanCatalogError) as caught:
        load_plan_catalog(path)
    assert str(caught.value) == f"{path}: {message}"


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "plans:\n  - {id: a, name: A, monthly_fee_usd: 1.001, included_credits: 1}\n"
                           "  - {id: b, name: B, monthly_fee_usd: 1, included_credits: -5}\n")
    with pytest.raises(PlanCatalogError) as caught:
        load_plan_catalog(path)
    assert str(caught.value) == (f"{path}: plans[0] (a).monthly_fee_usd: $1.001 is not a whole number of cents; "
                                 "plans[1] (b).included_credits: Input should be greater than or equal to 0")


def test_plans_must_match_the_rate_card(tmp_path: Path) -> None:
    path = write(tmp_path, "plans:\n" + PLAN + ", rates: {fax_page: 3, voice_minute_tollfree: 9},"
                           " overage_rates: {chat_message: '0.5'}}\n")
    load_plan_catalog(path)  # valid on its own
    with pytest.raises(PlanCatalogError) as caught:
        load_plan_catalog(path, card=CARD)
    assert str(caught.value) == (
        f"{path}: plan catalog does not match the rate card: basic.rates: unknown feature 'fax_page'; "
        "basic.rates: voice_minute_tollfree is a surcharge on voice_minute; price voice_minute instead; "
        "basic.overage_rates: chat_message (0.5) is below the rate card (1), the rate it has while plan credits last")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PlanCatalogError) as caught:
        load_plan_catalog(missing)
    assert str(caught.value) == f"{missing}: cannot read the plan catalog: No such file or directory"
    broken = write(tmp_path, "plans: [\n")
    with pytest.raises(PlanCatalogError, match=r"plans\.yaml: not valid YAML: "):
        load_plan_catalog(broken)
    infinite = write(tmp_path, "plans:\n  - {id: a, name: A, monthly_fee_usd: .inf, included_credits: 1}\n")
    with pytest.raises(PlanCatalogError, match="'.inf' is not a finite number"):
        load_plan_catalog(infinite)


def test_python_floats_are_refused_in_documents() -> None:
    with pytest.raises(PlanCatalogError) as caught:
        parse_plan_catalog({"plans": [{"id": "a", "name": "A", "monthly_fee_usd": 9.99, "included_credits": 1}]})
    assert str(caught.value) == ("plan catalog: plans[0] (a).monthly_fee_usd: amounts must be integers or decimal "
                                 "strings, not floats/booleans")
