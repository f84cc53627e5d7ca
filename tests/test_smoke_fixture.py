from creditflow.ledger import accounts


async def test_fixture_gives_fresh_db(pool):
    account = await accounts.create_account(pool, name="A", billing_email="a@example.com")
    assert account.balance is not None and account.balance.balance == 5000
