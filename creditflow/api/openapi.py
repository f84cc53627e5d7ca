"""The OpenAPI document, made to tell the truth about errors and to name operations for generated clients.

FastAPI documents its own 422 shape (``detail``), which creditflow never sends, and nothing for the other error
statuses. Here every operation declares ``4XX`` and ``5XX`` with the one error object (plus its specific codes
where a route lists them), each 503 its ``Retry-After`` header, and each operation a stable ``operationId``
(``<tag>.<function>``, e.g. ``billing.track``) instead of FastAPI's ``track_api_v1_billing_track_post``.
"""

from __future__ import annotations

import re
from typing import Any

import fastapi._compat.v2 as fastapi_pydantic
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from pydantic_core import core_schema

from creditflow.api.conventions import DECIMAL_STRINGS_VERSION, DEFAULT_VERSION, SUPPORTED_VERSIONS, api_version
from creditflow.errors import ERROR_TYPES
from creditflow.notify.events import envelopes

ERROR_OBJECT: dict[str, Any] = {
    "type": "object",
    "title": "ErrorObject",
    "required": ["code", "type", "message", "param", "details", "request_id"],
    "properties": {
        "code": {"type": "string", "description": "Stable, machine-readable reason (e.g. insufficient_credits)."},
        "type": {"type": "string", "enum": list(ERROR_TYPES), "description": "The family a client branches on."},
        "message": {"type": "string", "description": "For humans; may change."},
        "param": {"type": ["string", "null"], "description": "The request field at fault, when one is."},
        "details": {"type": "object", "description": "Code-specific data (e.g. problems, decline_code)."},
        "request_id": {"type": ["string", "null"], "description": "Also in the X-Request-Id header."},
    },
}
ERROR_BODY: dict[str, Any] = {
    "type": "object", "title": "ErrorBody", "required": ["error"],
    "properties": {"error": {"$ref": "#/components/schemas/ErrorObject"}},
    "description": "Every 4xx/5xx answer. A denied usage event (track, holds, event) carries the same `error` "
                   "beside its result fields.",
}
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
_VERSION_PARAMETER = {"name": "Creditflow-Version", "in": "header", "required": False,
                      "description": "The dated API version the client was written against. 2026-12-01 (the "
                                     "default): amounts are exact JSON numbers; 2026-12-05: amounts are decimal "
                                     "strings. Requests take numbers or decimal strings in every version. "
                                     "/openapi.json answers the document of the version asked for (this "
                                     "document describes the one version its enum names; others: "
                                     + ", ".join(SUPPORTED_VERSIONS) + ").",
                      "schema": {"type": "string"}}
# The statuses every operation can answer whatever it does (the middlewares' and the key check's), declared on each
# beside the ones its route names: 401/403 on operations that take a key, 413 on those that take a body.
_GENERIC_ERRORS = {
    "400": "unsupported_version (Creditflow-Version), idempotency_key_mismatch (header and body key differ).",
    "401": "unauthorized: no API key, or an unknown or revoked one.",
    "403": "forbidden / insufficient_scope: the key may not do this, or not on this account.",
    "404": "unknown_account / unknown_<thing> / not_found: an id the request names does not exist, or not for "
           "this key.",
    "413": "request_too_large: the body is over 4 MiB.",
    "422": "validation_error / invalid_id: a field, parameter or id is not acceptable (param names it), or the body "
           "is not one JSON object (malformed, duplicate keys, too deep, a number too long).",
    "503": "database_unavailable / workflow_unavailable: retry the same request after Retry-After.",
}
_VERSION_HEADER = {"Creditflow-Version": {"description": "The API version this answer was given in.",
                                          "schema": {"type": "string"}}}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying the same request.",
                                "schema": {"type": "integer"}}}


def _operation_id(tag: str, operation: dict[str, Any], path: str, method: str) -> str:
    """``<tag>.<function name>``: FastAPI's id is the function name followed by the path and the method, each
    character that is not a word character made ``_`` (``readyz_readyz_get``)."""
    generated, suffix = operation["operationId"], re.sub(r"\W", "_", path) + f"_{method}"
    function = generated.removesuffix(suffix)
    tag = re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_")
    return f"{tag}.{function}"


