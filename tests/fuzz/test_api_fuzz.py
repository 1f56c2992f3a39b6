"""Schemathesis against the whole API on SQLite and PostgreSQL: no 5xx, no answer the OpenAPI schema does not
describe (status, media type, headers, body), invalid input always refused with a 4xx; stateful sequences along
the schema's links. LABCOMMONS_FUZZ_CASES sets how many cases each database gets (`make test-fuzz`: 5,000)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from labcommons.matching import embeddings
from tests.factories import World
from tests.fuzz import seed
from tests.fuzz.harness import BOUNDARY_SHARE, DEFAULT_CASES, STATEFUL_SHARE, Fuzzer, app_lifespans, target_cases

pytestmark = pytest.mark.fuzz

# The create -> read/change flows the stateful run follows by the schema's own links (beside the ones schemathesis
# infers); a renamed operation must fail the test, not silently drop a flow.
LINKED_FLOWS = {
    ("POST /api/v1/bookings", "GET /api/v1/bookings/{booking_id}"),
    ("POST /api/v1/bookings", "POST /api/v1/bookings/{booking_id}/cancel"),
    ("POST /api/v1/bookings/series", "POST /api/v1/bookings/series/{series_id}/cancel"),
    ("POST /api/v1/orders", "GET /api/v1/orders/{order_id}"),
    ("POST /api/v1/orders", "POST /api/v1/orders/{order_id}/transitions"),
    ("POST /api/v1/orders", "POST /api/v1/orders/{order_id}/quotes"),
    ("POST /api/v1/orders/{order_id}/quotes", "POST /api/v1/orders/{order_id}/quotes/{quote_id}/accept"),
    ("POST /api/v1/billing/accounts", "GET /api/v1/billing/accounts/{account_id}"),
    ("POST /api/v1/demands", "GET /api/v1/demands/{demand_id}"),
}


@pytest.fixture
def fuzzer(world: World) -> Iterator[Fuzzer]:
    # Semantic ranking loads a model (half a minute per process); the sample ranks demands by keywords only.
    embeddings.simulate_missing(None if target_cases() > DEFAULT_CASES else "off while fuzzing a sample")
    try:
        seed.add_people(world)
        with app_lifespans():
            fuzzer = Fuzzer.over(world)
            fuzzer.add_seed_calls(seed.seed(world, TestClient(fuzzer.app, raise_server_exceptions=False)))
            fuzzer.refresh_rows()
            yield fuzzer
    finally:
        embeddings.simulate_missing(None)


def test_fuzz_every_operation(fuzzer: Fuzzer, capsys: pytest.CaptureFixture[str]) -> None:
    assert not LINKED_FLOWS - fuzzer.linked_flows(), "flows without a link in the schema"
    target = target_cases()
    fuzzer.run_sequences(int(target * STATEFUL_SHARE))
    if target > DEFAULT_CASES:
        # Generating an operation's boundary cases takes longer than sending a few; the sample skips them.
        fuzzer.run_boundaries(int(target * BOUNDARY_SHARE))
    fuzzer.run_operations(target - fuzzer.total)
    with capsys.disabled():
        print(f"\n{fuzzer.summary()}")
        if os.environ.get("LABCOMMONS_FUZZ_VERBOSE"):
            print("never answered 2xx:\n  " + "\n  ".join(fuzzer.never_succeeded()))
    assert fuzzer.total >= target, fuzzer.summary()
    assert not fuzzer.findings, fuzzer.report()

