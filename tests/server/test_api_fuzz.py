"""Every route the app declares, fuzzed from its own OpenAPI description by schemathesis under
each kind of credential (none, viewer, operator, admin, a device session): no answer is a 5xx,
and an answer whose status the app describes matches the schema it declares for it.

The schema is ``app.openapi()`` itself, not ``/openapi.json``, so the run does not depend on the
document being served. The requests go through the Harness's client (in process, SQLite or
PostgreSQL like the rest of tests/server); examples are bounded and derandomized. Path
parameters are generated, and half the time name a device, release and blob that exist.

The description declares no request bodies (the routes parse their JSON themselves, to answer
any malformed body with one inert error): the bodies are fuzzed by tests/server/test_fuzz.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.server.conftest import FakeDevice, Harness

MakeBundle = Callable[..., Path]

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
EXAMPLES_PER_ROUTE = 15
FUZZ = settings(
    max_examples=EXAMPLES_PER_ROUTE,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)
CREDENTIALS = ["none", "viewer", "operator", "admin", "device"]


def operations(harness: Harness) -> list[Any]:
    schema = schemathesis.openapi.from_dict(harness.app.openapi())
    found = [result.ok() for result in schema.get_all_operations()]
    assert found, "the app declares no route"
    return found


def credential(
    kind: str, harness: Harness, enrolled: Callable[..., FakeDevice]
) -> tuple[dict[str, str], FakeDevice]:
    """The Authorization header of ``kind``, and an enrolled device (the caller itself for
    ``device``)."""
    device = enrolled()
    if kind == "none":
        return {}, device
    if kind == "device":
        return device.headers, device
    return harness.headers[kind], device


@pytest.mark.parametrize("kind", CREDENTIALS)
def test_no_route_answers_5xx_or_off_schema(
    harness: Harness, enrolled: Callable[..., FakeDevice], make_bundle: MakeBundle, kind: str
) -> None:
    headers, device = credential(kind, harness, enrolled)
    release = harness.upload(make_bundle(size=3000))
    assert release.status_code == 201, release.text
    # path parameters naming things that exist, so half the examples get past "not found"
    known = {
        "device_id": device.id,
        "version": release.json()["version"],
        "sha256": release.json()["images"][0]["url"].rsplit("/", 1)[1],
    }
    fuzzed = []
    for operation in operations(harness):
        strategy = operation.as_strategy()
        names = {p.name for p in operation.path_parameters}
        if names & set(known):
            fixed = {name: known[name] for name in names & set(known)}
            strategy = strategy | operation.as_strategy(path_parameters=fixed)
        fuzz_operation(harness, headers, strategy)
        fuzzed.append(operation.label)
    # the description leaves no route of the app out of the run
    assert sorted(fuzzed) == sorted(api_routes(harness.app.routes))


def api_routes(routes: list[Any], prefix: str = "") -> list[str]:
    """Each API route as "METHOD /path", walking into the included routers; the web console's
    pages (under /ui, HTML for browsers, left out of the API's description) are not API routes."""
    found = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            context = getattr(route, "include_context", None)
            found += api_routes(included.routes, prefix + getattr(context, "prefix", ""))
        elif isinstance(route, APIRoute):  # hidden from the description or not
            path = prefix + route.path
            if path == "/ui" or path.startswith("/ui/"):
                continue
            found += [f"{method} {path}" for method in route.methods]
    return found


def fuzz_operation(harness: Harness, headers: dict[str, str], strategy: Any) -> None:
    @FUZZ
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        kwargs = case.as_transport_kwargs(headers=headers)
        response = harness.client.request(
            kwargs["method"],
            kwargs["url"].removeprefix("http://localhost"),
            params=kwargs.get("params"),
            headers=kwargs.get("headers"),
            content=kwargs.get("data") or kwargs.get("content"),
            json=kwargs.get("json"),
        )
        case.validate_response(response, checks=CHECKS)

    fuzz()