# What a decimal string answer looks like (exact_json.decimal_string): the digits of the exact number, no exponent.
DECIMAL_STRING_PATTERN = r"^-?[0-9]+(\.[0-9]+)?$"


class _ExactJsonSchema(fastapi_pydantic.GenerateJsonSchema):
    """Version 2026-12-01 (the default): amounts are exact JSON numbers both ways (exact_json.py), so every Decimal is
    declared ``number`` (pydantic would say ``number | string``, which makes generated clients guess); requests
    also take decimal strings, which the field's description says."""

    def decimal_schema(self, schema: core_schema.DecimalSchema) -> dict[str, Any]:
        if self.mode == "serialization":
            return {"type": "number"}
        return self._one(super().decimal_schema(schema), "number")

    @staticmethod
    def _one(generated: dict[str, Any], kind: str) -> dict[str, Any]:
        """The ``kind`` branch of pydantic's ``number | string``, with its bounds (the other is accepted all the same:
        the version parameter's description says so)."""
        return next((b for b in generated.get("anyOf", [generated]) if b.get("type") == kind), {"type": kind})


class _DecimalStringJsonSchema(_ExactJsonSchema):
    """Version 2026-12-05: every amount is answered as a decimal string, so every Decimal is declared ``string``
    (requests still take numbers too)."""

    def decimal_schema(self, schema: core_schema.DecimalSchema) -> dict[str, Any]:
        if self.mode == "serialization":
            return {"type": "string", "format": "decimal", "pattern": DECIMAL_STRING_PATTERN}
        return {**self._one(super(_ExactJsonSchema, self).decimal_schema(schema), "string"), "format": "decimal"}


_NAMING_FIELDS = {"account_id", "customer_id", "from_account_id", "purchase_transaction_id", "payment_method_id",
                  "package_id", "feature_id"}


def _names_something(operation: dict[str, Any], components: dict[str, Any]) -> bool:
    """Whether the operation names something that may not exist (a path id, an account, a feature...): a 404."""
    if any(p["in"] == "path" or p["name"] in _NAMING_FIELDS for p in operation.get("parameters", [])):
        return True
    schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    body = components.get(schema.get("$ref", "").rsplit("/", 1)[-1], {})
    return bool(_NAMING_FIELDS & set(body.get("properties", {})))


def _own_body(response: dict[str, Any]) -> bool:
    """An error status whose route declares its own model (``/readyz``'s 503 says what failed); every other one
    answers the error object (FastAPI's 422 ``HTTPValidationError`` is never sent)."""
    ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
    return bool(ref) and not ref.endswith("/HTTPValidationError")


def build_openapi(app: FastAPI, version: str = DEFAULT_VERSION) -> dict[str, Any]:
    """The document of one API version: the versions differ only in how amounts are typed."""
    original = fastapi_pydantic.GenerateJsonSchema
    fastapi_pydantic.GenerateJsonSchema = (  # type: ignore[misc]
        _DecimalStringJsonSchema if version == DECIMAL_STRINGS_VERSION else _ExactJsonSchema)
    try:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                             webhooks=app.webhooks.routes)
    finally:
        fastapi_pydantic.GenerateJsonSchema = original  # type: ignore[misc]
    schema["info"]["x-creditflow-version"] = version
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorObject"] = ERROR_OBJECT
    components["ErrorBody"] = ERROR_BODY
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    _add_webhooks(schema, components)
    seen: set[str] = set()
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            responses = operation.setdefault("responses", {})
            for status, response in list(responses.items()):
                if status[0] in "45" and not _own_body(response):
                    response["content"] = _ERROR_CONTENT
                    if status == "503":
                        response["headers"] = dict(_RETRY_AFTER)
            for status, description in _GENERIC_ERRORS.items():
                if status in responses or (status in ("401", "403") and not operation.get("security")) or (
                        status == "413" and "requestBody" not in operation) or (
                        status == "503" and path == "/healthz") or (
                        status == "404" and not _names_something(operation, components)):
                    continue
                responses[status] = {"description": description, "content": _ERROR_CONTENT}
                if status == "503":
                    responses[status]["headers"] = dict(_RETRY_AFTER)
            responses.setdefault("4XX", {"description": "A refusal: nothing was changed.", "content": _ERROR_CONTENT})
            responses.setdefault("5XX", {"description": "503: the database or Temporal is unreachable (retry the "
                                                        "same request after Retry-After); 500: a bug, logged with "
                                                        "the request_id.",
                                         "content": _ERROR_CONTENT, "headers": dict(_RETRY_AFTER)})
            operation.setdefault("parameters", []).append(
                {**_VERSION_PARAMETER, "schema": {"type": "string", "enum": [version]}})
            for response in responses.values():
                response["headers"] = {**response.get("headers", {}), **_VERSION_HEADER}
            tag = (operation.get("tags") or ["ops"])[0]
            operation_id = _operation_id(tag, operation, path, method)
            if operation_id in seen:
                operation_id = f"{operation_id}_{method}"
            seen.add(operation_id)
            operation["operationId"] = operation_id
    _add_links(schema)
    return schema


