"""The schema properties docs/scaling.md's Citus plan relies on, checked against the migrated PostgreSQL schema.

Citus cannot be installed on the development machine (no Debian package; see docs/scaling.md), so instead of
distributing the tables this test applies Citus's rules to our schema:

- a UNIQUE, PRIMARY KEY or EXCLUDE constraint of a distributed table must contain the distribution column
  (compared with `=` in an EXCLUDE);
- a foreign key between two distributed tables must pair their distribution columns;
- a table that is not distributed (reference or coordinator table) may not reference a distributed one;
- the tables distributed tables reference must be reference tables, and so must whatever those reference.

What breaks a rule is listed in docs/scaling.md between `<!-- begin:… -->` markers; the test fails when the schema
and the document disagree, so a new constraint or table cannot slip past the plan unnoticed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, text

import labcommons.models  # noqa: F401 - registers every table on the metadata
from labcommons.db import Base

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"

# The shard group: each table hashed on its column, all co-located, so one instrument's rows share a shard.
DISTRIBUTED = {
    "instrument": "id",
    "booking": "instrument_id",
    "booking_policy": "instrument_id",
    "booking_series": "instrument_id",
    "waitlist_entry": "instrument_id",
    "service_instrument": "instrument_id",
    "stat_instrument_day": "instrument_id",
    "stat_instrument_month": "instrument_id",
    "stat_dirty": "instrument_id",
}
# Tables that name an instrument but stay global, each for the reason given in docs/scaling.md: the instrument is
# optional (a category-wide qualification, a user's own calendar feed, a facility-wide rate) or the row is found
# by a secret without knowing the instrument (the kiosk token).
GLOBAL_WITH_INSTRUMENT = {"qualification", "calendar_feed", "rate", "instrument_token"}


@dataclass(frozen=True)
class ForeignKey:
    name: str
    table: str
    columns: tuple[str, ...]
    target: str
    target_columns: tuple[str, ...]


def doc_block(name: str) -> set[str]:
    """The back-quoted first cells of the table rows between `<!-- begin:name -->` and `<!-- end:name -->`."""
    body = DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- begin:{name} -->(.*?)<!-- end:{name} -->", body, re.DOTALL)
    assert match, f"docs/scaling.md has no block {name!r}"
    return set(re.findall(r"^\|\s*`([^`]+)`", match.group(1), re.MULTILINE))


@pytest.fixture(scope="module")
def pg(postgres_url: str) -> Iterator[Connection]:
    """A connection to the session's migrated PostgreSQL database."""
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        yield conn
    engine.dispose()


def unique_constraints(conn: Connection) -> list[tuple[str, str, list[str | None], list[str]]]:
    """(table, name, columns, operators) of every unique index and exclusion constraint in the public schema.

    An expression column has the name None; operators are those of an EXCLUDE, empty for a unique index."""
    rows = conn.execute(text("""
        SELECT t.relname, i.relname, x.indisunique, c.conexclop::oid[] AS ops,
               array(SELECT a.attname FROM unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                     LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                     ORDER BY k.ord) AS columns
        FROM pg_index x
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_class i ON i.oid = x.indexrelid
        LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.contype = 'x'
        WHERE t.relnamespace = 'public'::regnamespace AND (x.indisunique OR c.oid IS NOT NULL)
    """)).all()
    operators = {oid: name for oid, name in conn.execute(text("SELECT oid, oprname FROM pg_operator"))}
    return [(table, name, list(columns), [operators[o] for o in ops or []])
            for table, name, _unique, ops, columns in rows]


def foreign_keys(conn: Connection) -> list[ForeignKey]:
    """Every foreign key of the public schema with its column names in order."""
    rows = conn.execute(text("""
        SELECT c.conname, c.conrelid::regclass::text, c.confrelid::regclass::text,
               array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
               array(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o)
        FROM pg_constraint c
        WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
    """)).all()
    return [ForeignKey(name, table, tuple(cols), target, tuple(target_cols))
            for name, table, target, cols, target_cols in rows]


