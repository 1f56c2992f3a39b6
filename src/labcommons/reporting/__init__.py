"""Open-sharing statistics: pre-aggregated usage, metrics for any scope and period, dashboards, exports, reports."""
