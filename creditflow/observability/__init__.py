"""Metrics, logs and health for every creditflow process (API, worker, CLI), set up in one place.

``metrics``: Prometheus metrics (request, hot-path and business figures; the Temporal SDK's own runtime
telemetry for workers). ``logs``: structured logging with request/account/workflow ids and secret scrubbing.
``health``: ``/healthz`` and ``/readyz`` for the API, and the worker's health state served on its metrics port.
"""
