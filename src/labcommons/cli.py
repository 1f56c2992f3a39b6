"""The `labcommons` command line (Typer + Rich)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from labcommons.cli_support import console, database, err, fail
from labcommons.errors import DomainError

app = typer.Typer(help="LabCommons: shared instruments and services across regions.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
users_app = typer.Typer(help="User accounts.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens.", no_args_is_help=True)
import_app = typer.Typer(help="Bulk imports.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
app.add_typer(import_app, name="import")


def _add_identity_commands() -> None:
    from labcommons.identity import cli_idp, cli_oidc, cli_roles

    app.add_typer(cli_idp.app, name="idp", help="Upstream OpenID Connect identity providers.")
    app.add_typer(cli_oidc.app, name="oidc-client", help="Member systems that sign in through the platform.")
    app.add_typer(cli_oidc.keys_app, name="oidc-keys", help="Keys that sign the platform's ID tokens.")
    app.add_typer(cli_roles.app, name="roles", help="Role grants.")


_add_identity_commands()


def _add_usage_commands() -> None:
    from labcommons.booking import cli_instruments

    app.add_typer(cli_instruments.app, name="instrument-tokens", help="Instrument tokens for kiosks and interlocks.")


_add_usage_commands()


def _add_catalogue_commands() -> None:
    from labcommons.catalog import cli_services

    app.add_typer(cli_services.app, name="services", help="The facilities' services (testing, R&D, consultation).")


_add_catalogue_commands()


def _add_order_commands() -> None:
    from labcommons.orders import cli_orders

    app.add_typer(cli_orders.app, name="orders", help="Service orders.")


_add_order_commands()


def _add_result_commands() -> None:
    from labcommons.orders import cli_results

    app.add_typer(cli_results.app, name="results", help="Result files of service orders.")


_add_result_commands()


def _add_billing_commands() -> None:
    from labcommons.billing.cli_invoices import billing_app

    app.add_typer(billing_app, name="billing", help="Billing: invoices, settlement, exports.")


_add_billing_commands()


def _add_matching_commands() -> None:
    from labcommons.matching.cli import matching_app

    app.add_typer(matching_app, name="matching", help="Demand matching: the index, its status, queries.")


_add_matching_commands()


def _add_reporting_commands() -> None:
    from labcommons.reporting.cli import reporting_app

    app.add_typer(reporting_app, name="reporting", help="Sharing statistics: rebuild, status, figures, exports.")


_add_reporting_commands()

_database = database
_fail = fail


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err,
    )


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Create or migrate the database at LABCOMMONS_DATABASE_URL."""
    from labcommons.migrations import upgrade

    db = _database()
    upgrade(db.engine, revision)
    console.print(f"database at [bold]{db.engine.url.render_as_string(hide_password=True)}[/bold] is up to date")


