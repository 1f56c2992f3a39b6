"""Placeholder command group; filled in by the identity issue."""

import typer

app = typer.Typer(no_args_is_help=True)
