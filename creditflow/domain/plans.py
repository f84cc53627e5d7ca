"""The plan catalog: monthly fee, plan credits per cycle, plan rates and overage rates (pure models).

Rates (credits per unit, exact Decimals, at most 6 decimals) resolve in this order:

* while the cycle's plan credits last: the plan's ``rates[feature]``, else the rate card's rate;
* once they are spent (**overage**: usage then draws on the wallet): ``overage_rates[feature]``,
  else the plan rate, else the rate card's rate. An overage rate is never below the plan's own
  rate for the same feature (spending plan credits must not be the dearer way to pay).
* A surcharge feature (``base_feature_id`` on the card, e.g. toll-free voice) follows its base:
  plan or overage rate of the base plus the card's own surcharge, so the toll-free surcharge is the
  same on every plan (as the prepaid-wallet seed says). Plans may not price surcharge features.

Overage is a per-feature rate rather than a multiplier so every number a customer pays is written
in the catalog, exactly, and a plan can keep one feature at the card rate while discounting another.

The catalog is read from a YAML file (``CREDITFLOW_PLANS_PATH``, default ``plans.default.yaml`` in
the package); YAML decimals are read as Decimals from their text, never through a float.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from creditflow.domain.money import MAX_CREDITS, AmountError, to_decimal, usd_to_credits, validate_rate

DEFAULT_PLANS_PATH = Path(__file__).resolve().parent.parent / "plans.default.yaml"
CREDIT_SYSTEM_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,62}$")
PLAN_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,49}$")
FEATURE_ID = re.compile(r"^[a-z0-9][a-z0-9_\-.]{0,99}$")


class PlanCatalogError(ValueError):
    """A catalog file or document that is not valid; the message names the file and every problem."""


class UnknownPlanError(LookupError):
    """A plan id that is not in the catalog (API code ``unknown_plan``)."""

    code = "unknown_plan"


class CardRate(BaseModel):
    """What the rate card says about one feature: its own rate and, for a surcharge, its base."""

    model_config = ConfigDict(frozen=True)

    credits_per_unit: Decimal
    base_feature_id: str | None = None


def _exact_rates(value: Any) -> dict[str, Decimal]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of feature id to credits per unit")
    rates: dict[str, Decimal] = {}
    for feature_id, rate in value.items():
        if not isinstance(feature_id, str) or not FEATURE_ID.match(feature_id):
            raise ValueError(f"{feature_id!r} is not a feature id")
        try:
            rates[feature_id] = validate_rate(rate)
        except AmountError as exc:
            raise ValueError(f"{feature_id}: {exc}") from exc
    return rates


class Plan(BaseModel):
    """One plan of the catalog. Money is exact: the fee in whole cents, credits whole."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str = Field(min_length=1, max_length=100)
    description: str = ""
    monthly_fee_usd: Decimal = Field(ge=0)
    included_credits: int = Field(ge=0)
    # Credits included every cycle in named credit systems (seed 003, "50 credits per month"): system id -> whole
    # credits, granted into that system's balance with the plan credits and expiring with them.
    included_system_credits: dict[str, int] = Field(default_factory=dict)
    rates: dict[str, Decimal] = Field(default_factory=dict)
    overage_rates: dict[str, Decimal] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not PLAN_ID.match(value):
            raise ValueError("plan ids are 1-50 lowercase letters, digits, _ and -, starting with a letter or digit")
        return value

    @field_validator("monthly_fee_usd", mode="before")
    @classmethod
    def _fee(cls, value: object) -> Decimal:
        try:
            fee = to_decimal(value)
            usd_to_credits(fee)  # refuses fractions of a cent
        except AmountError as exc:
            raise ValueError(str(exc)) from exc
        if fee > MAX_CREDITS / 100:
            raise ValueError("monthly fee is too large")
        return fee

    @field_validator("included_credits", mode="before")
    @classmethod
    def _credits(cls, value: object) -> int:
        try:
            amount = to_decimal(value)
        except AmountError as exc:
            raise ValueError(str(exc)) from exc
        if amount != amount.to_integral_value():
            raise ValueError(f"included credits must be a whole number of credits, got {amount}")
        if amount > MAX_CREDITS:
            raise ValueError("included credits are too many")
        return int(amount)

    @field_validator("included_system_credits", mode="before")
    @classmethod
    def _system_credits(cls, value: Any) -> dict[str, int]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError("expected a mapping of credit system id to whole credits")
        credits: dict[str, int] = {}
        for system_id, amount in value.items():
            if not isinstance(system_id, str) or not CREDIT_SYSTEM_ID.match(system_id) or system_id == "credits":
                raise ValueError(f"{system_id!r} is not a named credit system id (included_credits is the wallet's)")
            credits[system_id] = cls._credits(amount)
        return credits

    @field_validator("rates", "overage_rates", mode="before")
    @classmethod
    def _rates(cls, value: Any) -> dict[str, Decimal]:
        return _exact_rates(value)

    @model_validator(mode="after")
    def _overage_not_cheaper(self) -> Plan:
        for feature_id, overage in self.overage_rates.items():
            plan_rate = self.rates.get(feature_id)
            if plan_rate is not None and overage < plan_rate:
                raise ValueError(f"overage rate of {feature_id} ({overage}) is below its plan rate ({plan_rate})")
        return self

    @property
    def monthly_fee_cents(self) -> int:
        return usd_to_credits(self.monthly_fee_usd)

    def rate_for(self, feature_id: str, card: Mapping[str, CardRate], *, plan_credits_left: bool) -> Decimal:
        """Credits per unit of ``feature_id`` on this plan (see the module doc for the order)."""
        entry = card.get(feature_id)
        if entry is None:
            raise KeyError(f"feature {feature_id} is not on the rate card")
        if entry.base_feature_id is not None:
            base = self.rate_for(entry.base_feature_id, card, plan_credits_left=plan_credits_left)
            return base + entry.credits_per_unit
        if not plan_credits_left and feature_id in self.overage_rates:
            return self.overage_rates[feature_id]
        return self.rates.get(feature_id, entry.credits_per_unit)