@app.command("seed-demo")
def seed_demo(bookings: int = 300) -> None:
    """Load the demo catalogue, users and bookings into an empty database; print the demo logins."""
    from labcommons.catalog import demo
    from labcommons.identity import service as identity
    from labcommons.migrations import upgrade

    db = _database()
    upgrade(db.engine)
    with db.unit_of_work() as session:
        if demo.is_seeded(session):
            console.print("the database already holds a catalogue; issuing fresh demo tokens")
            logins = []
            for entry in demo.demo_data()["users"]:
                user = identity.find_user(session, entry["email"])
                logins.append((user.email, entry["password"], identity.rotate_api_token(session, user, name="demo")))
        else:
            seeded = demo.seed_demo(session, bookings=bookings)
            logins = seeded.users
            from labcommons.orders.demo import seed_orders

            orders = seed_orders(session)
            from labcommons.billing.talent import seed_talent

            seed_talent(session)
            from labcommons.billing.demo import seed_billing
            from labcommons.db import utcnow

            billing = seed_billing(session, now=utcnow())
            from labcommons.matching.demo import seed_experts, seed_subscriptions

            experts = seed_experts(session)
            seed_subscriptions(session)
            from labcommons.reporting.demo import seed_history

            history = seed_history(session, now=utcnow())
            console.print(
                f"loaded {seeded.instruments} instruments, {seeded.services} services, "
                f"{seeded.bookings} bookings, {orders} service orders, {billing.charges} charges, "
                f"{len(billing.invoices)} invoices, {experts} experts; a year of history: {history.bookings} "
                f"bookings, {history.maintenance} maintenance blocks, {history.orders} delivered orders"
            )
    from labcommons.reporting import aggregate

    # The history's days were marked in the seeding transaction; folding them now keeps the first dashboard fast.
    aggregate.ensure_current(db)
    console.print("[bold]Demo users[/bold] (sign in at /login with the password, or send the API token as "
                  "'Authorization: Bearer <token>'):")
    roles_of = {
        entry["email"]: ", ".join(
            f"{g['role']} {next((g[k] for k in ('facility', 'institution', 'region') if k in g), 'platform')}"
            for g in entry.get("roles", [])
        )
        for entry in demo.demo_data()["users"]
    }
    for email, password, token in logins:
        roles = f"  roles: {roles_of[email]}" if roles_of.get(email) else ""
        console.print(f"  {email}  password: {password}  token: {token}{roles}", soft_wrap=True, highlight=False)


def _serve(
    host: str, port: int, workers: int, *, uds: str | None = None, forwarded_allow_ips: str | None = None,
    graceful_timeout: int = 30,
) -> None:
    """Run uvicorn with `workers` processes, logging and metrics set up from the settings (see docs/deploy.md)."""
    import shutil
    import signal
    import tempfile

    import uvicorn

    from labcommons.config import get_settings
    from labcommons.ops.observability import configure_logging, use_metrics_dir

    settings = get_settings()
    configure_logging(settings)
    metrics_dir: Path | None = None
    made_metrics_dir = False
    if settings.metrics_enabled:
        # Every worker writes its metrics to files here and a scrape adds them up; files left by an earlier run
        # would add counts from processes long gone, so the directory starts empty.
        if settings.metrics_dir:
            metrics_dir = Path(settings.metrics_dir)
            _empty_metrics_dir(metrics_dir)
        else:
            metrics_dir, made_metrics_dir = Path(tempfile.mkdtemp(prefix="labcommons-metrics-")), True
        use_metrics_dir(metrics_dir)
        # The workers are new processes that read their settings from the environment they inherit.
        os.environ["LABCOMMONS_METRICS_DIR"] = str(metrics_dir)
        get_settings.cache_clear()
    options: dict[str, Any] = dict(
        host=host, port=port, uds=uds,
        # Logging is ours (configure_logging, in every worker through labcommons.asgi); the middleware writes the
        # one access line per request, so uvicorn's own is off.
        log_config=None, log_level=settings.log_level.lower(), access_log=False,
        # X-Forwarded-For/-Proto change the client and scheme only when the proxy is trusted to overwrite them.
        proxy_headers=settings.trust_proxy_headers, forwarded_allow_ips=forwarded_allow_ips,
        # On SIGTERM: stop accepting, let requests in progress finish for this long, then close.
        timeout_graceful_shutdown=graceful_timeout, server_header=False,
    )
    # One server process re-raises SIGTERM once it has shut down gracefully; the default action would end the
    # process before the metrics directory below is cleaned. A clean stop exits with status 0 instead.
    signal.signal(signal.SIGTERM, _exit_after_shutdown)
    try:
        if workers > 1:
            uvicorn.run("labcommons.asgi:app", workers=workers, **options)
        else:
            from labcommons.app import create_app

            uvicorn.run(create_app(get_settings()), **options)
    finally:
        if metrics_dir is not None:
            if made_metrics_dir:
                shutil.rmtree(metrics_dir, ignore_errors=True)
            else:
                _empty_metrics_dir(metrics_dir)


