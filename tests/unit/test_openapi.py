"""The OpenAPI document names every route the API serves, every status the checks around
each one can answer, and the bounds the settings set. (That the server keeps what it
says is tests/e2e/test_openapi_conformance.py.)"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import schemathesis

from config.settings import Settings
from orders.api import create_app
from orders.api.openapi import openapi_document

SETTINGS = Settings(env="test")
OPEN = {"/healthz", "/readyz", "/metrics", "/openapi.json"}


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in doc["paths"].items()
        for method, operation in item.items()
    }


def test_every_route_the_app_serves_is_documented_and_nothing_else() -> None:
    # The ports are only called by requests: none is sent here.
    ports: Any = {
        name: object() for name in ("starter", "timeline", "operations", "canceller", "refunds")
    }
    app = create_app(SETTINGS, **ports)
    served = {
        (method, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    assert served == set(_operations(openapi_document(SETTINGS)))


def test_every_operation_lists_the_statuses_of_its_checks() -> None:
    for (method, path), operation in _operations(openapi_document(SETTINGS)).items():
        statuses = set(operation["responses"])
        assert any(code.startswith("2") for code in statuses), (method, path)
        if path in OPEN:
            assert operation["security"] == []
            continue
        assert {"401", "429", "503"} <= statuses, (method, path)
        assert operation["responses"]["429"]["headers"]["Retry-After"]["required"]
        assert operation["responses"]["503"]["headers"]["Retry-After"]["required"]
        operator = path.startswith(("/admin", "/batches"))
        assert ("403" in statuses) == operator, (method, path)
        assert operation.get("security", [{"bearer": []}]) == (
            [{"operator": []}] if operator else [{"bearer": []}]
        )
        if "{" in path:
            assert "404" in statuses, (method, path)
        if "requestBody" in operation:
            assert {"400", "413", "415", "422"} <= statuses, (method, path)


def test_the_bounds_that_are_settings_come_from_the_settings() -> None:
    doc = openapi_document(replace(SETTINGS, max_order_lines=7, max_line_quantity=9))
    schemas = doc["components"]["schemas"]
    assert schemas["OrderIn"]["properties"]["lines"] == {
        "items": {"$ref": "#/components/schemas/LineIn"},
        "maxItems": 7,
        "minItems": 1,
        "title": "Lines",
        "type": "array",
    }
    assert schemas["LineIn"]["properties"]["quantity"]["maximum"] == 9
    assert "at most 7 lines of at most 9 each" in doc["paths"]["/orders"]["post"]["description"]


def test_the_query_and_header_bounds_are_documented() -> None:
    parameters = {
        (path, parameter["name"]): parameter["schema"]
        for path, item in openapi_document(SETTINGS)["paths"].items()
        for operation in item.values()
        for parameter in operation.get("parameters", [])
    }
    assert parameters["/customers/{customer_id}/orders", "limit"]["maximum"] == 100
    assert parameters["/admin/dead-letters", "limit"]["maximum"] == 1000
    assert parameters["/orders", "Idempotency-Key"]["maxLength"] == 255
    ids = re.compile(parameters["/orders/status", "ids"]["pattern"])
    one = "0b7c5a9e-4a4f-4f0e-9d3b-2f8f1c1e6a10"
    assert ids.fullmatch(",".join([one] * 100))
    assert not ids.fullmatch(",".join([one] * 101))
    assert not ids.fullmatch(f"{one},")


def test_the_document_loads_as_openapi() -> None:
    schema = schemathesis.openapi.from_dict(openapi_document(SETTINGS))
    loaded = [result.ok() for result in schema.get_all_operations()]
    assert len(loaded) == len(_operations(openapi_document(SETTINGS)))
