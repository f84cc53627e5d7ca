"""Deterministic orchestration, one module per workflow. Modules here have no import-time side effects
because the workflow sandbox re-imports them for every run."""