def _exit_after_shutdown(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _empty_metrics_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
    uds: Annotated[str | None, typer.Option(help="Listen on this unix socket instead of host:port (for nginx)")]
    = None,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        help="Proxy addresses whose X-Forwarded-* headers are applied when LABCOMMONS_TRUST_PROXY_HEADERS is on "
             "(comma-separated, '*' for any; default $FORWARDED_ALLOW_IPS or 127.0.0.1)")] = None,
    graceful_timeout: Annotated[int, typer.Option(min=0, help="Seconds requests in progress get on shutdown")] = 30,
) -> None:
    """Serve the web pages and the API; settings come from LABCOMMONS_* environment variables."""
    _serve(host, port, workers, uds=uds, forwarded_allow_ips=forwarded_allow_ips, graceful_timeout=graceful_timeout)


@app.command("worker")
def worker_command(
    once: Annotated[bool, typer.Option(help="Run the jobs that are due now, then exit")] = False,
    poll: Annotated[float | None, typer.Option(help="Seconds between polls when idle (default: settings)")] = None,
    worker_id: Annotated[str | None, typer.Option("--id", help="Name in the jobs' locked_by column")] = None,
) -> None:
    """Run background jobs (e-mail, reminders) from the queue until interrupted; any number may run at once.

    SIGTERM or Ctrl-C stops it after the job in hand; a worker killed instead has its job run by another worker
    once its heartbeat is older than job_worker_dead_seconds.
    """
    import signal

    from labcommons import jobs
    from labcommons.config import get_settings
    from labcommons.ops.logs import configure_logging

    configure_logging(get_settings())
    db = _database()
    if once:
        worker_name = worker_id or jobs.default_worker_id()
        with jobs.registered(db, worker_name):
            stats = jobs.run_pending(db, worker_name, limit=10_000)
        console.print(f"{stats.done} done, {stats.retried} to retry, {stats.failed} failed")
        return
    totals = jobs.RunStats()
    with console.status("waiting for jobs") as status:
        def report(stats: jobs.RunStats) -> None:
            totals.done, totals.retried, totals.failed = (
                totals.done + stats.done, totals.retried + stats.retried, totals.failed + stats.failed)
            status.update(f"worker {worker.worker_id}: {totals.done} done, {totals.retried} retried, "
                          f"{totals.failed} failed; waiting for jobs")

        worker = jobs.Worker(db, worker_id, poll_seconds=poll, on_batch=report)
        # What systemd and container runtimes send: finish the job in hand, record the stop, exit.
        signal.signal(signal.SIGTERM, lambda _signum, _frame: worker.stop(timeout=0))
        sealer = _audit_sealer(db)
        try:
            worker.run()
        except KeyboardInterrupt:
            worker.stop_event.set()
        finally:
            if sealer is not None:
                sealer.stop()
    console.print(f"stopped: {totals.done} done, {totals.retried} retried, {totals.failed} failed")


def _audit_sealer(db: Any) -> Any:
    """A running audit sealer when this database defers sealing (PostgreSQL by default), else None: workers chain
    pending audit entries too, so the log stays current while app servers are down."""
    from labcommons.audit.capture import deferred_sealing
    from labcommons.audit.seal import Sealer
    from labcommons.config import get_settings

    if not deferred_sealing(db.engine.dialect.name):
        return None
    sealer = Sealer(db, get_settings().audit_seal_interval_seconds)
    sealer.start()
    return sealer


