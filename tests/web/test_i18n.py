"""The zh_CN catalogue translates every message the code and templates mark for translation."""

from __future__ import annotations

from pathlib import Path

from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "labcommons"


def _extracted() -> set[str | tuple[str, ...]]:
    with (ROOT / "babel.cfg").open() as fh:
        method_map, options_map = parse_mapping_cfg(fh)
    return {message for _file, _line, message, _comments, _context in
            extract_from_dir(str(PACKAGE), method_map, options_map)}


def test_every_marked_message_has_a_chinese_translation() -> None:
    with (PACKAGE / "locale" / "zh_CN" / "LC_MESSAGES" / "messages.po").open("rb") as fh:
        catalog = read_po(fh, locale="zh_CN")
    marked = _extracted()
    assert "Sign in to book" in marked  # extraction itself works
    missing = []
    for message in marked:
        key = message[0] if isinstance(message, tuple) else message
        entry = catalog.get(key)
        strings = entry.string if entry is not None else ""
        if not (all(strings) if isinstance(strings, tuple) else strings):
            missing.append(key)
    assert missing == []
    assert not [m.id for m in catalog if m.id and m.fuzzy]
    assert catalog.get("This time is already booked. Pick a free time in the calendar.").string.startswith(
        "该时段已被预约"
    )
