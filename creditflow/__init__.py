"""creditflow: a durable billing engine for usage-based products."""

__version__ = "0.1.0"
