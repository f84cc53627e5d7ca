"""Payments: the Stripe gateway, Stripe customers and saved payment methods."""
