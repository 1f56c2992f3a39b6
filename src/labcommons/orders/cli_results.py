"""`labcommons results`: check the result store against the database."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from labcommons.cli_support import console, database, err

app = typer.Typer(no_args_is_help=True, help="Result files of service orders.")


@app.command("verify")
def verify() -> None:
    """Read every result file back from the store and check its size and SHA-256; exit 1 on any problem."""
    from labcommons.orders import results
    from labcommons.orders.storage import get_store

    store = get_store()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err) as progress:
        task = progress.add_task("verifying", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        with database().unit_of_work(write=False) as session:
            report = results.verify_results(session, store, progress=advance)
    if report.ok:
        console.print(f"all {report.checked} result files are intact")
        return
    table = Table(title="Result files with problems")
    for column in ("file", "order", "storage key", "problem", "detail"):
        table.add_column(column)
    for problem in report.problems:
        table.add_row(str(problem.file_id), str(problem.order_id), problem.storage_key, problem.problem,
                      problem.detail)
    console.print(table)
    console.print(f"{len(report.problems)} of {report.checked} result files have problems")
    raise typer.Exit(code=1)
