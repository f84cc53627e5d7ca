"""Composition root: settings, pools, the Temporal client and worker, the outbox relay."""
