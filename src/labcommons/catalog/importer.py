"""Bulk import of instruments from CSV or XLSX: upsert by code, one savepoint per row, commits in batches.

Unlike the other services this module owns its transactions: a 100k-row file must not be one transaction,
and good rows must land while bad ones are reported.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import String, select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from labcommons.catalog.models import Category, Facility, Institution, Instrument, InstrumentStatus, OpenTo
from labcommons.catalog.service import place_instrument
from labcommons.db import Database
from labcommons.errors import InvalidInput

BATCH_ROWS = 500

COLUMNS = (
    "code", "facility", "name_zh", "name_en", "description_zh", "description_en", "manufacturer", "model",
    "category", "location_zh", "location_en", "status", "slot_minutes", "min_booking_minutes",
    "max_booking_minutes", "open_to",
)
REQUIRED_COLUMNS = ("code", "facility", "category")
INTEGER_COLUMNS = ("slot_minutes", "min_booking_minutes", "max_booking_minutes")
# What a blank cell (or, for a new instrument, an absent column) means.
DEFAULTS: dict[str, Any] = {
    "description_zh": "", "description_en": "", "manufacturer": "", "model": "", "location_zh": "",
    "location_en": "", "status": InstrumentStatus.active, "slot_minutes": 30, "min_booking_minutes": 30,
    "max_booking_minutes": 480, "open_to": OpenTo.everyone,
}
# Column name -> Instrument attribute, where they differ.
ATTRIBUTE = {"facility": "facility_id", "category": "category_code"}
_INTEGER = re.compile(r"[+-]?\d+")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RowError:
    """A rejected row: `line` as the spreadsheet shows it (the header is line 1)."""

    line: int
    field: str | None
    message: str


@dataclass
class ImportReport:
    created: int = 0
    updated: int = 0
    errors: list[RowError] = field(default_factory=list)


@dataclass
class _Source:
    rows: Iterator[Sequence[Any]]  # header first
    total: int  # data rows expected after the header, for progress only


# ---------------------------------------------------------------------------------------------------------
# Reading files


def _is_xlsx(path: Path) -> bool:
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        return True
    with path.open("rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


@contextmanager
def _open_source(path: Path) -> Iterator[_Source]:
    if path.suffix.lower() == ".xls":
        raise InvalidInput("Old .xls workbooks are not supported; save the sheet as .xlsx or CSV.",
                           field="file")
    if _is_xlsx(path):
        with _open_xlsx(path) as source:
            yield source
    else:
        encoding, records = _csv_encoding_and_records(path)
        with path.open(encoding=encoding, newline="") as fh:
            yield _Source(rows=csv.reader(fh), total=max(records - 1, 0))


def _csv_encoding_and_records(path: Path) -> tuple[str, int]:
    """Find the encoding (UTF-8 with or without BOM, else GB18030) in one streaming pass that counts records.

    The pass also finds malformed CSV before anything is written.
    """
    for encoding in ("utf-8-sig", "gb18030"):
        reader = None
        try:
            with path.open(encoding=encoding, newline="") as fh:
                reader = csv.reader(fh)
                records = sum(1 for _ in reader)
            return encoding, records
        except UnicodeDecodeError:
            continue
        except csv.Error as exc:
            line = reader.line_num if reader is not None else 0
            raise InvalidInput(f"The CSV file is malformed near line {line}: {exc}.", field="file") from exc
    raise InvalidInput("The file is neither UTF-8 nor GB18030 text.", field="file")


@contextmanager
def _open_xlsx(path: Path) -> Iterator[_Source]:
    import openpyxl

    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile, XML and KeyError failures for damaged files alike
        raise InvalidInput(f"The workbook cannot be read: {exc}.", field="file") from exc
    try:
        if not workbook.worksheets:
            raise InvalidInput("The workbook has no worksheet.", field="file")
        sheet = workbook.worksheets[0]
        total = max((sheet.max_row or 1) - 1, 0)
        # Some writers store a wrong dimension (e.g. A1:A1); without it openpyxl reads every row and cell.
        sheet.reset_dimensions()
        yield _Source(rows=sheet.iter_rows(values_only=True), total=total)
    finally:
        workbook.close()


# ---------------------------------------------------------------------------------------------------------
# Header and cells


def _header(cells: Sequence[Any]) -> list[str | None]:
    """Column name per position (None for a blank header cell); InvalidInput(field='header') if unusable."""
    names: list[str | None] = []
    for cell in cells:
        name = _text(cell).lstrip("\ufeff").strip().lower()
        names.append(name or None)
    unknown = [n for n in names if n is not None and n not in COLUMNS]
    if unknown:
        raise InvalidInput(
            f"Unknown column(s): {', '.join(unknown)}. Known columns: {', '.join(COLUMNS)}.", field="header",
            code="unknown_column",
        )
    present = [n for n in names if n is not None]
    repeated = sorted({n for n in present if present.count(n) > 1})
    if repeated:
        raise InvalidInput(f"Column(s) given twice: {', '.join(repeated)}.", field="header",
                           code="duplicate_column")
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if "name_zh" not in present and "name_en" not in present:
        missing.append("name_zh or name_en")
    if missing:
        raise InvalidInput(f"Missing column(s): {', '.join(missing)}.", field="header", code="missing_column")
    return names


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _integer(value: Any, column: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = _text(value)
    if not _INTEGER.fullmatch(text):
        raise InvalidInput(f"{column} must be a whole number of minutes, not {text!r}.", field=column)
    return int(text)


def _cells(header: list[str | None], row: Sequence[Any]) -> dict[str, Any]:
    """The row's cells by column name; a value under no header is an error rather than silently dropped."""
    cells: dict[str, Any] = {}
    for index, value in enumerate(row):
        name = header[index] if index < len(header) else None
        if name is None:
            if _text(value):
                raise InvalidInput(f"Column {index + 1} holds a value but has no header.", field=None)
            continue
        cells[name] = value
    return cells


