"""``creditflow worker-health``: the worker's health check for docker compose and Kubernetes (exec probes).

It asks the worker's own endpoint (``/healthz`` on its metrics port), so it reports what the running process
knows: its Temporal worker and outbox relay run and the database answered lately."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from creditflow.config import Settings


def worker_health_url(settings: Settings, url: str | None = None, port: int | None = None) -> str | None:
    """Where the worker answers: ``url``, ``port``, the port file it wrote, or its configured fixed port."""
    if url:
        return url
    if port is None and settings.worker_metrics_port_file and Path(settings.worker_metrics_port_file).exists():
        port = int(Path(settings.worker_metrics_port_file).read_text().strip())
    if port is None and settings.worker_metrics_port > 0:
        port = settings.worker_metrics_port
    if not port:
        return None
    host = "127.0.0.1" if settings.worker_metrics_host in ("0.0.0.0", "") else settings.worker_metrics_host
    return f"http://{host}:{port}/healthz"


def check_worker(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    try:
        resp = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return False, f"worker not answering at {url}: {type(exc).__name__}"
    try:
        body = json.dumps(resp.json())
    except ValueError:
        body = resp.text[:200]
    return resp.status_code == 200, body
