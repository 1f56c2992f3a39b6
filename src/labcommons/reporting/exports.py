"""Every table of a dashboard as CSV and as one XLSX workbook (a sheet per table).

Headings are bilingual (中文 English) so one file serves both languages. Hours are minutes / 60 as Decimal with two
places, money is yuan as Decimal with a fen column beside it (never a float), rates are fractions (0.2531 = 25.31 %),
formatted as percentages in the workbook.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from openpyxl import Workbook
from openpyxl.styles import Font

from labcommons.billing.exports import CSV_TYPE, XLSX_TYPE, safe_cell, yuan_decimal
from labcommons.errors import NotFound
from labcommons.reporting.service import Dashboard, InstrumentRow

__all__ = [
    "CSV_TYPE", "TABLES", "XLSX_TYPE", "Table", "dashboard_tables", "hours", "pick_table", "table_csv", "workbook",
]

WEEKDAY_NAMES = ("周一 Mon", "周二 Tue", "周三 Wed", "周四 Thu", "周五 Fri", "周六 Sat", "周日 Sun")


def hours(minutes: int) -> Decimal:
    """Minutes as hours with two decimal places (exact decimal arithmetic)."""
    return (Decimal(minutes) / 60).quantize(Decimal("0.01"))


def _rate(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(str(value))


@dataclass
class Table:
    """One exportable table: a stable name, a bilingual title, headings, rows, and which columns are percentages."""

    name: str
    title: str
    headings: list[str]
    rows: list[list[Any]]
    percent_columns: tuple[int, ...] = ()
    # Rows whose value column is a percentage (the totals table has one metric per row).
    percent_rows: frozenset[int] = frozenset()


# The tables, in the order the workbook has them; `TABLES` is what the CSV routes accept.
TABLES = ("totals", "series", "heatmap", "breakdown", "instruments", "top", "idle", "flows", "turnaround")

_INSTRUMENT_HEADINGS = [
    "编号 Code", "名称 Name (zh)", "Name (en)", "地区 Region", "预约次数 Bookings", "预约机时 Booked hours",
    "有效机时 Effective hours", "外单位机时 Other-institution hours", "跨地区机时 Other-region hours",
    "可用机时 Available hours", "利用率 Utilisation", "爽约 No-shows",
]


def _instrument_values(r: InstrumentRow) -> list[Any]:
    return [safe_cell(r.code), safe_cell(r.name_zh), safe_cell(r.name_en), safe_cell(r.region_code), r.bookings,
            hours(r.booked_min), hours(r.effective_min), hours(r.ext_institution_min), hours(r.ext_region_min),
            hours(r.available_min), _rate(r.utilisation), r.no_shows]


def _instrument_table(name: str, title: str, rows: Sequence[InstrumentRow]) -> Table:
    return Table(name, title, list(_INSTRUMENT_HEADINGS), [_instrument_values(r) for r in rows], (10,))


def _totals_table(d: Dashboard) -> Table:
    t = d.totals
    rows: list[list[Any]] = [
        ["instruments", "仪器数 Instruments", t.instruments],
        ["bookings", "预约次数 Bookings", t.bookings],
        ["booked_hours", "预约机时 Booked hours", hours(t.booked_min)],
        ["effective_hours", "有效机时 Effective machine hours", hours(t.effective_min)],
        ["external_hours", "对外服务机时 External service hours (other institutions)", hours(t.ext_institution_min)],
        ["other_region_hours", "跨地区服务机时 Hours for users of other regions", hours(t.ext_region_min)],
        ["maintenance_hours", "维护机时 Maintenance hours", hours(t.maintenance_min)],
        ["available_hours", "可用机时 Available hours", hours(t.available_min)],
        ["utilisation", "利用率 Utilisation", _rate(t.utilisation)],
        ["external_share", "对外服务机时占比 Share of external service hours", _rate(t.external_share)],
        ["other_region_share", "跨地区机时占比 Share of other-region hours", _rate(t.ext_region_share)],
        ["users", "服务用户数 Users served", t.users],
        ["institutions", "服务单位数 Institutions served", t.institutions],
        ["no_shows", "爽约次数 No-shows", t.no_shows],
        ["no_show_rate", "爽约率 No-show rate", _rate(t.no_show_rate)],
        ["median_lead_hours", "预约等待中位数（小时）Median wait to the booked slot (hours)",
         None if t.median_lead_hours is None else Decimal(str(t.median_lead_hours))],
        ["orders", "服务订单 Service orders", t.orders],
        ["orders_completed", "已交付订单 Orders with results delivered", t.orders_completed],
        ["median_turnaround_days", "订单周期中位数（天）Median order turnaround (days)",
         None if t.median_turnaround_days is None else Decimal(str(t.median_turnaround_days))],
        ["revenue_yuan", "服务收入（元）Revenue (yuan)", yuan_decimal(t.revenue_fen)],
        ["revenue_fen", "服务收入（分）Revenue (fen)", t.revenue_fen],
        ["external_revenue_fen", "对外服务收入（分）External revenue (fen)", t.external_revenue_fen],
        ["rating_average", "平均评分 Average rating",
         None if t.rating_average is None else Decimal(str(t.rating_average))],
        ["ratings", "评分数 Ratings", t.ratings],
    ]
    percent = {"utilisation", "external_share", "other_region_share", "no_show_rate"}
    return Table("totals", "总览 Totals", ["指标 Key", "名称 Metric", "数值 Value"], rows,
                 percent_rows=frozenset(i for i, r in enumerate(rows) if r[0] in percent))


def dashboard_tables(d: Dashboard, instruments: Sequence[InstrumentRow]) -> dict[str, Table]:
    """Every table of a dashboard, by name (see TABLES)."""
    tables = {
        "totals": _totals_table(d),
        "series": Table("series", "机时趋势 Hours over time",
                        ["起始日 Start", "预约机时 Booked hours", "有效机时 Effective hours",
                         "可用机时 Available hours", "利用率 Utilisation"],
                        [[p.start, hours(p.booked_min), hours(p.effective_min), hours(p.available_min),
                          _rate(p.utilisation)] for p in d.series], (4,)),
        "heatmap": Table("heatmap", "星期×小时预约机时 Booked hours by weekday and hour",
                         ["星期 Weekday", *[f"{h:02d}:00" for h in range(24)]],
                         [[WEEKDAY_NAMES[i], *[hours(m) for m in row]] for i, row in enumerate(d.heatmap)]),
        "breakdown": Table("breakdown", "分项 Breakdown",
                           ["类别 Kind", "标识 Key", "名称 Name (zh)", "Name (en)", "仪器数 Instruments",
                            "预约机时 Booked hours", "有效机时 Effective hours", "外单位机时 Other-institution hours",
                            "跨地区机时 Other-region hours", "可用机时 Available hours", "利用率 Utilisation",
                            "收入（元）Revenue (yuan)", "收入（分）Revenue (fen)"],
                           [[b.kind, safe_cell(b.key), safe_cell(b.name_zh), safe_cell(b.name_en), b.instruments,
                             hours(b.booked_min), hours(b.effective_min), hours(b.ext_institution_min),
                             hours(b.ext_region_min), hours(b.available_min), _rate(b.utilisation),
                             yuan_decimal(b.revenue_fen), b.revenue_fen] for b in d.breakdown], (10,)),
        "instruments": _instrument_table("instruments", "仪器 Instruments", instruments),
        "top": _instrument_table("top", "使用最多的仪器 Busiest instruments", d.top),
        "idle": _instrument_table("idle", "闲置仪器 Least used instruments", d.idle),
        "flows": Table("flows", "跨地区流向 Flows between regions",
                       ["服务方地区 Provider region", "用户地区 User region", "预约机时 Booked hours",
                        "有效机时 Effective hours", "金额（元）Amount (yuan)", "金额（分）Amount (fen)"],
                       [[safe_cell(f.provider_region), safe_cell(f.user_region), hours(f.booked_min),
                         hours(f.effective_min), yuan_decimal(f.revenue_fen), f.revenue_fen] for f in d.flows]),
        "turnaround": Table("turnaround", "订单周期 Order turnaround", ["序号 No.", "天数 Days"],
                            [[i + 1, Decimal(str(v))] for i, v in enumerate(d.turnaround_days)]),
    }
    return tables


def table_csv(table: Table) -> bytes:
    """One table as UTF-8 CSV with a byte-order mark (so spreadsheet programs read the Chinese)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(table.headings)
    for row in table.rows:
        writer.writerow(["" if v is None else v.isoformat() if isinstance(v, date) else v for v in row])
    return ("\ufeff" + buffer.getvalue()).encode("utf-8")


