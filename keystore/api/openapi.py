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
from keystore.api.routes_audit import MAX_FILTER_CHARS, MAX_TIME_CHARS, RESULTS
from keystore.api.routes_webhooks import PATH as WEBHOOK_PATH
from keystore.cert_authorities import (
    MAX_KEY_ID_CHARS,
    MAX_PRINCIPAL_CHARS,
    MAX_PRINCIPALS,
    MAX_REASON_CHARS,
    MAX_SERIAL,
)
from keystore.keys import MAX_PUBLIC_KEY_CHARS
from keystore.models import CREATOR_TYPES

SLUG_PATTERN = "^[a-z0-9][a-z0-9-]{0,62}$"
DURATION_PATTERN = "^[0-9]{1,12}[smhdw]$"
# 1-200 characters, no control characters, not only spaces.
NAME_PATTERN = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\x00-\\x20\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_NAME = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": NAME_PATTERN}
_FILTER = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_FILTER_CHARS,
    "pattern": "^[\\x20-\\x7e]+$",
}
_TIME_FILTER = {"type": "string", "format": "date-time", "maxLength": MAX_TIME_CHARS}
_CREATED_BY = {
    "type": ["string", "null"],
    "description": "Who registered it: the member's WorkOS user id, the API key's id, or "
    "'cli'; null for keys registered before this was recorded.",
}
_CREATED_BY_TYPE = {"type": ["string", "null"], "enum": [*CREATOR_TYPES, None]}

