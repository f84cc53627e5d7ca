"""HTTP API v1 (FastAPI): REST under /api/v1, bearer API keys with scopes."""
