"""The PostgreSQL ledger: schema, migrations, the metering hot path and the outbox."""