def pick_table(tables: dict[str, Table], name: str) -> Table:
    """The table called `name`, or NotFound naming the ones there are."""
    if name not in tables:
        raise NotFound(f"No table {name!r}; there are: {', '.join(TABLES)}.", field="table")
    return tables[name]


def workbook(d: Dashboard, tables: dict[str, Table]) -> bytes:
    """All tables in one workbook: a sheet each, headings bold, hours and money as numbers."""
    book = Workbook()
    first = True
    for name in TABLES:
        table = tables[name]
        sheet = book.active if first else book.create_sheet()
        first = False
        assert sheet is not None
        sheet.title = name
        sheet.append([table.title])
        sheet["A1"].font = Font(bold=True)
        period = f"{d.period.first.isoformat()} – {d.period.last.isoformat()}"
        sheet.append([safe_cell(f"{d.scope.name_zh} {d.scope.name_en}"), period])
        sheet.append(table.headings)
        for cell in sheet[3]:
            cell.font = Font(bold=True)
        for index, row in enumerate(table.rows):
            sheet.append(row)
            excel_row = sheet.max_row
            for col in table.percent_columns:
                sheet.cell(excel_row, col + 1).number_format = "0.00%"
            if index in table.percent_rows:
                sheet.cell(excel_row, 3).number_format = "0.00%"
        sheet.freeze_panes = "A4"
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()