@app.command("demo")
def demo_command(
    host: str = "127.0.0.1",
    port: int = 8000,
    idp_port_sc: Annotated[int, typer.Option(help="Port of the demo Sichuan identity service")] = 8101,
    idp_port_cq: Annotated[int, typer.Option(help="Port of the demo Chongqing identity service")] = 8102,
    demo_idps: Annotated[bool, typer.Option(help="Run the demo regional identity services on loopback")] = True,
) -> None:
    """Create the database, load the demo if it is empty, start the demo identity services, and serve it."""
    from labcommons.config import get_settings
    from labcommons.identity import demo_providers

    # The app builds its OpenID Connect callback from public_base_url, so unless one is given it follows --port.
    if not os.environ.get("LABCOMMONS_PUBLIC_BASE_URL"):
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        os.environ["LABCOMMONS_PUBLIC_BASE_URL"] = f"http://{shown_host}:{port}"
        get_settings.cache_clear()
    base_url = get_settings().public_base_url.rstrip("/")
    seed_demo(bookings=300)
    handles: list[demo_providers.DemoProviderHandle] = []
    if demo_idps:
        try:
            handles = demo_providers.start_demo_providers({"SC": idp_port_sc, "CQ": idp_port_cq},
                                                          app_base_url=base_url)
        except OSError as exc:
            err.print(f"[red]error:[/red] cannot start the demo identity services ({exc}); choose free ports with "
                      "--idp-port-sc/--idp-port-cq or pass --no-demo-idps")
            raise typer.Exit(code=2) from exc
    with _database().unit_of_work() as session:
        for handle in handles:
            demo_providers.register_demo_provider(session, handle.region, handle.issuer)
        if not handles:
            demo_providers.disable_demo_providers(session)
    if handles:
        console.print(f"[bold]Demo identity services[/bold] (on {base_url}/login choose \"Sign in with …\", then "
                      "pick a person; no password):", soft_wrap=True)
        for handle in handles:
            console.print(f"  {handle.region.display_name_en} / {handle.region.display_name_zh}  {handle.issuer}",
                          soft_wrap=True, highlight=False)
            for person in handle.region.persons:
                note = "  (same e-mail as a demo user above: links to it)" if person.has_local_account else ""
                console.print(f"    {person.name} <{person.email}>  {person.affiliation_en}{note}",
                              soft_wrap=True, highlight=False)
    console.print(f"serving on [bold]{base_url}[/bold] (API docs at /api/v1/docs)")
    try:
        _serve(host, port, 1)
    finally:
        for handle in handles:
            handle.stop()


@app.command("demo-idp")
def demo_idp_command(
    region: Annotated[str, typer.Option(help="Region code: SC or CQ")] = "SC",
    port: Annotated[int | None, typer.Option(help="Port (default 8101 for SC, 8102 for CQ)")] = None,
    app_base_url: Annotated[str | None, typer.Option(help="The platform's public URL (default: settings)")] = None,
    register: Annotated[bool, typer.Option(help="Register it as an identity provider in the database")] = False,
) -> None:
    """Run one demo regional identity service on loopback until interrupted."""
    import time

    from labcommons.config import get_settings
    from labcommons.identity import demo_providers

    config = demo_providers.DEMO_REGIONS.get(region.upper())
    if config is None:
        err.print(f"[red]error:[/red] no demo identity service for region {region!r} (SC or CQ)")
        raise typer.Exit(code=2)
    base_url = app_base_url or get_settings().public_base_url
    handle = demo_providers.serve_in_thread(config, config.default_port if port is None else port,
                                            app_base_url=base_url)
    if register:
        with _database().unit_of_work() as session:
            demo_providers.register_demo_provider(session, config, handle.issuer)
    console.print(f"{config.display_name_en} at [bold]{handle.issuer}[/bold]: client_id {config.client_id}, "
                  f"client_secret {config.client_secret}, redirect URI {handle.redirect_uris[0]}",
                  soft_wrap=True, highlight=False)
    try:
        while handle.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()


@users_app.command("add")
def users_add(
    email: Annotated[str, typer.Option()],
    name: Annotated[str, typer.Option()],
    institution: Annotated[str, typer.Option(help="Institution code")],
    password: Annotated[str | None, typer.Option(help="Local password (optional)")] = None,
) -> None:
    """Add a user to an institution."""
    from labcommons.identity import service as identity

    db = _database()
    try:
        with db.unit_of_work() as session:
            user = identity.create_user(
                session, email=email, name=name, institution_code=institution, password=password
            )
            console.print(f"user {user.id} <{user.email}> added")
    except DomainError as exc:
        raise _fail(exc) from exc