_NEW_ACCOUNT = "$response.body#/id"
_ACCOUNT_OF_BODY = "$request.body#/account_id"
_AGENT = {"path.agent_id": "$response.body#/id", "query.account_id": _ACCOUNT_OF_BODY}
# OpenAPI links: which answer's ids feed which next call (for generated clients, and schemathesis's stateful run in
# tests/test_api_fuzz.py). Keyed by (operationId, status); targets are operationIds, checked when the document is built.
LINKS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("accounts.create_account", "201"): {
        "GetAccount": {"operationId": "accounts.get_account", "parameters": {"path.account_id": _NEW_ACCOUNT}},
        "Balance": {"operationId": "billing.balance", "parameters": {"query.account_id": _NEW_ACCOUNT}},
        "Track": {"operationId": "billing.track",
                  "requestBody": {"account_id": _NEW_ACCOUNT, "feature_id": "chat_message", "value": 1}},
        "Hold": {"operationId": "billing.create_hold",
                 "requestBody": {"account_id": _NEW_ACCOUNT, "feature_id": "chat_message", "value": 1}},
        "TopUp": {"operationId": "top_ups.topup", "requestBody": {"account_id": _NEW_ACCOUNT}},
        "CreateAgent": {"operationId": "agents.create_agent", "requestBody": {"account_id": _NEW_ACCOUNT}},
        "CreateApiKey": {"operationId": "accounts.create_api_key", "parameters": {"path.account_id": _NEW_ACCOUNT}},
        "Transactions": {"operationId": "billing.transactions", "parameters": {"query.account_id": _NEW_ACCOUNT}},
        "WebhookDeliveries": {"operationId": "webhooks.list_deliveries",
                              "parameters": {"query.account_id": _NEW_ACCOUNT}},
    },
    ("billing.track", "200"): {
        "UsageItems": {"operationId": "billing.usage_items", "parameters": {"query.account_id": _ACCOUNT_OF_BODY}},
        "Transaction": {"operationId": "operations.transaction",
                        "parameters": {"path.txn": "$response.body#/transaction_id"}},
    },
    ("billing.create_hold", "201"): {
        "Settle": {"operationId": "billing.settle_hold", "parameters": {"path.hold_id": "$response.body#/hold_id"}},
        "Release": {"operationId": "billing.release_hold", "parameters": {"path.hold_id": "$response.body#/hold_id"}},
    },
    ("top_ups.topup", "200"): {
        "TopUps": {"operationId": "top_ups.list_topups", "parameters": {"query.account_id": _ACCOUNT_OF_BODY}},
        "Purchase": {"operationId": "operations.transaction",
                     "parameters": {"path.txn": "$response.body#/transaction_id"}},
        "Refund": {"operationId": "refunds.create_refund",
                   "requestBody": {"account_id": _ACCOUNT_OF_BODY,
                                   "purchase_transaction_id": "$response.body#/transaction_id"}},
    },
    ("agents.create_agent", "201"): {
        "GetAgent": {"operationId": "agents.get_agent", "parameters": _AGENT},
        "AgentEvents": {"operationId": "agents.agent_events", "parameters": _AGENT},
        "PauseAgent": {"operationId": "agents.pause_agent", "parameters": {"path.agent_id": "$response.body#/id"},
                       "requestBody": {"account_id": _ACCOUNT_OF_BODY}},
        "ResumeAgent": {"operationId": "agents.resume_agent", "parameters": {"path.agent_id": "$response.body#/id"},
                        "requestBody": {"account_id": _ACCOUNT_OF_BODY}},
    },
    ("accounts.create_api_key", "201"): {
        "RevokeApiKey": {"operationId": "accounts.delete_api_key",
                         "parameters": {"path.account_id": "$request.path.account_id",
                                        "path.key_id": "$response.body#/id"}},
    },
    ("webhooks.list_deliveries", "200"): {
        "Redeliver": {"operationId": "webhooks.redeliver",
                      "parameters": {"path.delivery_id": "$response.body#/items/0/id",
                                     "query.account_id": "$request.query.account_id"}},
    },
    ("invoices.list_invoices", "200"): {
        "GetInvoice": {"operationId": "invoices.get_invoice",
                       "parameters": {"path.invoice_id": "$response.body#/items/0/id",
                                      "query.account_id": "$request.query.account_id"}},
    },
    ("operations.start_run", "202"): {
        "GetRun": {"operationId": "operations.get_run", "parameters": {"path.run_id": "$response.body#/run_id"}},
    },
    ("organizations.create_organization", "201"): {
        "GetOrganization": {"operationId": "organizations.get_organization",
                            "parameters": {"path.organization_id": "$response.body#/id"}},
        "CreateOrganizationKey": {"operationId": "organizations.create_organization_key",
                                  "parameters": {"path.organization_id": "$response.body#/id"}},
        "OrganizationKeys": {"operationId": "organizations.get_organization_keys",
                             "parameters": {"path.organization_id": "$response.body#/id"}},
        "Transfers": {"operationId": "organizations.list_transfers",
                      "parameters": {"path.organization_id": "$response.body#/id"}},
    },
    ("organizations.create_organization_key", "201"): {
        "RevokeOrganizationKey": {"operationId": "organizations.delete_organization_key",
                                  "parameters": {"path.organization_id": "$request.path.organization_id",
                                                 "path.key_id": "$response.body#/id"}},
    },
}


