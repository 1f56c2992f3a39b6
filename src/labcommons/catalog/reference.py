"""Reference data shipped with the package: the instrument taxonomy."""

from __future__ import annotations

import csv
import io
from importlib import resources


def taxonomy_rows() -> list[dict[str, str | None]]:
    """Rows of taxonomy.csv, parents before children, as dicts for the `category` table."""
    text = resources.files("labcommons.catalog").joinpath("data/taxonomy.csv").read_text("utf-8")
    rows = [
        {"code": r["code"], "parent_code": r["parent"] or None, "name_zh": r["name_zh"], "name_en": r["name_en"]}
        for r in csv.DictReader(io.StringIO(text))
    ]
    return sorted(rows, key=lambda r: str(r["code"]).count("."))