class PlanCatalog(BaseModel):
    """All plans on offer, in display order; ids are unique."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    currency: str = "USD"
    plans: tuple[Plan, ...]

    @field_validator("currency")
    @classmethod
    def _usd(cls, value: str) -> str:
        if value != "USD":
            raise ValueError("only USD is supported (1 credit = 1 US cent)")
        return value

    @model_validator(mode="after")
    def _unique(self) -> PlanCatalog:
        if not self.plans:
            raise ValueError("the catalog has no plans")
        seen: set[str] = set()
        for plan in self.plans:
            if plan.id in seen:
                raise ValueError(f"plan id {plan.id!r} appears twice")
            seen.add(plan.id)
        return self

    def get(self, plan_id: str) -> Plan:
        for plan in self.plans:
            if plan.id == plan_id:
                return plan
        raise UnknownPlanError(f"no plan {plan_id!r}; the catalog has {', '.join(self.ids)}")

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(plan.id for plan in self.plans)

    def check_features(self, card: Mapping[str, CardRate]) -> None:
        """Refuse plans that price features missing from the card, or surcharge features."""
        problems = []
        for plan in self.plans:
            for field, rates in (("rates", plan.rates), ("overage_rates", plan.overage_rates)):
                for feature_id in rates:
                    entry = card.get(feature_id)
                    if entry is None:
                        problems.append(f"{plan.id}.{field}: unknown feature {feature_id!r}")
                    elif entry.base_feature_id is not None:
                        problems.append(f"{plan.id}.{field}: {feature_id} is a surcharge on "
                                        f"{entry.base_feature_id}; price {entry.base_feature_id} instead")
            for feature_id, overage in plan.overage_rates.items():
                entry = card.get(feature_id)
                if feature_id not in plan.rates and entry is not None and overage < entry.credits_per_unit:
                    problems.append(f"{plan.id}.overage_rates: {feature_id} ({overage}) is below the rate card "
                                    f"({entry.credits_per_unit}), the rate it has while plan credits last")
        if problems:
            raise PlanCatalogError("plan catalog does not match the rate card: " + "; ".join(problems))


class _DecimalLoader(yaml.SafeLoader):
    """YAML's floats become Decimals parsed from their text (``0.1`` stays exactly 0.1)."""


def _decimal(loader: yaml.SafeLoader, node: yaml.Node) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "")  # type: ignore[arg-type]
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a finite number", node.start_mark)
    return value


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _decimal)


def _where(loc: tuple[int | str, ...], data: object) -> str:
    """``plans[1] (growth).monthly_fee_usd`` rather than pydantic's ``plans.1.monthly_fee_usd``."""
    parts: list[str] = []
    node: object = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
            if isinstance(node, Mapping) and isinstance(node.get("id"), str):
                label += f" ({node['id']})"
            parts.append(label)
        else:
            node = node.get(item) if isinstance(node, Mapping) else None
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def parse_plan_catalog(data: object, source: str = "plan catalog") -> PlanCatalog:
    """Validate a parsed document; every problem is reported with where it is."""
    if not isinstance(data, Mapping) or not isinstance(data.get("plans"), list):
        raise PlanCatalogError(f"{source}: expected a mapping with a 'plans' list")
    try:
        return PlanCatalog.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            ": ".join(part for part in (_where(tuple(e["loc"]), data), e["msg"].removeprefix("Value error, ")) if part)
            for e in exc.errors())
        raise PlanCatalogError(f"{source}: {problems}") from None


def load_plan_catalog(path: Path | None = None, card: Mapping[str, CardRate] | None = None) -> PlanCatalog:
    """Read and validate a catalog file (the packaged default when ``path`` is None).

    With ``card``, plans are also checked against the rate card's features."""
    path = path or DEFAULT_PLANS_PATH
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanCatalogError(f"{path}: cannot read the plan catalog: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_DecimalLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise PlanCatalogError(f"{path}: not valid YAML: {exc}") from None
    catalog = parse_plan_catalog(data, str(path))
    if card is not None:
        try:
            catalog.check_features(card)
        except PlanCatalogError as exc:
            raise PlanCatalogError(f"{path}: {exc}") from None
    return catalog
