-- pricing: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
-- The single rounding rule (creditflow.domain.money.usage_charge_micros): half-up to the micro.
CREATE OR REPLACE FUNCTION cf_charge_micros(p_quantity numeric, p_rate numeric) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $$ SELECT round(p_quantity * p_rate * 1000000)::bigint $$;

CREATE OR REPLACE FUNCTION cf_price(p_feature text, p_quantity numeric) RETURNS cf_price_result
LANGUAGE plpgsql STABLE AS $$
DECLARE
    f record;
    r cf_price_result;
BEGIN
    SELECT name, channel, integer_only, credits_per_unit INTO f FROM feature_prices WHERE id = p_feature;
    IF NOT FOUND THEN
        r.code := 'unknown_feature';
        RETURN r;
    END IF;
    r.name := f.name;
    r.channel := f.channel;
    r.credits_per_unit := f.credits_per_unit;
    IF p_quantity IS NULL OR p_quantity <= 0 THEN
        r.code := 'invalid_quantity';  -- the library validates first; this guards direct SQL callers
    ELSIF f.integer_only AND p_quantity <> trunc(p_quantity) THEN
        r.code := 'invalid_quantity';
    ELSIF f.credits_per_unit IS NULL THEN
        r.code := 'feature_not_priced';
    ELSIF round(p_quantity * f.credits_per_unit * 1000000) > 1000000000000000 THEN
        r.code := 'amount_too_large';  -- over 1e9 credits in one event
    ELSE
        r.code := 'ok';
        r.charge_micros := cf_charge_micros(p_quantity, f.credits_per_unit);
    END IF;
    RETURN r;
END $$;

-- The card price ``p_price`` (from cf_price) re-priced with the plan's rate: the plan rate while plan credits
-- last (``p_in_plan``), the overage rate once they are spent. No plan, a refused card price, or no plan_rates row:
-- the card price as it is.
CREATE OR REPLACE FUNCTION cf_plan_price(p_price cf_price_result, p_plan text, p_feature text, p_quantity numeric,
                              p_in_plan boolean) RETURNS cf_price_result LANGUAGE plpgsql STABLE AS $$
DECLARE
    r cf_price_result := p_price;
    v_rate numeric;
BEGIN
    IF p_plan IS NULL OR r.code IS DISTINCT FROM 'ok' THEN
        RETURN r;
    END IF;
    SELECT CASE WHEN p_in_plan THEN credits_per_unit ELSE overage_credits_per_unit END INTO v_rate
        FROM plan_rates WHERE plan_id = p_plan AND feature_id = p_feature;
    IF NOT FOUND THEN
        RETURN r;
    END IF;
    r.credits_per_unit := v_rate;
    IF round(p_quantity * v_rate * 1000000) > 1000000000000000 THEN
        r.code := 'amount_too_large';
        r.charge_micros := NULL;
    ELSE
        r.charge_micros := cf_charge_micros(p_quantity, v_rate);
    END IF;
    RETURN r;
END $$;

CREATE OR REPLACE FUNCTION cf_feature_system_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.credit_system_id IS DISTINCT FROM OLD.credit_system_id THEN
        RAISE EXCEPTION 'the credit system of feature % cannot change', OLD.id USING ERRCODE = 'CF409';
    END IF;
    RETURN NEW;
END $$;