def _is_blank(row: Sequence[Any]) -> bool:
    return all(not _text(value) for value in row)


def parse_row(cells: dict[str, Any]) -> dict[str, Any]:
    """Instrument attribute values of one row (facility still a code); raises InvalidInput naming the column.

    Absent columns are left out so that an update keeps what is stored; blank cells take their default.
    """
    values: dict[str, Any] = {}
    for column in REQUIRED_COLUMNS:
        text = _text(cells.get(column))
        if not text:
            raise InvalidInput(f"{column} is required.", field=column, code="missing_field")
        values[column] = text
    name_zh, name_en = _text(cells.get("name_zh")), _text(cells.get("name_en"))
    if not name_zh and not name_en:
        raise InvalidInput("Give name_zh or name_en.", field="name_zh" if "name_zh" in cells else "name_en",
                           code="missing_field")
    # One name serves both languages when only one is given, so neither page shows an empty title.
    if "name_zh" in cells or not name_en:
        values["name_zh"] = name_zh or name_en
    if "name_en" in cells or not name_zh:
        values["name_en"] = name_en or name_zh
    for column in COLUMNS:
        if column in values or column not in cells or column in ("name_zh", "name_en"):
            continue
        raw = cells[column]
        if not _text(raw):
            values[column] = DEFAULTS[column]
        elif column in INTEGER_COLUMNS:
            values[column] = _integer(raw, column)
        elif column == "status":
            values[column] = _choice(InstrumentStatus, raw, column)
        elif column == "open_to":
            values[column] = _choice(OpenTo, raw, column)
        else:
            values[column] = _text(raw)
    for column, value in values.items():
        limit = _max_length(ATTRIBUTE.get(column, column))
        if isinstance(value, str) and limit is not None and len(value) > limit:
            raise InvalidInput(f"{column} is longer than {limit} characters.", field=column, code="too_long")
    return values


def _choice(enum: type[InstrumentStatus] | type[OpenTo], raw: Any, column: str) -> Any:
    text = _text(raw).lower()
    try:
        return enum(text)
    except ValueError:
        allowed = "/".join(m.value for m in enum)
        raise InvalidInput(f"{column} must be one of {allowed}, not {text!r}.", field=column) from None


def _max_length(attribute: str) -> int | None:
    # PostgreSQL rejects an over-long VARCHAR and SQLite stores it; checking here treats both alike.
    column = Instrument.__table__.c.get(attribute)
    if column is not None and isinstance(column.type, String):
        return column.type.length
    return None


# ---------------------------------------------------------------------------------------------------------
# Writing


def apply_row(
    session: Session, values: dict[str, Any], facility_id: int, instrument: Instrument | None
) -> Instrument:
    """Create (instrument None) or update an instrument from parsed row values and flush it.

    Raises InvalidInput on a broken catalogue rule; call inside a savepoint so nothing is half-written.
    """
    if instrument is None:
        instrument = Instrument(**{**DEFAULTS, "code": values["code"]})
        is_new = True
    else:
        is_new = False
    for column, value in values.items():
        if column not in ("code", "facility"):
            setattr(instrument, ATTRIBUTE.get(column, column), value)
    instrument.facility_id = facility_id
    if is_new:
        # A new instrument given one name uses it in both languages, so neither page shows an empty title.
        instrument.name_zh = instrument.name_zh or instrument.name_en
        instrument.name_en = instrument.name_en or instrument.name_zh
    # Should place_instrument ever query, an autoflush would send the unchecked row to the database and turn
    # a clear rule error into a constraint violation.
    with session.no_autoflush:
        place_instrument(session, instrument)
    if is_new:
        session.add(instrument)
    session.flush()
    return instrument


