"""The OpenAPI 3.1 document of the key API, served at ``GET /v1/openapi.json``.

Written by hand next to the handlers; ``tests/unit/test_api_openapi.py`` checks that its
operations are exactly the app's routes with the same scopes, and the fuzz test checks every
live response against it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from keystore import tokens
from keystore.api.common import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, ApiRoute
from keystore.keys import MAX_PUBLIC_KEY_CHARS

SLUG_PATTERN = "^[a-z0-9][a-z0-9-]{0,62}$"
DURATION_PATTERN = "^[0-9]{1,12}[smhdw]$"
# 1-200 characters, no control characters, not only spaces.
NAME_PATTERN = "^[^\\x00-\\x1f\\x7f]*[^\\x00-\\x20\\x7f][^\\x00-\\x1f\\x7f]*$"
_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_NAME = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": NAME_PATTERN}

_EXAMPLE_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIhs7wL9+AkcNlTJNrj6AJT4Er1suUvVJW22+f82sg3s alice@laptop"
)


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        response["headers"] = headers
    return response


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {
                        "type": "string",
                        "description": "Stable, machine-readable reason, e.g. private_key.",
                    },
                    "message": {"type": "string", "description": "What happened, for a person."},
                    "existing_id": {
                        "type": "string",
                        "format": "uuid",
                        "description": "On 409: the id of the key already holding the fingerprint.",
                    },
                },
            }
        },
    },
    "SshKey": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "id",
            "name",
            "type",
            "bits",
            "fingerprint",
            "public_key",
            "comment",
            "project",
            "created_at",
            "last_used_at",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "type": {"type": "string", "examples": ["ssh-ed25519"]},
            "bits": {"type": "integer", "minimum": 1},
            "fingerprint": {"type": "string", "pattern": "^SHA256:[A-Za-z0-9+/]{43}$"},
            "public_key": {
                "type": "string",
                "description": "Canonical 'TYPE BASE64', without comment.",
            },
            "comment": {"type": ["string", "null"]},
            "project": {"type": "string", "pattern": SLUG_PATTERN},
            "created_at": _TIME,
            "last_used_at": {**_NULLABLE_TIME, "description": "null until first use."},
        },
    },
    "SshKeyPage": {
        "type": "object",
        "additionalProperties": False,
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/SshKey"}},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as ?cursor= for the next page; null on the last page.",
            },
        },
    },
    "NewSshKey": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "public_key"],
        "properties": {
            "name": _NAME,
            "public_key": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_PUBLIC_KEY_CHARS,
                "description": "One OpenSSH public key line (a .pub file), an RFC 4716 "
                "block or a PEM public key. Not an authorized_keys line with options, not a "
                "certificate, not DSA, not RSA under 2048 bits, never a private key.",
                "examples": [_EXAMPLE_KEY],
            },
            "project": {
                "type": "string",
                "pattern": SLUG_PATTERN,
                "description": "Project slug; the organization's default project if absent.",
            },
        },
    },
    "SshKeyUpdate": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "name": _NAME,
            "project": {"type": "string", "pattern": SLUG_PATTERN},
        },
    },
    "ApiKey": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "id",
            "name",
            "environment",
            "prefix",
            "scopes",
            "created_at",
            "expires_at",
            "last_used_at",
            "created_by",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "environment": {"type": "string", "enum": list(tokens.ENVIRONMENTS)},
            "prefix": {
                "type": "string",
                "pattern": "^rt_(live|test)_[0-9A-Za-z]{12}$",
                "description": "The non-secret start of the key, to tell keys apart.",
            },
            "scopes": {
                "type": "array",
                "items": {"type": "string", "enum": sorted(tokens.SCOPES)},
            },
            "created_at": _TIME,
            "expires_at": _NULLABLE_TIME,
            "last_used_at": _NULLABLE_TIME,
            "created_by": {"type": ["string", "null"], "format": "uuid"},
        },
    },
    "ApiKeyPage": {
        "type": "object",
        "additionalProperties": False,
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/ApiKey"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
    "NewApiKey": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "scopes"],
        "properties": {
            "name": _NAME,
            "scopes": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "enum": sorted(tokens.SCOPES)},
                "description": "Only scopes the calling key holds itself may be granted.",
            },
            "expires_in": {
                "type": "string",
                "pattern": DURATION_PATTERN,
                "description": "e.g. 90d, 12h, 2w; at most 3650 days. Never expires if absent.",
            },
            "environment": {"type": "string", "enum": list(tokens.ENVIRONMENTS)},
        },
    },
    "RotateApiKey": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "grace_period": {
                "type": "string",
                "pattern": DURATION_PATTERN,
                "description": "Keep the old key working this long (at most 30d); without it "
                "the old key is revoked at once.",
            },
            "expires_in": {
                "type": "string",
                "pattern": DURATION_PATTERN,
                "description": "Lifetime of the new key; default: the old key's lifetime.",
            },
        },
    },
}
_SCHEMAS["ApiKeyWithSecret"] = copy.deepcopy(_SCHEMAS["ApiKey"])
_SCHEMAS["ApiKeyWithSecret"]["required"].append("secret")
_SCHEMAS["ApiKeyWithSecret"]["properties"]["secret"] = {
    "type": "string",
    "pattern": "^rt_(live|test)_[0-9A-Za-z]{44}$",
    "description": "The API key. Shown once, here; store it now.",
}
_SCHEMAS["RotatedApiKey"] = copy.deepcopy(_SCHEMAS["ApiKeyWithSecret"])
_SCHEMAS["RotatedApiKey"]["required"].append("previous")
_SCHEMAS["RotatedApiKey"]["properties"]["previous"] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "revoked_at", "expires_at"],
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "revoked_at": _NULLABLE_TIME,
        "expires_at": _NULLABLE_TIME,
    },
}

_RESPONSES: dict[str, Any] = {
    "BadRequest": _error("Malformed request or invalid input; the message says what to fix."),
    "Unauthorized": _error(
        "Missing, malformed, unknown, expired or revoked API key.",
        {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    ),
    "Forbidden": _error("The API key lacks the scope this operation needs."),
    "NotFound": _error("No such resource in the API key's organization."),
    "MethodNotAllowed": _error(
        "Method not allowed.", {"Allow": {"required": True, "schema": {"type": "string"}}}
    ),
    "PayloadTooLarge": _error("The request body is over the configured limit."),
    "UnsupportedMediaType": _error("The request body is not application/json."),
    "Unprocessable": _error("The request names a project the organization does not have."),
    "TooManyRequests": _error(
        "Rate limit of the API key reached.",
        {"Retry-After": {"required": True, "schema": {"type": "string"}}},
    ),
    "InternalError": _error("Unexpected error; logged on the server, never detailed here."),
    "Unavailable": _error("The database cannot answer right now; retry shortly."),
}

_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_PAGE_PARAMS = [
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_PAGE_SIZE,
            "default": DEFAULT_PAGE_SIZE,
        },
    },
    {
        "name": "cursor",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "maxLength": 200},
        "description": "next_cursor of the previous page.",
    },
]

# operationId, summary, parameters, request body schema (and whether it is required), success.
_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/ssh-keys"): {
        "operationId": "createSshKey",
        "summary": "Register an SSH public key for the organization",
        "body": ("NewSshKey", True),
        "success": ("201", "Registered; opens the org's sandboxes from the next login.", "SshKey"),
        "errors": ["400", "409", "413", "415", "422"],
    },
    ("GET", "/v1/ssh-keys"): {
        "operationId": "listSshKeys",
        "summary": "List the organization's active SSH keys, oldest first",
        "parameters": [
            *_PAGE_PARAMS,
            {
                "name": "project",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "pattern": SLUG_PATTERN},
            },
        ],
        "success": ("200", "One page of keys.", "SshKeyPage"),
        "errors": ["400", "422"],
    },
    ("GET", "/v1/ssh-keys/{id}"): {
        "operationId": "getSshKey",
        "summary": "Read one SSH key",
        "parameters": [_ID_PARAM],
        "success": ("200", "The key.", "SshKey"),
        "errors": ["404"],
    },
    ("PATCH", "/v1/ssh-keys/{id}"): {
        "operationId": "updateSshKey",
        "summary": "Rename an SSH key or move it to another project of the organization",
        "parameters": [_ID_PARAM],
        "body": ("SshKeyUpdate", True),
        "success": ("200", "The updated key.", "SshKey"),
        "errors": ["400", "404", "413", "415", "422"],
    },
    ("DELETE", "/v1/ssh-keys/{id}"): {
        "operationId": "deleteSshKey",
        "summary": "Revoke an SSH key; every later login with it is refused",
        "parameters": [_ID_PARAM],
        "success": ("204", "Revoked.", None),
        "errors": ["404"],
    },
    ("POST", "/v1/api-keys"): {
        "operationId": "createApiKey",
        "summary": "Create an API key; the secret is in this response only",
        "body": ("NewApiKey", True),
        "success": ("201", "Created.", "ApiKeyWithSecret"),
        "errors": ["400", "413", "415"],
    },
    ("GET", "/v1/api-keys"): {
        "operationId": "listApiKeys",
        "summary": "List the organization's API keys that are not revoked (metadata only)",
        "parameters": list(_PAGE_PARAMS),
        "success": ("200", "One page of keys.", "ApiKeyPage"),
        "errors": ["400"],
    },
    ("DELETE", "/v1/api-keys/{id}"): {
        "operationId": "deleteApiKey",
        "summary": "Revoke an API key at once",
        "parameters": [_ID_PARAM],
        "success": ("204", "Revoked.", None),
        "errors": ["404"],
    },
    ("POST", "/v1/api-keys/{id}/rotate"): {
        "operationId": "rotateApiKey",
        "summary": "Issue a new secret for an API key and retire the old one",
        "parameters": [_ID_PARAM],
        "body": ("RotateApiKey", False),
        "success": (
            "201",
            "The new key with its secret, and what became of the old one.",
            "RotatedApiKey",
        ),
        "errors": ["400", "404", "413", "415"],
    },
}

_ERROR_REFS = {
    "400": "BadRequest",
    "401": "Unauthorized",
    "403": "Forbidden",
    "404": "NotFound",
    "405": "MethodNotAllowed",
    "409": "Conflict",
    "413": "PayloadTooLarge",
    "415": "UnsupportedMediaType",
    "422": "Unprocessable",
    "429": "TooManyRequests",
    "500": "InternalError",
    "503": "Unavailable",
}
_RESPONSES["Conflict"] = _error(
    "This public key is already registered for the organization; the message and existing_id "
    "name the key holding it."
)
# Every authenticated operation can answer these.
_ALWAYS = ["401", "403", "429", "500", "503"]


def _operation(method: str, path: str, scope: str) -> dict[str, Any]:
    spec = _OPERATIONS[(method, path)]
    status, description, schema = spec["success"]
    success: dict[str, Any] = {"description": description}
    if schema:
        success["content"] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
        }
    responses: dict[str, Any] = {status: success}
    for code in sorted({*spec["errors"], *_ALWAYS}):
        responses[code] = {"$ref": f"#/components/responses/{_ERROR_REFS[code]}"}
    op: dict[str, Any] = {
        "operationId": spec["operationId"],
        "summary": spec["summary"],
        "description": f"Needs the scope `{scope}` (or a scope that includes it).",
        "x-required-scope": scope,
        "security": [{"bearer": []}],
        "responses": responses,
    }
    if spec.get("parameters"):
        op["parameters"] = copy.deepcopy(spec["parameters"])
    if "body" in spec:
        name, required = spec["body"]
        op["requestBody"] = {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    return op


def document(routes: Iterable[ApiRoute]) -> dict[str, Any]:
    """The document for ``routes`` (each must be one of the operations described here)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(
            route.method, route.path, route.scope
        )
    paths["/v1/openapi.json"] = {
        "get": {
            "operationId": "getOpenApi",
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {
                    "description": "The OpenAPI document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "runtools key API",
            "version": "1",
            "description": "Register SSH keys and manage API keys of an organization. "
            "Authenticate with `Authorization: Bearer rt_live_...`. Every request is confined to "
            "the API key's organization: another organization's resources answer 404. Errors "
            'are `{"error": {"code", "message"}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "responses": copy.deepcopy(_RESPONSES),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: rt_live_... or rt_test_...",
                }
            },
        },
        "security": [{"bearer": []}],
    }
