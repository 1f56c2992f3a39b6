"""Sample labels: a QR code (segno) for phones and a Code 128 barcode (python-barcode) for lab scanners, drawn
as plain SVG so no imaging library or font is needed, sized for 62 mm × 29 mm printer labels."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from urllib.parse import quote
from xml.sax.saxutils import escape

import segno
from barcode import Code128

from labcommons.config import get_settings

LABEL_WIDTH_MM = 62
LABEL_HEIGHT_MM = 29
QR_BORDER = 2  # modules of quiet zone; the label's white margin adds to it
BARCODE_QUIET = 10  # modules of quiet zone each side, as Code 128 asks
DESCRIPTION_CHARS = 36


def scan_url(code: str) -> str:
    """The address a scanned label opens: the scanner landing page, which sends the reader to the order."""
    return f"{get_settings().public_base_url.rstrip('/')}/samples/code/{quote(code, safe='')}"


def qr_code(code: str) -> segno.QRCode:
    """The QR code of a sample label. It holds the landing address, which ends with the sample code, so a phone
    opens the order and the code stays readable in the scanned text."""
    return segno.make(scan_url(code), error="m", micro=False)


def qr_path(qr: segno.QRCode, border: int = QR_BORDER) -> tuple[int, str]:
    """The symbol's size in modules (with the border) and an SVG path drawing its dark modules, one unit each."""
    parts = []
    for y, row in enumerate(qr.matrix):
        x = 0
        while x < len(row):
            if row[x]:
                start = x
                while x < len(row) and row[x]:
                    x += 1
                parts.append(f"M{start + border} {y + border}h{x - start}v1h-{x - start}z")
            else:
                x += 1
    return len(qr.matrix) + 2 * border, "".join(parts)


def qr_svg(code: str) -> str:
    """The QR code alone as an inline SVG element that scales to its box (CSS sets the size)."""
    size, path = qr_path(qr_code(code))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}" class="label-qr" role="img" '
            f'aria-label="QR {escape(code)}" shape-rendering="crispEdges">'
            f'<rect width="{size}" height="{size}" fill="#fff"/><path d="{path}" fill="#000"/></svg>')


def barcode_modules(code: str) -> str:
    """The Code 128 symbol of the code (start, data, check, stop) as a string of modules, 1 = bar."""
    return "".join(Code128(code).build())


def _bars(modules: str, x0: float, y: float, module: float, height: float) -> str:
    rects = []
    i = 0
    while i < len(modules):
        if modules[i] == "1":
            start = i
            while i < len(modules) and modules[i] == "1":
                i += 1
            rects.append(f'<rect x="{x0 + start * module:.3f}" y="{y:.3f}" width="{(i - start) * module:.3f}" '
                         f'height="{height:.3f}"/>')
        else:
            i += 1
    return "".join(rects)


def barcode_svg(code: str) -> str:
    """The Code 128 barcode alone as an inline SVG element (one unit per module; CSS sets the size)."""
    modules = barcode_modules(code)
    width = len(modules) + 2 * BARCODE_QUIET
    height = 40
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
            f'class="label-barcode" role="img" aria-label="Code 128 {escape(code)}" shape-rendering="crispEdges">'
            f'<rect width="{width}" height="{height}" fill="#fff"/>'
            f'<g fill="#000">{_bars(modules, BARCODE_QUIET, 0, 1, height)}</g></svg>')


@dataclass(frozen=True)
class LabelText:
    """What a label says besides its codes."""

    code: str
    order_number: str
    description: str
    received_on: date | None
    received_caption: str = "Received"


def short(text: str, limit: int = DESCRIPTION_CHARS) -> str:
    """One line of at most `limit` characters, cut with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def label_svg(label: LabelText) -> str:
    """A whole 62 mm × 29 mm label as one SVG document: QR code left, text right, barcode along the bottom."""
    size, path = qr_path(qr_code(label.code))
    qr_mm = 19.0
    modules = barcode_modules(label.code)
    bar_width_mm = LABEL_WIDTH_MM - 4
    module_mm = bar_width_mm / (len(modules) + 2 * BARCODE_QUIET)
    received = label.received_on.isoformat() if label.received_on else "—"
    lines = [
        (5.0, 3.0, "bold", label.code),
        (9.5, 2.6, "normal", label.order_number),
        (13.5, 2.4, "normal", short(label.description)),
        (17.5, 2.4, "normal", f"{label.received_caption}: {received}"),
    ]
    text = "".join(
        f'<text x="21.5" y="{y}" font-size="{font}" font-weight="{weight}">{escape(value)}</text>'
        for y, font, weight, value in lines if value
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{LABEL_WIDTH_MM}mm" height="{LABEL_HEIGHT_MM}mm" '
        f'viewBox="0 0 {LABEL_WIDTH_MM} {LABEL_HEIGHT_MM}" shape-rendering="crispEdges">'
        f'<title>{escape(label.code)}</title>'
        f'<rect width="{LABEL_WIDTH_MM}" height="{LABEL_HEIGHT_MM}" fill="#fff"/>'
        f'<svg x="1" y="1" width="{qr_mm}" height="{qr_mm}" viewBox="0 0 {size} {size}">'
        f'<path d="{path}" fill="#000"/></svg>'
        f'<g font-family="DejaVu Sans, Noto Sans CJK SC, sans-serif" fill="#000">{text}</g>'
        f'<g fill="#000">{_bars(modules, 2 + BARCODE_QUIET * module_mm, 21.0, module_mm, 7.0)}</g>'
        '</svg>\n'
    )
