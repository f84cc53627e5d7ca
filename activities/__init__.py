"""Thin Temporal activity adapters over creditflow's ledger, payments and notifications."""
