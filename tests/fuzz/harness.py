"""Schemathesis over the whole API in process: generated requests (valid and invalid) for every operation, and
stateful sequences along the OpenAPI links, checked for 5xx and for answers that the schema does not describe.

Every case is counted; failures are collected (not raised at the first one, and not shrunk) so one run reports
everything it found, each with a curl command that reproduces it.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky, Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.transport import Response
from schemathesis.engine.errors import is_inconsistent_replay
from schemathesis.generation.stateful.state_machine import StepOutput
from schemathesis.python import asgi
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from labcommons.app import create_app
from labcommons.config import get_settings
from labcommons.db import Base
from labcommons.errors import DomainError, NotFound
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.factories import World
from tests.fuzz.seed import Call

CASES_ENV = "LABCOMMONS_FUZZ_CASES"
# The sample `make test` runs on each database (about half a minute each on an idle machine); `make test-fuzz` asks
# for 5,000.
DEFAULT_CASES = 600
# Shares of the cases spent on stateful sequences along the links and, in long runs, on boundary values (the rest
# go to generated single requests).
STATEFUL_SHARE = 0.15
BOUNDARY_SHARE = 0.3
STEPS_PER_SEQUENCE = 6
MAX_STATEFUL_RUNS = 50
# Slowness is not what this suite judges (no timed assertions), and a busy test machine can take seconds.
TIMEOUT_SECONDS = 300

# What every answer must satisfy. Not positive_data_acceptance: our business rules (a booking on the slot grid,
# a period that exists, a state that allows the step) answer schema-valid requests with 422 by design (GUIDE:
# "422 for invalid input"), which that check counts as a failure; it is no statement about the schema.
CHECKS: tuple[CheckFunction, ...] = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
)

# Who calls: mostly a platform administrator (every rule lets them further in), then plain users (their own rows,
# refusals of others'), then nobody (401 everywhere a token is needed).
CALLERS: tuple[str | None, ...] = ("root",) * 5 + ("alice", "alice", "bob", "dave", None)

# Path, query and top-level body parameters that name rows: filled with ids of real rows in most valid cases,
# since random integers almost never hit one. Values: the table and its column.
ROW_PARAMETERS: dict[str, tuple[str, str]] = {
    "instrument_id": ("instrument", "id"),
    "service_id": ("service", "id"),
    "booking_id": ("booking", "id"),
    "series_id": ("booking_series", "id"),
    "entry_id": ("waitlist_entry", "id"),
    "qualification_id": ("qualification", "id"),
    "order_id": ("service_order", "id"),
    "quote_id": ("quote", "id"),
    "sample_id": ("sample", "id"),
    "code": ("sample", "code"),
    "file_id": ("result_file", "id"),
    "entitlement_id": ("talent_entitlement", "id"),
    "card_id": ("talent_card", "id"),
    "invoice_id": ("invoice", "id"),
    "account_id": ("billing_account", "id"),
    "member_id": ("account_member", "id"),
    "voucher_id": ("voucher", "id"),
    "charge_id": ("charge", "id"),
    "demand_id": ("demand", "id"),
    "offer_id": ("demand_offer", "id"),
    "expert_id": ("expert", "id"),
    "facility_id": ("facility", "id"),
    "institution_id": ("institution", "id"),
    "token_id": ("api_token", "id"),
    "block_id": ("booking", "id"),
    "owner_id": ("user_account", "id"),
    "user_id": ("user_account", "id"),
}
# Pairs of path parameters that must belong together to reach past the first lookup: (table, its columns by name).
ROW_PAIRS: dict[frozenset[str], tuple[str, dict[str, str]]] = {
    frozenset({"order_id", "quote_id"}): ("quote", {"order_id": "order_id", "quote_id": "id"}),
    frozenset({"order_id", "file_id"}): ("result_file", {"order_id": "order_id", "file_id": "id"}),
    frozenset({"instrument_id", "block_id"}): ("booking", {"instrument_id": "instrument_id", "block_id": "id"}),
}
HIT_REAL_ROWS = 0.8  # the share of valid cases whose row parameters name real rows
# The share of valid cases of an operation the seed called that start from one of the seed's requests, with some
# fields generated: random bodies rarely pass the rules (a booking on the slot grid, a quote of an order that waits
# for one), so these reach the code behind them.
FROM_SEED = 0.4
FROM_SEED_FIELDS = 0.3  # the share of a seed request's fields replaced by generated ones
# Integers far outside any id or amount range, put into some valid cases: the schema allows them where it sets no
# bound, and the answer must still be a 4xx (a number the database driver cannot bind is a 500).
EXTREMES = (2**31, 2**63, 2**70, -(2**31) - 1, -(2**63) - 1)
EXTREME_SHARE = 0.1


def target_cases() -> int:
    """How many cases a run must execute: LABCOMMONS_FUZZ_CASES, else the sample's size."""
    raw = os.environ.get(CASES_ENV, "").strip()
    return int(raw) if raw else DEFAULT_CASES


