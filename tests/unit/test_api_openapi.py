"""The served OpenAPI document describes exactly what the app implements."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from keystore.api import create_app
from keystore.api.app import ROUTES
from keystore.api.openapi import document
from keystore.tokens import SCOPES


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document(ROUTES)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_route_of_the_app_is_documented_and_nothing_else(doc: dict[str, Any]) -> None:
    app = create_app(object(), max_body_bytes=1024, record_audit=lambda e: None)
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert served == documented


def test_each_operation_states_the_scope_the_app_enforces(doc: dict[str, Any]) -> None:
    for route in ROUTES:
        op = doc["paths"][route.path][route.method.lower()]
        assert op["x-required-scope"] == route.scope
        assert route.scope in SCOPES
        assert {"401", "403", "429", "500"} <= set(op["responses"])


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    for ref in _refs(doc):
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert node, ref


def test_every_schema_is_valid_json_schema(doc: dict[str, Any]) -> None:
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_the_document_is_a_valid_openapi_3_1_document(doc: dict[str, Any]) -> None:
    validate(doc)


def test_the_document_is_plain_json(doc: dict[str, Any]) -> None:
    assert json.loads(json.dumps(doc)) == doc
    assert doc["openapi"] == "3.1.0"