def rejected_by_citus(conn: Connection) -> set[str]:
    """Names of the constraints Citus would refuse once the DISTRIBUTED tables are distributed."""
    rejected = set()
    for table, name, columns, ops in unique_constraints(conn):
        column = DISTRIBUTED.get(table)
        if column is None:
            continue
        positions = [i for i, c in enumerate(columns) if c == column]
        if not positions or (ops and not any(ops[i] == "=" for i in positions)):
            rejected.add(name)
    for fk in foreign_keys(conn):
        if fk.target not in DISTRIBUTED:
            continue
        if fk.table not in DISTRIBUTED:
            rejected.add(fk.name)  # a reference or coordinator table cannot point into the shards
            continue
        pairs = set(zip(fk.columns, fk.target_columns, strict=True))
        if (DISTRIBUTED[fk.table], DISTRIBUTED[fk.target]) not in pairs:
            rejected.add(fk.name)
    return rejected


def required_reference_tables(conn: Connection) -> set[str]:
    """Global tables a distributed table references, closed over what those reference in turn."""
    keys = foreign_keys(conn)
    needed = {fk.target for fk in keys if fk.table in DISTRIBUTED and fk.target not in DISTRIBUTED}
    while True:
        more = {fk.target for fk in keys if fk.table in needed and fk.target not in DISTRIBUTED} - needed
        if not more:
            return needed
        needed |= more


def test_booking_exclusion_constraint_contains_the_distribution_column_with_equality(pg: Connection) -> None:
    constraints = {name: (columns, ops) for table, name, columns, ops in unique_constraints(pg)
                   if table == "booking" and ops}
    assert constraints == {"ex_booking_no_overlap": (["instrument_id", None], ["=", "&&"])}
    definition = pg.scalar(text("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                "WHERE conname = 'ex_booking_no_overlap'"))
    assert "tstzrange(starts_at, ends_at, '[)'" in definition
    # Only bookings that hold time exclude each other; the shard enforces exactly the same predicate.
    assert "'pending'" in definition and "'confirmed'" in definition and "'cancelled'" not in definition


def test_distribution_columns_exist_and_are_never_null(pg: Connection) -> None:
    # Citus refuses a NULL distribution value, so each distribution column must be NOT NULL already.
    rows = pg.execute(text("""
        SELECT table_name, column_name, is_nullable FROM information_schema.columns
        WHERE table_schema = 'public'
    """)).all()
    nullable = {(t, c): n == "YES" for t, c, n in rows}
    for table, column in DISTRIBUTED.items():
        assert (table, column) in nullable, f"{table}.{column} is missing"
        assert not nullable[(table, column)], f"{table}.{column} is nullable"


def test_every_table_naming_an_instrument_is_placed_by_the_plan() -> None:
    with_instrument = {t.name for t in Base.metadata.tables.values() if "instrument_id" in t.c}
    unplaced = with_instrument - set(DISTRIBUTED) - GLOBAL_WITH_INSTRUMENT
    assert not unplaced, f"place these tables in docs/scaling.md and in this test: {sorted(unplaced)}"
    assert with_instrument >= set(DISTRIBUTED) - {"instrument"}
    assert with_instrument >= GLOBAL_WITH_INSTRUMENT
    # The global ones really are the optional-instrument or found-by-secret kind the document describes.
    optional = {t for t in GLOBAL_WITH_INSTRUMENT if Base.metadata.tables[t].c.instrument_id.nullable}
    assert optional == {"qualification", "calendar_feed", "rate"}


def test_the_document_lists_the_plan(pg: Connection) -> None:
    assert doc_block("distributed") == set(DISTRIBUTED)
    assert doc_block("reference") == required_reference_tables(pg)


def test_the_document_lists_every_constraint_citus_would_reject(pg: Connection) -> None:
    found = rejected_by_citus(pg)
    documented = doc_block("rejected")
    assert found == documented, (
        f"not in docs/scaling.md: {sorted(found - documented)}; listed there but gone: {sorted(documented - found)}"
    )