def _add_links(schema: dict[str, Any]) -> None:
    """``LINKS`` into the responses; a link naming an operation or status that does not exist is a bug."""
    operations = {op["operationId"]: op for methods in schema["paths"].values() for op in methods.values()}
    for (source, status), links in LINKS.items():
        assert source in operations and status in operations[source]["responses"], (source, status)
        for link in links.values():
            assert link["operationId"] in operations, link["operationId"]
        operations[source]["responses"][status]["links"] = links


def _add_webhooks(schema: dict[str, Any], components: dict[str, Any]) -> None:
    """The OpenAPI 3.1 ``webhooks``: one signed POST per customer-webhook event kind (creditflow.notify.events)."""
    bodies = envelopes()
    refs, defs = models_json_schema([(model, "serialization") for model in bodies.values()],
                                    ref_template="#/components/schemas/{model}", schema_generator=_ExactJsonSchema)
    components.update(defs.get("$defs", {}))
    webhooks = schema.setdefault("webhooks", {})
    for kind, model in bodies.items():
        webhooks[kind] = {"post": {
            "operationId": f"webhooks.{kind}",
            "summary": f"{kind} (sent to the account's webhook_url)",
            "description": "Signed with the account's webhook secret (Creditflow-Signature header); answer 2xx, "
                           "anything else is retried. Amounts come in their integer units and in the API's.",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": refs[(model, "serialization")]}}},
            "responses": {"2XX": {"description": "Received."}},
        }}


def install_openapi(app: FastAPI) -> None:
    """Serve ``build_openapi``'s document at /openapi.json (built once per version): the document of the version
    asked for with ``Creditflow-Version``, the default one without it."""
    documents: dict[str, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        version = api_version()
        if version not in documents:
            documents[version] = build_openapi(app, version)
        if app.openapi_schema is None:
            app.openapi_schema = documents.get(DEFAULT_VERSION) or build_openapi(app)
        return documents[version]

    app.openapi = openapi  # type: ignore[method-assign]
