"""Notifications: what creditflow tells account owners (receipts today; channels come with their issue)."""
