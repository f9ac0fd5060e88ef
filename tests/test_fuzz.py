"""Schemathesis against the server's own OpenAPI schema, every route, over real HTTP: no 5xx, no crash.
(Driven through schemathesis' strategies and hypothesis directly: its pytest plugin does not run under pytest 9.)"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")

from .conftest import LEGACY_TOKEN  # noqa: E402

OPERATIONS = ["GET /", "GET /health", "GET /metrics", "POST /setup", "POST /predict", "POST /webhook", "GET /versions"]


@pytest.fixture
def api(start_backend, ls_host, image_dir):
    server = start_backend(label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN, local_files_document_root=image_dir)
    return server.url, schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_the_fuzzed_operations_are_all_the_routes(api):
    _, schema = api
    assert sorted(r.ok().label for r in schema.get_all_operations()) == sorted(OPERATIONS)


WITH_INPUT = ["GET /metrics", "POST /setup", "POST /predict", "POST /webhook"]  # the others have nothing to break


@pytest.mark.parametrize("label, mode", [(op, "positive") for op in OPERATIONS] + [(op, "negative") for op in WITH_INPUT])
def test_no_route_answers_a_server_error_to_generated_requests(api, label, mode):
    """Positive cases fit the schema; negative ones break it on purpose (wrong types, missing fields)."""
    url, schema = api
    method, path = label.split(" ", 1)

    @given(schema[path][method].as_strategy(schemathesis.GenerationMode(mode)))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case):
        response = case.call(base_url=url, timeout=30)
        assert response.status_code < 500, f"{label} -> {response.status_code}: {response.text[:300]}"

    fuzz()
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200, "the server is still up"