_EXAMPLE_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIhs7wL9+AkcNlTJNrj6AJT4Er1suUvVJW22+f82sg3s alice@laptop"
)
_EXAMPLE_CA_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIhs7wL9+AkcNlTJNrj6AJT4Er1suUvVJW22+f82sg3s ci-signer"
)
# One extra principal: printable ASCII without space and comma, never a sandbox id.
_PRINCIPALS = {
    "type": "array",
    "maxItems": MAX_PRINCIPALS,
    "items": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_PRINCIPAL_CHARS,
        "pattern": "^[\\x21-\\x2b\\x2d-\\x7e]+$",
        "not": {"pattern": "^sandbox-[a-z0-9-]{1,63}$"},
    },
    "description": "Principals a certificate of this CA may name, besides the sandbox id "
    "itself, to open any sandbox of the organization (e.g. a team name). Printable ASCII "
    "without spaces or commas; not a sandbox id; duplicates are dropped.",
    "examples": [["team-backend"]],
}
_KEY_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_KEY_ID_CHARS,
    "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]+$",
    "description": "The certificate's key id (ssh-keygen -I), compared exactly.",
}
_SERIAL = {
    "type": "integer",
    "minimum": 0,
    "maximum": MAX_SERIAL,
    "description": "The certificate's serial (ssh-keygen -z).",
}


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
                        "description": "On 409: the id of the key or CA already holding the "
                        "fingerprint, or of the revocation already naming the certificate.",
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
            "created_by",
            "created_by_type",
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
            "created_by": _CREATED_BY,
            "created_by_type": _CREATED_BY_TYPE,
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
    "SshCertAuthority": {
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
            "principals",
            "created_at",
            "created_by",
            "created_by_type",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "type": {"type": "string", "examples": ["ssh-ed25519"]},
            "bits": {"type": "integer", "minimum": 1},
            "fingerprint": {"type": "string", "pattern": "^SHA256:[A-Za-z0-9+/]{43}$"},
            "public_key": {
                "type": "string",
                "description": "The CA's canonical public key, 'TYPE BASE64', without comment.",
            },
            "comment": {"type": ["string", "null"]},
            "principals": {"type": "array", "items": {"type": "string"}},
            "created_at": _TIME,
            "created_by": _CREATED_BY,
            "created_by_type": _CREATED_BY_TYPE,
        },
    },
    "SshCertAuthorityPage": {
        "type": "object",
        "additionalProperties": False,
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/SshCertAuthority"}},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as ?cursor= for the next page; null on the last page.",
            },
        },
    },
    "NewSshCertAuthority": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "public_key"],
        "properties": {
            "name": _NAME,
            "public_key": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_PUBLIC_KEY_CHARS,
                "description": "The CA's public key (ca.pub), checked like an SSH key's. Not a "
                "certificate, not DSA, not RSA under 2048 bits, never a private key.",
                "examples": [_EXAMPLE_CA_KEY],
            },
            "principals": _PRINCIPALS,
        },
    },
    "SshCertAuthorityUpdate": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "name": _NAME,
            "principals": {**_PRINCIPALS, "description": "Replaces the CA's principals."},
        },
    },
    "CertRevocation": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "id",
            "ca_id",
            "key_id",
            "serial",
            "reason",
            "created_at",
            "created_by",
            "created_by_type",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "ca_id": {"type": "string", "format": "uuid"},
            "key_id": {
                "type": ["string", "null"],
                "description": "The revoked key id; null when revoked by serial.",
            },
            "serial": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": MAX_SERIAL,
                "description": "The revoked serial; null when revoked by key id.",
            },
            "reason": {"type": ["string", "null"]},
            "created_at": _TIME,
            "created_by": _CREATED_BY,
            "created_by_type": _CREATED_BY_TYPE,
        },
    },
    "CertRevocationPage": {
        "type": "object",
        "additionalProperties": False,
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/CertRevocation"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
    "NewCertRevocation": {
        "type": "object",
        "additionalProperties": False,
        "description": "Exactly one of key_id and serial.",
        "oneOf": [{"required": ["key_id"]}, {"required": ["serial"]}],
        "properties": {
            "key_id": _KEY_ID,
            "serial": _SERIAL,
            "reason": {
                "type": "string",
                "maxLength": MAX_REASON_CHARS,
                "description": "Why, for the people reading the list later.",
            },
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
            "created_by_type",
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
            "created_by": {
                **_CREATED_BY,
                "description": "Who created it: the member's WorkOS user id, the creating API "
                "key's id, or 'cli'; null when unknown (older keys, or a creating key that was "
                "deleted).",
            },
            "created_by_type": _CREATED_BY_TYPE,
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
                "description": "Only scopes the caller holds itself may be granted.",
            },
            "expires_in": {
                "type": "string",
                "pattern": DURATION_PATTERN,
                "description": "e.g. 90d, 12h, 2w; at most 3650 days. Never expires if absent, "
                "unless the calling API key expires: then the new key expires with it, and a "
                "lifetime ending later is refused (403 expires_after_caller).",
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
                "description": "Lifetime of the new key; default: the old key's lifetime. "
                "Never past the calling API key's own expiry.",
            },
        },
    },
    "AuditEvent": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "id",
            "occurred_at",
            "action",
            "result",
            "reason",
            "actor",
            "target",
            "source_ip",
            "details",
        ],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "occurred_at": _TIME,
            "action": {"type": "string", "examples": ["api.ssh_key.create", "ssh.auth"]},
            "result": {"type": "string", "examples": list(RESULTS)},
            "reason": {"type": ["string", "null"]},
            "actor": {
                "type": ["string", "null"],
                "description": "An API key id, a member's WorkOS user id (details.actor_type "
                "is then 'member'), a key fingerprint for SSH events, 'cli' or 'workos'.",
            },
            "target": {"type": ["string", "null"]},
            "source_ip": {"type": ["string", "null"]},
            "details": {"type": "object"},
        },
    },
    "AuditEventPage": {
        "type": "object",
        "additionalProperties": False,
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEvent"}},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as ?cursor= (with the same filters) for older events.",
            },
        },
    },
    "WorkosEvent": {
        "type": "object",
        "required": ["id", "event"],
        "description": "A WorkOS event as WorkOS delivers it.",
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": 200},
            "event": {
                "type": "string",
                "examples": ["organization_membership.deleted", "organization.deleted"],
            },
            "data": {"type": "object"},
        },
    },
    "WebhookAck": {
        "type": "object",
        "additionalProperties": False,
        "required": ["received", "duplicate"],
        "properties": {
            "received": {"type": "boolean", "const": True},
            "duplicate": {
                "type": "boolean",
                "description": "The event id was received before; it is not processed again.",
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
        "Missing, malformed, unknown, expired or revoked API key; or a WorkOS session token "
        "that is invalid, expired, for an organization not mapped here or disabled, or of a "
        "member removed since it was issued. `error.code` says which.",
        {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    ),
    "Forbidden": _error(
        "Not allowed: the API key lacks the scope (`insufficient_scope`), the member's role "
        "does not allow it (`insufficient_permission`), the member may change only keys they "
        "registered (`not_key_owner`) or may not change certificate authorities, which are "
        "organization-wide credentials (`insufficient_permission`), an rt_test_ key may not "
        "make rt_live_ keys (`test_key_cannot_make_live`), or the new key would outlive the "
        "expiring key creating it (`expires_after_caller`)."
    ),
    "NotFound": _error("No such resource in the API key's organization."),
    "MethodNotAllowed": _error(
        "Method not allowed.", {"Allow": {"required": True, "schema": {"type": "string"}}}
    ),
    "PayloadTooLarge": _error("The request body is over the configured limit."),
    "UnsupportedMediaType": _error("The request body is not application/json."),
    "Unprocessable": _error("The request names a project the organization does not have."),
    "RequestTimeout": _error(
        "The request body did not arrive within the body timeout (`body_timeout`); the "
        "connection is closed."
    ),
    "TooManyRequests": _error(
        "Rate limit of the API key reached (`rate_limited`), or too many invalid API keys "
        "from this address lately (`too_many_invalid_keys`, answered before any key check), "
        "or too many open connections from this address (`too_many_connections`).",
        {"Retry-After": {"required": True, "schema": {"type": "string"}}},
    ),
    "InternalError": _error("Unexpected error; logged on the server, never detailed here."),
    "Unavailable": _error(
        "The database cannot answer right now, or the WorkOS signing keys cannot be fetched; "
        "retry shortly."
    ),
    "WebhookRefused": _error(
        "Not a verified WorkOS delivery: `missing_signature`, `malformed_signature`, "
        "`stale_signature` (timestamp more than 180 s off), `invalid_signature`, "
        "`invalid_json` or `invalid_event`."
    ),
    "WebhookNotConfigured": _error("No workos.webhook_secret is set (`not_configured`)."),
}

_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_RID_PARAM = {
    "name": "rid",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
    "description": "The revocation's id.",
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
    ("POST", "/v1/ssh-cert-authorities"): {
        "operationId": "createSshCertAuthority",
        "summary": "Register an SSH user certificate authority for the organization",
        "body": ("NewSshCertAuthority", True),
        "success": (
            "201",
            "Registered; certificates it signs open the org's sandboxes from the next login.",
            "SshCertAuthority",
        ),
        "errors": ["400", "409", "413", "415"],
    },
    ("GET", "/v1/ssh-cert-authorities"): {
        "operationId": "listSshCertAuthorities",
        "summary": "List the organization's active certificate authorities, oldest first",
        "parameters": list(_PAGE_PARAMS),
        "success": ("200", "One page of certificate authorities.", "SshCertAuthorityPage"),
        "errors": ["400"],
    },
    ("GET", "/v1/ssh-cert-authorities/{id}"): {
        "operationId": "getSshCertAuthority",
        "summary": "Read one certificate authority",
        "parameters": [_ID_PARAM],
        "success": ("200", "The certificate authority.", "SshCertAuthority"),
        "errors": ["404"],
    },
    ("PATCH", "/v1/ssh-cert-authorities/{id}"): {
        "operationId": "updateSshCertAuthority",
        "summary": "Rename a certificate authority and/or replace its principals",
        "parameters": [_ID_PARAM],
        "body": ("SshCertAuthorityUpdate", True),
        "success": ("200", "The updated certificate authority.", "SshCertAuthority"),
        "errors": ["400", "404", "413", "415"],
    },
    ("DELETE", "/v1/ssh-cert-authorities/{id}"): {
        "operationId": "deleteSshCertAuthority",
        "summary": "Revoke a certificate authority; no certificate it signed opens anything",
        "parameters": [_ID_PARAM],
        "success": ("204", "Revoked.", None),
        "errors": ["404"],
    },
    ("POST", "/v1/ssh-cert-authorities/{id}/revocations"): {
        "operationId": "createCertRevocation",
        "summary": "Revoke the certificates of a CA with a given key id or serial",
        "parameters": [_ID_PARAM],
        "body": ("NewCertRevocation", True),
        "success": ("201", "Revoked from the next login on.", "CertRevocation"),
        "errors": ["400", "404", "409", "413", "415"],
    },
    ("GET", "/v1/ssh-cert-authorities/{id}/revocations"): {
        "operationId": "listCertRevocations",
        "summary": "List the certificates a CA revoked, oldest first",
        "parameters": [_ID_PARAM, *_PAGE_PARAMS],
        "success": ("200", "One page of revocations.", "CertRevocationPage"),
        "errors": ["400", "404"],
    },
    ("DELETE", "/v1/ssh-cert-authorities/{id}/revocations/{rid}"): {
        "operationId": "deleteCertRevocation",
        "summary": "Un-revoke: certificates with that key id or serial are accepted again",
        "parameters": [_ID_PARAM, _RID_PARAM],
        "success": ("204", "Deleted.", None),
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
    ("GET", "/v1/audit-events"): {
        "operationId": "listAuditEvents",
        "summary": "List the organization's audit events, newest first",
        "parameters": [
            *_PAGE_PARAMS,
            {
                "name": "action",
                "in": "query",
                "required": False,
                "schema": _FILTER,
                "description": "Exact action, or a prefix ending in * (api.ssh_key.*).",
            },
            {
                "name": "actor",
                "in": "query",
                "required": False,
                "schema": _FILTER,
                "description": "An API key id, a member's user id, a key fingerprint ...",
            },
            {
                "name": "target",
                "in": "query",
                "required": False,
                "schema": _FILTER,
            },
            {
                "name": "result",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": list(RESULTS)},
            },
            {
                "name": "since",
                "in": "query",
                "required": False,
                "schema": _TIME_FILTER,
                "description": "Events at or after this time (RFC 3339, with an offset).",
            },
            {
                "name": "until",
                "in": "query",
                "required": False,
                "schema": _TIME_FILTER,
                "description": "Events before this time (RFC 3339, with an offset).",
            },
        ],
        "success": ("200", "One page of events.", "AuditEventPage"),
        "errors": ["400"],
    },
}

_ERROR_REFS = {
    "400": "BadRequest",
    "401": "Unauthorized",
    "403": "Forbidden",
    "404": "NotFound",
    "405": "MethodNotAllowed",
    "408": "RequestTimeout",
    "409": "Conflict",
    "413": "PayloadTooLarge",
    "415": "UnsupportedMediaType",
    "422": "Unprocessable",
    "429": "TooManyRequests",
    "500": "InternalError",
    "503": "Unavailable",
}
_RESPONSES["Conflict"] = _error(
    "Already there: the public key is already a registered SSH key (`key_already_registered`) "
    "or certificate authority (`ca_already_registered`) of the organization, or the "
    "certificate is already revoked (`already_revoked`); the message and existing_id name it."
)
# Every authenticated operation can answer these (400: also a request aiohttp cannot parse).
_ALWAYS = ["400", "401", "403", "429", "500", "503"]


def _operation(method: str, path: str, scope: str) -> dict[str, Any]:
    spec = _OPERATIONS[(method, path)]
    status, description, schema = spec["success"]
    success: dict[str, Any] = {"description": description}
    if schema:
        success["content"] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
        }
    responses: dict[str, Any] = {status: success}
    with_body = ["408"] if "body" in spec else []  # read_json's body timeout
    for code in sorted({*spec["errors"], *_ALWAYS, *with_body}):
        responses[code] = {"$ref": f"#/components/responses/{_ERROR_REFS[code]}"}
    op: dict[str, Any] = {
        "operationId": spec["operationId"],
        "summary": spec["summary"],
        "description": f"Needs the scope `{scope}` (or a scope that includes it); a member "
        "needs a role that grants it (keystore/api/README.md, Roles).",
        "x-required-scope": scope,
        "security": [{"bearer": []}, {"workosSession": []}],
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
    paths[WEBHOOK_PATH] = {
        "post": {
            "operationId": "workosWebhook",
            "summary": "Receive a WorkOS event (membership removed, organization deleted)",
            "description": "Authenticated by the `WorkOS-Signature` header (HMAC-SHA256 with "
            "workos.webhook_secret over `<t>.<raw body>`, t in milliseconds, at most 180 s "
            "off), not by a bearer token. The event is recorded before the answer and "
            "processed once, right after.",
            "security": [],
            "parameters": [
                {
                    "name": "WorkOS-Signature",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "t=<milliseconds>, v1=<hex HMAC-SHA256>",
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/WorkosEvent"}}
                },
            },
            "responses": {
                "200": {
                    "description": "Recorded (or recorded before); processed in the background.",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/WebhookAck"}}
                    },
                },
                "400": {"$ref": "#/components/responses/WebhookRefused"},
                "404": {"$ref": "#/components/responses/WebhookNotConfigured"},
                "405": {"$ref": "#/components/responses/MethodNotAllowed"},
                "408": {"$ref": "#/components/responses/RequestTimeout"},
                "413": {"$ref": "#/components/responses/PayloadTooLarge"},
                "415": {"$ref": "#/components/responses/UnsupportedMediaType"},
                "429": {"$ref": "#/components/responses/TooManyRequests"},
                "500": {"$ref": "#/components/responses/InternalError"},
                "503": {"$ref": "#/components/responses/Unavailable"},
            },
        }
    }
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
            "description": "Register SSH keys and certificate authorities, manage API keys "
            "and read the audit trail of an "
            "organization. Authenticate with `Authorization: Bearer rt_live_...` (an API key, "
            "for programs) or `Authorization: Bearer <WorkOS session token>` (a member signed "
            "in to the dashboard or the runtools CLI; their roles decide what they may do). "
            "Every request is confined to the caller's organization: another organization's "
            'resources answer 404. Errors are `{"error": {"code", "message"}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "responses": copy.deepcopy(_RESPONSES),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: rt_live_... or rt_test_... Its scopes decide "
                    "what it may do.",
                },
                "workosSession": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A WorkOS AuthKit access token of a member (the dashboard, "
                    "the runtools CLI): signed with a key of workos.jwks_url, issued by "
                    "workos.issuer; org_id names the organization, sub the member, and the "
                    "role/roles/permissions claims what they may do. Accepted only when "
                    "[workos] is configured.",
                },
            },
        },
        "security": [{"bearer": []}, {"workosSession": []}],
    }
