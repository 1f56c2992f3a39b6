"""`labcommons reporting …` (in progress)."""

from __future__ import annotations

import typer

reporting_app = typer.Typer(no_args_is_help=True)
