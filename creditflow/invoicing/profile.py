"""The billing profile of an account: invoice address, billing email and tax registrations.

These are the customer's own words, printed on every invoice drafted after they change (an invoice keeps what
it was drafted with: the PDF is never re-rendered). The address lives in ``billing_profiles`` (no row: empty),
the billing email on ``accounts.billing_email`` (notifications read it there), tax registrations in
``tax_registrations`` (several per account; ``status`` is ``verified`` only when an operator says so).

Country fields are ISO 3166-1 alpha-2 codes, checked against the official list below rather than a
"two capital letters" pattern, so a typo such as ``UK`` (the United Kingdom is ``GB``) is refused.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.domain.invoices import BillingDetails, TaxRegistration
from creditflow.errors import CreditflowError
from creditflow.ids import new_id

# ISO 3166-1 alpha-2, the 249 officially assigned codes.
ISO_COUNTRIES = frozenset("""
AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ
CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR
GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO
JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR
MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO
RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV
TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW
""".split())  # noqa: SIM905 - a table of codes reads better than 249 quoted strings

ADDRESS_FIELDS = ("company", "address_line1", "address_line2", "city", "postal_code", "region", "country",
                  "po_number")
TAX_STATUSES = ("verified", "unverified")


def check_country(value: str) -> str:
    """An official ISO 3166-1 alpha-2 code, upper case (``de`` is refused rather than guessed)."""
    if value not in ISO_COUNTRIES:
        raise ValueError("not an ISO 3166-1 alpha-2 country code (e.g. DE, GB, US)")
    return value


class InvoiceAddress(BaseModel):
    """The address printed in the invoice's bill-to block; empty strings are fields not filled in."""

    account_id: str
    company: str = ""
    address_line1: str = ""
    address_line2: str = ""
    city: str = ""
    postal_code: str = ""
    region: str = ""
    country: str | None = None
    po_number: str = ""
    updated_at: datetime | None = None


class TaxRegistrationRecord(BaseModel):
    id: str
    account_id: str
    country: str
    description: str
    value: str
    status: str
    created_at: datetime
    updated_at: datetime


async def _account_exists(conn: Any, account_id: str, *, lock: bool = False) -> str:
    row = await (await conn.execute("SELECT billing_email FROM accounts WHERE id = %s" + (" FOR UPDATE" if lock
                                                                                           else ""),
                                    (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    return str(row["billing_email"])


async def get_address(pool: AsyncConnectionPool, account_id: str) -> InvoiceAddress:
    async with pool.connection() as conn:
        await _account_exists(conn, account_id)
        row = await (await conn.execute(
            "SELECT account_id, company, address_line1, address_line2, city, postal_code, region, country, po_number,"
            " updated_at FROM billing_profiles WHERE account_id = %s", (account_id,))).fetchone()
    return InvoiceAddress(**row) if row else InvoiceAddress(account_id=account_id)


async def put_address(pool: AsyncConnectionPool, account_id: str, values: dict[str, Any]) -> InvoiceAddress:
    """Replace the fields named in ``values`` (validated by the caller); the others keep their value."""
    assert set(values) <= set(ADDRESS_FIELDS), values
    async with pool.connection() as conn, conn.transaction():
        await _account_exists(conn, account_id)
        await conn.execute("INSERT INTO billing_profiles (account_id) VALUES (%s) ON CONFLICT DO NOTHING",
                           (account_id,))
        if values:
            sets = ", ".join(f"{field} = %({field})s" for field in values)  # names from ADDRESS_FIELDS only
            await conn.execute(f"UPDATE billing_profiles SET {sets}, updated_at = now() WHERE account_id = %(a)s",
                               {**values, "a": account_id})
    return await get_address(pool, account_id)


async def get_billing_email(pool: AsyncConnectionPool, account_id: str) -> str:
    async with pool.connection() as conn:
        return await _account_exists(conn, account_id)


async def set_billing_email(pool: AsyncConnectionPool, account_id: str, email: str) -> str:
    async with pool.connection() as conn, conn.transaction():
        await _account_exists(conn, account_id, lock=True)
        await conn.execute("UPDATE accounts SET billing_email = %s WHERE id = %s", (email, account_id))
    return email


async def list_tax_registrations(pool: AsyncConnectionPool, account_id: str) -> list[TaxRegistrationRecord]:
    async with pool.connection() as conn:
        await _account_exists(conn, account_id)
        rows = await (await conn.execute(
            "SELECT * FROM tax_registrations WHERE account_id = %s ORDER BY created_at, id", (account_id,))).fetchall()
    return [TaxRegistrationRecord(**row) for row in rows]


async def add_tax_registration(pool: AsyncConnectionPool, account_id: str, *, country: str, description: str,
                               value: str, status: str = "unverified") -> tuple[TaxRegistrationRecord, bool]:
    """Add one; the same (country, value) again returns the existing one (``created`` False) unchanged, so a
    retried POST does not fail, and a customer cannot reset an operator's ``verified``."""
    assert status in TAX_STATUSES
    async with pool.connection() as conn, conn.transaction():
        await _account_exists(conn, account_id)
        row = await (await conn.execute(
            "INSERT INTO tax_registrations (id, account_id, country, description, value, status)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (account_id, country, value) DO NOTHING RETURNING *",
            (new_id("txr"), account_id, country, description, value, status))).fetchone()
        created = row is not None
        if row is None:
            row = await (await conn.execute(
                "SELECT * FROM tax_registrations WHERE account_id = %s AND country = %s AND value = %s",
                (account_id, country, value))).fetchone()
    assert row is not None
    return TaxRegistrationRecord(**row), created


async def set_tax_registration_status(pool: AsyncConnectionPool, account_id: str, registration_id: str,
                                      status: str) -> TaxRegistrationRecord:
    assert status in TAX_STATUSES
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "UPDATE tax_registrations SET status = %s, updated_at = now() WHERE id = %s AND account_id = %s"
            " RETURNING *", (status, registration_id, account_id))).fetchone()
    if row is None:
        raise CreditflowError("unknown_tax_registration", "no such tax registration")
    return TaxRegistrationRecord(**row)


async def delete_tax_registration(pool: AsyncConnectionPool, account_id: str, registration_id: str) -> None:
    """Another account's registration is answered as unknown, like one that never existed."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "DELETE FROM tax_registrations WHERE id = %s AND account_id = %s RETURNING id",
            (registration_id, account_id))).fetchone()
    if row is None:
        raise CreditflowError("unknown_tax_registration", "no such tax registration")


async def billing_details(pool: AsyncConnectionPool, account_id: str) -> tuple[BillingDetails,
                                                                                tuple[TaxRegistration, ...]]:
    """What an invoice drafted now prints: the bill-to block and the tax registrations."""
    address = await get_address(pool, account_id)
    email = await get_billing_email(pool, account_id)
    registrations = await list_tax_registrations(pool, account_id)
    details = BillingDetails(
        company=address.company, address_line1=address.address_line1, address_line2=address.address_line2,
        city=address.city, postal_code=address.postal_code, region=address.region, country=address.country or "",
        po_number=address.po_number, billing_email=email)
    taxes = tuple(TaxRegistration(country=r.country, description=r.description, value=r.value,
                                  status=r.status)  # type: ignore[arg-type]
                  for r in registrations)
    return details, taxes