@dataclass
class Finding:
    """One kind of failure: where, what, how often, and the first report of it (with a curl command)."""

    operation: str
    kind: str
    status: int | None
    count: int = 0
    report: str = ""


@dataclass(frozen=True)
class Start:
    """A seed request of one operation: its path parameters, query and body."""

    path: dict[str, Any]
    query: dict[str, Any]
    body: Any


@dataclass
class Fuzzer:
    """The app under test over a seeded world, its schema, and what the run did and found."""

    world: World
    app: FastAPI
    schema: Any
    rows: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    seeds: dict[str, list[Start]] = field(default_factory=dict)  # operation -> requests the seed made
    pairs: dict[frozenset[str], list[dict[str, Any]]] = field(default_factory=dict)
    cases: dict[str, int] = field(default_factory=dict)
    findings: dict[tuple[str, str, int | None], Finding] = field(default_factory=dict)
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)  # (operation, status) -> how many
    random: random.Random = field(default_factory=lambda: random.Random(20261124))
    emails: dict[str, str] = field(default_factory=dict)  # callers whose account a deletion replaced

    @classmethod
    def over(cls, world: World) -> Fuzzer:
        """A fuzzer of a fresh app over `world`."""
        # No write rate limit: one token sending thousands of generated writes a minute would meet 429 after the
        # first few hundred and test nothing else (the limit has its own tests).
        app = create_app(get_settings().model_copy(update={"write_rate_per_minute": 0}), db=world.db)
        schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app, timeout=TIMEOUT_SECONDS)
        fuzzer = cls(world=world, app=app, schema=schema)
        fuzzer.refresh_rows()
        return fuzzer

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    # --- the rows that parameters should name -----------------------------------------------------------------

    def refresh_rows(self) -> None:
        """Read the ids (newest first) that row parameters pick from; the run keeps adding rows."""
        tables = Base.metadata.tables
        with self.world.db.unit_of_work(write=False) as s:
            for table, column in set(ROW_PARAMETERS.values()):
                col = tables[table].c[column]
                self.rows[(table, column)] = list(s.scalars(select(col).order_by(tables[table].c.id.desc())
                                                            .limit(60)))
            for names, (table, columns) in ROW_PAIRS.items():
                t = tables[table]
                query = select(*(t.c[c].label(n) for n, c in columns.items())).order_by(t.c.id.desc()).limit(60)
                self.pairs[names] = [dict(r._mapping) for r in s.execute(query)]

    def add_seed_calls(self, calls: list[Call]) -> None:
        """Remember the seed's requests by operation, as starting points of valid cases."""
        for operation in self.operations():
            pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+?)", re.escape(operation.path))
            for call in calls:
                match = re.fullmatch(pattern, call.path)
                if call.method == operation.method.upper() and match:
                    path = {k: int(v) if v.isdigit() else v for k, v in match.groupdict().items()}
                    self.seeds.setdefault(operation.label, []).append(Start(path, call.query, call.body))

    def _from_seed(self, case: Case, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bool:
        """Make a valid case a seed request with some generated fields; False when the operation has none."""
        starts = self.seeds.get(case.operation.label)
        if not starts or draw(st.floats(0, 1)) >= FROM_SEED:
            return False
        start = draw(st.sampled_from(starts))
        if case.path_parameters:
            case.path_parameters = dict(start.path)
        if start.query or case.query:
            case.query = self._mix(start.query, case.query or {}, draw)
        if isinstance(start.body, dict) and isinstance(case.body, dict):
            case.body = self._mix(start.body, case.body, draw)
        return True

    @staticmethod
    def _mix(known: dict[str, Any], generated: dict[str, Any], draw: Callable[[st.SearchStrategy[Any]], Any]
             ) -> dict[str, Any]:
        mixed = dict(known)
        for name, value in generated.items():
            if draw(st.floats(0, 1)) < FROM_SEED_FIELDS:
                mixed[name] = value
        return mixed

    def _steer(self, case: Case, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        """Start a valid case from a seed request, or point its row parameters at real rows (most of the time), or
        put extreme integers in."""
        if self._from_seed(case, draw):
            return
        path = case.path_parameters
        containers = [c for c in (path, case.query) if c]
        if isinstance(case.body, dict):
            containers.append(case.body)
        if draw(st.floats(0, 1)) < EXTREME_SHARE:
            for container in containers:
                for name, value in list(container.items()):
                    if isinstance(value, int) and not isinstance(value, bool):
                        container[name] = draw(st.sampled_from(EXTREMES))
            return
        if path:
            for names, rows in self.pairs.items():
                if names <= path.keys() and rows and draw(st.floats(0, 1)) < HIT_REAL_ROWS:
                    path.update(draw(st.sampled_from(rows)))
        for container in containers:
            for name in list(container):
                spec = ROW_PARAMETERS.get(name)
                values = self.rows.get(spec) if spec else None
                if values and draw(st.floats(0, 1)) < HIT_REAL_ROWS:
                    container[name] = draw(st.sampled_from(values))

    # --- callers --------------------------------------------------------------------------------------------

    def headers(self, caller: str | None) -> dict[str, str]:
        return self.world.headers(caller) if caller else {}

    def keep_callers_signed_in(self) -> None:
        """Give back a token to a caller whose token a fuzzed call revoked, and a new account to one whose account
        a fuzzed call deleted (the privacy API), so the rest of the run is not all 401."""
        with self.world.db.unit_of_work() as s:
            for name in {c for c in CALLERS if c}:
                try:
                    identity.authenticate_token(s, self.world.tokens[name])
                    continue
                except DomainError:  # revoked, or its account deleted: make a working one
                    pass
                try:
                    user = identity.find_user(s, self.emails.get(name, f"{name}@example.org"))
                except NotFound:  # pseudonymised by a deletion
                    user = self._replacement_user(s, name)
                self.world.tokens[name] = identity.create_api_token(s, user, name="fuzz")

    def _replacement_user(self, s: Any, name: str) -> Any:
        email = f"{name}.{self.random.randrange(10**9)}@example.org"
        self.emails[name] = email
        institution = "CQ-CO" if name == "dave" else ("CQ-UNI" if name == "bob" else "CQ-LAB")
        user = identity.create_user(s, email=email, name=name.title(), institution_code=institution,
                                    password="correct horse")
        if name == "root":
            roles.grant_role(s, None, user, roles.Role.platform_admin)
        return user

    # --- running cases --------------------------------------------------------------------------------------

    def send(self, case: Case, caller: str | None, *, label: str) -> Response | None:
        """Send one case as `caller`, check the answer, record what fails; the answer, unless the app raised."""
        self.cases[label] = self.cases.get(label, 0) + 1
        headers = self.headers(caller)
        try:
            response = case.call(headers=headers, timeout=TIMEOUT_SECONDS)
        except Exception as exc:  # the app raised through the ASGI transport: a 500 with a traceback
            self._record(case.operation.label, f"unhandled {type(exc).__name__}: {exc}", 500,
                         "".join(traceback.format_exception(exc)[-12:]))
            return None
        self.answers[(case.operation.label, response.status_code)] += 1
        try:
            case.validate_response(response, checks=list(CHECKS), headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                self._record(case.operation.label, getattr(failure, "title", type(failure).__name__),
                             response.status_code, str(group))
        if case.method != "GET" and case.path.startswith("/api/v1/me") and response.status_code < 300:
            self.keep_callers_signed_in()
        return response

    def _record(self, operation: str, kind: str, status: int | None, report: str) -> None:
        finding = self.findings.setdefault((operation, kind, status), Finding(operation, kind, status))
        finding.count += 1
        if not finding.report:
            finding.report = report[:4000]

    def operations(self) -> list[APIOperation]:
        return [result.ok() for result in self.schema.get_all_operations()]

    def run_operation(self, operation: APIOperation, mode: GenerationMode, budget: int) -> int:
        """Up to `budget` generated cases of one operation in one mode; how many ran (fewer when Hypothesis runs
        out of distinct inputs, e.g. an operation without parameters)."""
        before = self.cases.get("single", 0)
        strategy = operation.as_strategy(generation_mode=mode)

        @settings(max_examples=budget, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=False, print_blob=False)
        @given(case=strategy, caller=st.sampled_from(CALLERS), data=st.data())
        def run(case: Case, caller: str | None, data: st.DataObject) -> None:
            if mode is GenerationMode.POSITIVE:
                self._steer(case, data.draw)
            self.send(case, caller, label="single")

        with contextlib.suppress(Unsatisfiable):  # nothing invalid can be made of an operation without inputs
            run()
        return self.cases.get("single", 0) - before

    def run_boundaries(self, target: int) -> None:
        """About `target` of schemathesis' deterministic boundary cases (coverage phase: smallest and largest
        values and lengths, each required field missing, wrong types, unexpected properties and methods), spread
        evenly over the operations and over each operation's list."""
        operations = self.operations()
        per_operation = max(1, math.ceil(target / len(operations)))
        for i, operation in enumerate(operations):
            if i % 25 == 0:
                self.refresh_rows()
            config = self.schema.config.generation_for(operation=operation)
            cases = list(self.schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                                         generation_config=config))
            step = max(1, len(cases) / per_operation)
            for case in (cases[int(k * step)] for k in range(min(per_operation, len(cases)))):
                self.send(case, self.random.choice(CALLERS), label="boundary")

    def run_operations(self, target: int) -> None:
        """Spread `target` cases over every operation, valid and invalid inputs, round after round, until that many
        ran or every operation ran out of distinct inputs."""
        slots = [(op, mode) for op in self.operations() for mode in GenerationMode]
        goal = self.total + target
        while slots and self.total < goal:
            per_slot = max(1, math.ceil((goal - self.total) / len(slots)))
            still = []
            for i, (op, mode) in enumerate(slots):
                if i % 25 == 0:
                    self.refresh_rows()
                if self.run_operation(op, mode, per_slot) >= per_slot:
                    still.append((op, mode))
            slots = still

    def linked_flows(self) -> set[tuple[str, str]]:
        """(source, target) operations of the links the schema itself declares."""
        transitions = self.schema.as_state_machine()._transitions.operations
        return {(source, link.target.label) for source, node in transitions.items() for link in node.outgoing
                if not link.is_inferred}

    def run_sequences(self, target: int) -> None:
        """About `target` calls in sequences that follow the OpenAPI links (create, then read, change, cancel what
        was created), each sequence as one caller."""
        fuzzer = self
        base = self.schema.as_state_machine()

        class Sequences(base):  # type: ignore[misc, valid-type]
            def setup(self) -> None:
                self.caller = fuzzer.random.choice(("root", "root", "alice", "bob"))

            def step(self, input: Any) -> StepOutput | None:
                response = fuzzer.send(input.case, self.caller, label="sequence")
                if response is not None:
                    self.after_call(response, input.case)
                return StepOutput(response, input.case) if response is not None else None

        goal = self.cases.get("sequence", 0) + target
        for _attempt in range(MAX_STATEFUL_RUNS):
            left = goal - self.cases.get("sequence", 0)
            if left <= 0:
                return
            try:
                Sequences.run(settings=settings(
                    max_examples=max(1, math.ceil(left / STEPS_PER_SEQUENCE)), stateful_step_count=STEPS_PER_SEQUENCE,
                    database=None, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck),
                    print_blob=False))
            except Exception as exc:
                # The sequences run against a database that every step changes, so Hypothesis may find that the
                # same choices led elsewhere the second time; like schemathesis' own runner, start again.
                if not (isinstance(exc, Flaky) or is_inconsistent_replay(exc)):
                    raise

    # --- reporting ----------------------------------------------------------------------------------------------

    def report(self) -> str:
        lines = [f"{len(self.findings)} kind(s) of failure in {self.total} cases:"]
        for finding in sorted(self.findings.values(), key=lambda f: (f.operation, f.kind)):
            lines.append(f"\n=== {finding.operation}: {finding.kind} [{finding.status}] x{finding.count}\n"
                         f"{finding.report}")
        return "\n".join(lines)

    def summary(self) -> str:
        parts = ", ".join(f"{n} {label}" for label, n in sorted(self.cases.items()))
        by_class: Counter[str] = Counter()
        for (_operation, status), n in self.answers.items():
            by_class[f"{status // 100}xx"] += n
        answered = ", ".join(f"{n} {cls}" for cls, n in sorted(by_class.items()))
        succeeded = {op for (op, status) in self.answers if status < 300}
        return (f"API fuzzing on {self.world.db.engine.dialect.name}: {self.total} cases ({parts}); answers: "
                f"{answered}; {len(succeeded)} of {len(self.operations())} operations answered 2xx at least once; "
                f"{sum(f.count for f in self.findings.values())} failing")

    def never_succeeded(self) -> list[str]:
        """Operations no case got a 2xx from (where the run did not get past validation or the rules)."""
        succeeded = {op for (op, status) in self.answers if status < 300}
        return sorted(op.label for op in self.operations() if op.label not in succeeded)


@contextmanager
def app_lifespans() -> Iterator[None]:
    """Schemathesis starts each app's lifespan on first use and keeps it for the process: stop them after a run."""
    try:
        yield
    finally:
        asgi.shutdown_lifespans()