@users_app.command("list")
def users_list() -> None:
    """List users."""
    from labcommons.identity import service as identity

    table = Table()
    for column in ("id", "e-mail", "name", "institution"):
        table.add_column(column)
    with _database().unit_of_work(write=False) as session:
        for user in identity.list_users(session):
            table.add_row(str(user.id), user.email, user.name, user.institution.code if user.institution else "—")
    console.print(table)


@users_app.command("set-password")
def users_set_password(email: Annotated[str, typer.Option()]) -> None:
    """Set a user's local password (asked twice, not echoed) and end all their browser sessions."""
    from labcommons.identity import passwords

    password = typer.prompt("New password", hide_input=True, confirmation_prompt=True)
    try:
        with _database().unit_of_work() as session:
            user = passwords.set_password_for_email(session, email, password)
            console.print(f"password of <{user.email}> set; their browser sessions were ended")
    except DomainError as exc:
        raise _fail(exc) from exc


@tokens_app.command("create")
def tokens_create(
    email: Annotated[str, typer.Option()],
    name: Annotated[str, typer.Option(help="What the token is for")] = "cli",
    days: Annotated[int | None, typer.Option(help="Expire after this many days")] = None,
) -> None:
    """Create an API token for a user and print it once (only its hash is stored)."""
    from datetime import timedelta

    from labcommons.db import utcnow
    from labcommons.identity import service as identity

    try:
        with _database().unit_of_work() as session:
            user = identity.find_user(session, email)
            expires = utcnow() + timedelta(days=days) if days else None
            token = identity.create_api_token(session, user, name=name, expires_at=expires)
    except DomainError as exc:
        raise _fail(exc) from exc
    typer.echo(token)


@import_app.command("instruments")
def import_instruments(path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)]) -> None:
    """Import instruments from CSV or XLSX: good rows land, bad rows are listed by line number."""
    from labcommons.catalog.importer import import_instruments as run_import

    with _progress() as progress:
        task = progress.add_task("importing", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            report = run_import(_database(), path, progress=advance)
        except DomainError as exc:
            raise _fail(exc) from exc
    console.print(f"{report.created} created, {report.updated} updated, {len(report.errors)} rejected")
    if report.errors:
        table = Table(title="Rejected rows")
        for column in ("line", "field", "problem"):
            table.add_column(column)
        for error in report.errors:
            table.add_row(str(error.line), error.field or "", error.message)
        console.print(table)
        raise typer.Exit(code=1)


@app.command("seed-synthetic")
def seed_synthetic(
    instruments: Annotated[int, typer.Option(min=1)] = 1000,
    bookings: Annotated[int, typer.Option(min=0)] = 10000,
    seed: int = 1,
) -> None:
    """Fill the database with synthetic instruments and bookings for benchmarks, then rebuild the statistics."""
    from labcommons.reporting import aggregate
    from labcommons.synthetic import seed_synthetic as run_seed

    db = _database()
    with _progress() as progress:
        tasks: dict[str, TaskID] = {}

        def advance(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        run_seed(db, instruments=instruments, bookings=bookings, seed=seed, progress=advance)
        # The bulk load bypasses the booking flush listener, so no day was marked: recompute everything.
        task = progress.add_task("statistics (facilities)", total=None)
        aggregate.rebuild(db, progress=lambda done, total: progress.update(task, completed=done, total=total))


def _add_reliability_commands() -> None:
    from labcommons.audit import cli as audit_cli
    from labcommons.identity import cli_privacy
    from labcommons.ops import cli as ops_cli

    app.add_typer(audit_cli.app, name="audit", help="The hash-chained audit log: verify, show, head.")
    ops_cli.register(app)
    cli_privacy.register(users_app)


_add_reliability_commands()


def main() -> None:
    from labcommons.audit import context as audit_context

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # What a command changes is logged as done from the command line.
    with audit_context.acting("cli"):
        app()


if __name__ == "__main__":
    main()
