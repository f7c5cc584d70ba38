"""The OpenAPI schema fuzzed with schemathesis: whatever it sends, the server never answers 5xx, and every
response conforms to the schema (schemathesis' checks: documented status codes, content types, headers,
response bodies, negative data rejected).

Excluded: positive_data_acceptance, which expects every schema-valid request to succeed. A body that is
schema-valid here is "any bytes" (format: binary) or an inference request whose shapes and data do not
agree; whether the bytes are a latent the model decodes is beyond what OpenAPI can say, so the server's
422/400/413 for them are the documented answers, not conformance failures.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from .conftest import live_server  # noqa: E402


@pytest.fixture(scope="module")
def api_schema():
    # Its own server: the fuzzer's requests must not disturb the shared server's metrics assertions.
    with live_server(max_output_pixels=256 * 256, max_request_latents=2) as live:
        yield schemathesis.openapi.from_url(f"{live.url}/openapi.json")


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


# schemathesis' pytest plugin does not run under pytest 9, so the test drives its hypothesis strategies.
def test_no_server_errors_and_every_response_conforms(api_schema) -> None:
    operations = _operations(api_schema)
    assert {op.path for op in operations} >= {"/v1/decode", "/v2/models/{name}/infer", "/v1/models"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case) -> None:
            response = case.call_and_validate(timeout=30, excluded_checks=[positive_data_acceptance])
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:300]}"

        check()