def import_instruments(db: Database, path: Path, *, progress: Progress | None = None) -> ImportReport:
    """Upsert instruments by code from a CSV or XLSX file; bad rows are rolled back and reported by line.

    Raises InvalidInput (field "header" or "file") when the whole file is unusable; nothing is written then.
    """
    report = ImportReport()
    with _open_source(path) as source:
        first = next(source.rows, None)
        if first is None:
            raise InvalidInput("The file is empty; the first line must name the columns.", field="header")
        header = _header(first)
        importer = _Importer(db, header, report)
        total, done = source.total, 0
        if progress:
            progress(0, total)
        batch: list[tuple[int, Sequence[Any]]] = []
        try:
            for line, row in enumerate(source.rows, start=2):
                batch.append((line, row))
                if len(batch) >= BATCH_ROWS:
                    importer.write_batch(batch)
                    done += len(batch)
                    batch = []
                    if progress:
                        progress(done, max(total, done))
            if batch:
                importer.write_batch(batch)
                done += len(batch)
        finally:
            importer.close()
        if progress:
            progress(done, done)
    report.errors.sort(key=lambda e: e.line)
    return report


class _Importer:
    """One write session and the codes seen so far, kept across the batches of one file."""

    def __init__(self, db: Database, header: list[str | None], report: ImportReport) -> None:
        self.session = db.session(write=True)
        self.header = header
        self.report = report
        self.first_line_of: dict[str, int] = {}

    def close(self) -> None:
        self.session.close()

    def write_batch(self, rows: list[tuple[int, Sequence[Any]]]) -> None:
        """Write one batch, each row in its own savepoint, then commit."""
        session = self.session
        parsed: list[tuple[int, dict[str, Any]]] = []
        for line, row in rows:
            if _is_blank(row):
                continue
            try:
                parsed.append((line, self._parse(line, row)))
            except InvalidInput as exc:
                self._reject(line, exc)
        existing, facilities, _held = self._preload(parsed)
        for line, values in parsed:
            instrument = existing.get(values["code"])
            try:
                facility = facilities.get(values["facility"])
                if facility is None:
                    raise InvalidInput(f"Unknown facility {values['facility']!r}.", field="facility",
                                       code="unknown_facility")
                with session.begin_nested():
                    apply_row(session, values, facility.id, instrument)
            except InvalidInput as exc:
                # Rolling back the savepoint also expires the instrument's unflushed changes, so the batch
                # commit does not write them.
                self._reject(line, exc)
                continue
            except (IntegrityError, DataError) as exc:
                # A rule the checks above missed, or a row another writer inserted meanwhile.
                self._reject(line, InvalidInput(f"The database refused the row: {exc.orig}.", field=None))
                continue
            if instrument is None:
                self.report.created += 1
            else:
                self.report.updated += 1
        session.commit()
        # Nothing from a finished batch is needed again; dropping it keeps memory flat over a large file.
        session.expunge_all()

    def _parse(self, line: int, row: Sequence[Any]) -> dict[str, Any]:
        cells = _cells(self.header, row)
        code = _text(cells.get("code"))
        if code:
            first = self.first_line_of.setdefault(code, line)
            if first != line:
                raise InvalidInput(f"Code {code!r} already appears on line {first}.", field="code",
                                   code="duplicate_code")
        return parse_row(cells)

    def _preload(
        self, parsed: list[tuple[int, dict[str, Any]]]
    ) -> tuple[dict[str, Instrument], dict[str, Facility], list[object]]:
        """A batch's stored instruments and facilities by code, plus the institutions and categories it uses.

        The session's identity map holds objects weakly; the caller keeps these referenced so that
        place_instrument's look-ups hit the map instead of costing three queries a row.
        """
        if not parsed:
            return {}, {}, []
        session = self.session
        codes = {values["code"] for _, values in parsed}
        existing = {i.code: i for i in session.scalars(select(Instrument).where(Instrument.code.in_(codes)))}
        facility_codes = {values["facility"] for _, values in parsed}
        facility_rows = session.scalars(select(Facility).where(Facility.code.in_(facility_codes)))
        facilities = {f.code: f for f in facility_rows}
        institution_ids = {f.institution_id for f in facilities.values()}
        category_codes = {values["category"] for _, values in parsed}
        held: list[object] = [
            *session.scalars(select(Institution).where(Institution.id.in_(institution_ids))),
            *session.scalars(select(Category).where(Category.code.in_(category_codes))),
        ]
        return existing, facilities, held

    def _reject(self, line: int, exc: InvalidInput) -> None:
        self.report.errors.append(RowError(line=line, field=exc.field, message=exc.message))
