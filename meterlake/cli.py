"""The ``meterlake`` command line: thin commands over the pipeline's modules.

User mistakes (bad config, unknown query, unreachable URL, ...) and failures of the environment (a read-only data
dir, a full disk) print one ``error:`` line and exit non-zero; they never show a traceback.

Values that come from data (tenants, Amberflo's answers, file names) are printed as text: control characters made
visible (:func:`meterlake.lake.query.printable`) and rich markup escaped, so a tenant named ``[/bold]`` or one holding
ANSI escapes shows as what it is.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer._click.exceptions import NoArgsIsHelpError
from typer._click.exceptions import UsageError as CommandLineError

from meterlake.aws.stacks import ATHENA_WORKGROUP
from meterlake.config import Config, ConfigError, config_file, load_config
from meterlake.lake.home import CATALOG_FILE, PRIVATE_UMASK, DataDir, DataDirError
from meterlake.lake.query import QueryError, printable
from meterlake.loadtest import (
    Caller,
    LoadTestError,
    LoadTestPlan,
    dry_run_commands,
    invoke_url_from_parts,
    report_document,
    run_load_test,
    summary_lines,
)
from meterlake.records import TenantSourceKind

if TYPE_CHECKING:
    from meterlake.lake.compact import MaintenanceReport
    from meterlake.local.stream import DeliveryStream

app = typer.Typer(
    name="meterlake",
    help="Turn API traffic into billable usage: local pipeline, SQL, load test.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Piped output (make demo in CI, | less) gets a fixed width instead of rich's 80-column default.
# No emoji codes: a value such as ":smile:" is printed as it is.
# Soft wrap: a printed command (a hint, a URL) stays on one line, so pasting it runs it.
console = Console(width=None if sys.stdout.isatty() else 140, emoji=False, soft_wrap=True)
err_console = Console(stderr=True, emoji=False)


#: The highest TCP port.
_MAX_PORT = 65535
#: The exit code typer gives a command that Ctrl-C interrupted (128 + SIGINT).
_INTERRUPTED_EXIT = 130


class UsageError(Exception):
    """A command was given something it cannot use."""


@dataclass(frozen=True, slots=True)
class Context:
    """Options shared by every command."""

    config_path: Path | None
    home: Path | None

    def config(self) -> Config:
        """The validated config."""
        return load_config(self.config_path)

    def data_dir(self) -> DataDir:
        """The local runtime's data dir; from here on this process creates files 0600 and directories 0700."""
        # Every file the pipeline writes there (spool, Parquet, metadata, catalog, outbox, errors) is its user's only.
        os.umask(PRIVATE_UMASK)
        return DataDir.resolve(self.home)

    def writable_data_dir(self) -> DataDir:
        """The data dir, created and checked writable: for commands that write there.

        Raises:
            DataDirError: it cannot be created or written (a read-only file system, no permission).
        """
        return self.data_dir().ensure().require_writable()


#: ``--format`` of the commands that print a report: text for people, JSON for scripts.
_FORMAT = typer.Option("--format", help="text or json.")


def _json_format(fmt: str) -> bool:
    """Whether ``--format`` asks for JSON; refuses anything but text and json."""
    if fmt not in ("text", "json"):
        raise UsageError(f"--format must be text or json, got {fmt!r}")
    return fmt == "json"


def _print_json(document: object) -> None:
    """One JSON document on stdout, ending with a newline (values from data kept as they are)."""
    import json

    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _shown(value: object) -> str:
    """A value from data for a console line: control characters visible, rich markup escaped."""
    return escape(printable(str(value)))


def _print_version(value: bool) -> None:
    """``--version``: print the installed version and stop."""
    if value:
        import importlib.metadata

        print(f"meterlake {importlib.metadata.version('meterlake')}")
        raise typer.Exit()


@app.callback()
def _options(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="Config file (default: $METERLAKE_CONFIG or ./cdk.context.json).")
    ] = None,
    home: Annotated[
        Path | None, typer.Option("--home", help="Data dir (default: $METERLAKE_HOME or ./.meterlake).")
    ] = None,
) -> None:
    ctx.obj = Context(config_path=config, home=home)


def _context(ctx: typer.Context) -> Context:
    obj = ctx.obj
    assert isinstance(obj, Context)
    return obj


@app.command("config")
def show_config(ctx: typer.Context, fmt: Annotated[str, _FORMAT] = "text") -> None:
    """Validate the config and print what the pipeline will use: which file, which data dir, which settings."""
    as_json = _json_format(fmt)
    c = _context(ctx)
    config = c.config()
    source = config_file(c.config_path)
    data_dir = c.data_dir().root
    if as_json:
        import msgspec

        _print_json(
            {
                "config_file": None if source is None else str(source.resolve()),
                "data_dir": str(data_dir),
                "delivery_stream_name": config.data_firehose_configuration.delivery_stream_name,
                "config": msgspec.to_builtins(config),
            }
        )
        return
    console.print(
        f"config file      {_shown(source.resolve()) if source is not None else '(none: the defaults)'}",
        highlight=False,
    )
    console.print(f"data dir         {_shown(data_dir)}", highlight=False)
    firehose = config.data_firehose_configuration
    console.print(f"delivery stream  {_shown(firehose.delivery_stream_name)}")
    console.print(f"table            {_shown(config.database_name)}.{_shown(config.table_name)}")
    hints = firehose.buffering_hints
    console.print(f"buffering        {hints.size_in_mbs} MB or {hints.interval_in_seconds} s")
    processing = firehose.transform_records_with_aws_lambda
    console.print(f"transform buffer {processing.effective_buffer_size:g} MB, {processing.number_of_retries} retries")
    if processing.buffer_size_note is not None:
        console.print(f"note: {_shown(processing.buffer_size_note)}", soft_wrap=True)
    console.print(f"unmetered        {_shown(', '.join(config.meterlake.unmetered_http_methods) or '(none)')}")
    tenant_source = config.meterlake.tenant_source.source()
    tenants = f"${tenant_source.tenant_variable}"
    if tenant_source.kind is TenantSourceKind.API_KEY:
        tenants += f", mapped to {len(config.meterlake.tenant_source.tenants_by_api_key)} tenants"
    console.print(f"tenant           {_shown(tenants)}", highlight=False)


@app.command()
def init(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a starting cdk.context.json (or the --config file): every setting at its default, ready to edit."""
    import json

    import msgspec

    from meterlake.config import DEFAULT_CONFIG_FILE

    path = _context(ctx).config_path or Path(DEFAULT_CONFIG_FILE)
    if path.exists() and not force:
        raise UsageError(f"{path} exists; edit it, or give --force to replace it with the defaults")
    document = json.dumps(msgspec.to_builtins(Config()), indent=2) + "\n"
    try:
        path.write_text(document, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write ({exc.strerror})") from None
    console.print(
        f"wrote {_shown(path)}: every setting at its default; `meterlake config` checks it, `meterlake demo` runs it",
        highlight=False,
    )


@app.command("access-log-format")
def access_log_format(ctx: typer.Context) -> None:
    """Print API Gateway's access-log format, rendered from the one record definition for the tenant source."""
    print(_context(ctx).config().meterlake.tenant_source.access_log_format())


@app.command()
def token(
    ctx: typer.Context,
    tenant: Annotated[
        str | None, typer.Option(help="The tenant claim, custom:tenant_id unless configured (omit: no tenant).")
    ] = None,
    user: Annotated[str, typer.Option(help="cognito:username claim.")] = "demo-user",
    ttl: Annotated[int | None, typer.Option(help="Lifetime in seconds (default: config token_ttl_seconds).")] = None,
    port: Annotated[
        int | None,
        typer.Option(help="For the gateway on this port (default: the one `meterlake up` serves, else the config's)."),
    ] = None,
) -> None:
    """Issue an ID token from the local user pool, for the gateway `meterlake up` serves."""
    from meterlake.embedded.running import serving_gateway
    from meterlake.local.auth import for_config

    if not user:
        raise UsageError("--user must not be empty")
    if ttl is not None and ttl < 1:
        raise UsageError(f"--ttl must be at least 1, got {ttl}")
    _check_port(port)
    c = _context(ctx)
    data_dir = c.data_dir().ensure()
    if port is None:
        # The token must carry the issuer of the gateway actually serving: its port may not be the configured one.
        serving = serving_gateway(data_dir)
        port = serving.port if serving is not None else None
    pool = for_config(c.config(), data_dir, port=port)
    print(pool.issue_id_token(user=user, tenant_id=tenant, ttl_seconds=ttl))


def _check_port(port: int | None) -> None:
    """Refuse a port number TCP does not have (0 asks for any free port)."""
    if port is not None and not 0 <= port <= _MAX_PORT:
        raise UsageError(f"--port must be 0-{_MAX_PORT}, got {port}")


@app.command("api-key")
def api_key(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="A key id of meterlake.tenant_source.tenants_by_api_key.")],
) -> None:
    """Print the value of a local API key (send it as x-api-key), when tenants come from API keys."""
    from meterlake.local.auth import LocalApiKeys, for_config

    c = _context(ctx)
    config = c.config()
    source = config.meterlake.tenant_source
    if source.kind != TenantSourceKind.API_KEY.value:
        raise UsageError(f"meterlake.tenant_source.kind is {source.kind!r}: the local gateway takes no API keys")
    if key_id not in source.tenants_by_api_key:
        known = ", ".join(sorted(source.tenants_by_api_key)) or "none"
        raise UsageError(f"no API key {key_id!r} in meterlake.tenant_source.tenants_by_api_key (keys: {known})")
    print(LocalApiKeys.for_config(config, for_config(config, c.data_dir().ensure())).value(key_id))


@app.command()
def up(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Gateway port (default: config meterlake.local.port).")] = None,
) -> None:
    """Run the local pipeline until Ctrl-C or SIGTERM; on the way out everything acknowledged is flushed."""
    import logging

    from meterlake.embedded.running import recorded_as_serving
    from meterlake.embedded.stack import LocalStack
    from meterlake.local.serving import stop_signals

    _check_port(port)
    c = _context(ctx)
    config, data_dir = c.config(), c.writable_data_dir()
    _log_to_stderr()
    # Each flush, as it happens: events committed to which table, rejected (and where), dropped.
    logging.getLogger("meterlake.local.stream").setLevel(logging.INFO)
    with (
        stop_signals() as wait_for_stop,
        LocalStack(config=config, data_dir=data_dir, port=port) as stack,
        recorded_as_serving(
            data_dir, port=stack.gateway.port, issuer=stack.gateway.issuer, invoke_url=stack.gateway.invoke_url
        ),
    ):
        console.print(f"RestApiEndpoint {stack.gateway.invoke_url}", highlight=False)
        console.print(f"MeteringServiceEndpoint {stack.service.url}", highlight=False)
        console.print(
            f"data dir {_shown(data_dir.root)}; get a token: meterlake token --tenant acme --user alice; "
            f'try: curl -H "Authorization: $TOKEN" {stack.gateway.invoke_url}/random/strings?len=8',
            highlight=False,
        )
        hints = config.data_firehose_configuration.buffering_hints
        console.print(f"flushing to Iceberg every {hints.interval_in_seconds} s or {hints.size_in_mbs} MB")
        wait_for_stop()
        console.print("stopping: flushing the delivery stream ...")
        settled = stack.settle()
        console.print(
            f"flushed {settled.flush.ok_written} events and {settled.meter_events.ok_written} ingested usage "
            "events; stopped cleanly"
        )


def _log_to_stderr() -> None:
    """Show the pipeline's WARNING and ERROR log lines (refused requests, dry-run forwarding, ...) on stderr."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def demo(
    ctx: typer.Context,
    requests: Annotated[int, typer.Option(min=1, help="Requests the load test sends.")] = 3000,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent connections.")] = 32,
) -> None:
    """Run the pipeline end to end on this machine and reconcile answered requests with the lake, per tenant."""
    from meterlake.embedded.demo import run_demo

    c = _context(ctx)
    config, data_dir = c.config(), c.writable_data_dir()
    ok = run_demo(config=config, data_dir=data_dir, requests=requests, concurrency=concurrency, console=console)
    if not ok:
        raise typer.Exit(1)


@app.command("load-test")
def load_test(
    ctx: typer.Context,
    apigw_invoke_url: Annotated[
        str | None,
        typer.Option("--apigw-invoke-url", help="Invoke URL, e.g. https://ID.execute-api.REGION.amazonaws.com/prod"),
    ] = None,
    auth_token: Annotated[
        list[str] | None, typer.Option("--auth-token", help="ID token sent raw in Authorization (repeatable).")
    ] = None,
    api_key_value: Annotated[
        list[str] | None, typer.Option("--api-key", help="API key value sent in x-api-key (repeatable).")
    ] = None,
    max_count: Annotated[int | None, typer.Option("--max-count", help="Total requests (default 10).")] = None,
    duration: Annotated[float | None, typer.Option(help="Run for this many seconds instead of --max-count.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent connections.")] = 8,
    tenants: Annotated[
        int,
        typer.Option(
            min=0,
            help="Local gateway only: issue tokens for this many tenants (tenant-1 ...), or with tenants from API keys "
            "use the first N configured keys.",
        ),
    ] = 0,
    unauthenticated_share: Annotated[float, typer.Option(help="Share of requests sent without a token.")] = 0.0,
    not_found_share: Annotated[
        float, typer.Option(help="Share of requests sent to a route that does not exist.")
    ] = 0.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the curl commands instead of sending.")] = False,
    rest_api_id: Annotated[
        str | None, typer.Option("--rest-api-id", help="The REST API's id, instead of a URL (with --stage).")
    ] = None,
    stage: Annotated[str | None, typer.Option("--stage", help="Stage, with --rest-api-id (default prod).")] = None,
    region: Annotated[
        str | None,
        typer.Option(
            "--region",
            help="AWS region, with --rest-api-id (default us-east-1) or --cognito-client-id (default: $AWS_REGION, "
            "the profile's).",
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="AWS profile, with --cognito-client-id (default: $AWS_PROFILE).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed, for a repeatable request mix.")] = None,
    fmt: Annotated[str, _FORMAT] = "text",
    cognito_client_id: Annotated[
        str | None,
        typer.Option(
            "--cognito-client-id", help="Sign in to this Cognito app client (USER_PASSWORD_AUTH) for a token."
        ),
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="Cognito user, with --cognito-client-id.")] = None,
    password: Annotated[
        str | None,
        typer.Option(
            "--password",
            envvar="METERLAKE_PASSWORD",
            show_envvar=True,
            help="Cognito password, with --cognito-client-id (prompted for when not given).",
        ),
    ] = None,
    # run_test.py's spellings (the AWS sample's load test), accepted as they were documented, not shown.
    execution_id: Annotated[str | None, typer.Option("--execution-id", hidden=True)] = None,
    api_stage: Annotated[str | None, typer.Option("--api-stage", hidden=True)] = None,
    region_name: Annotated[str | None, typer.Option("--region-name", hidden=True)] = None,
    username: Annotated[str | None, typer.Option("--username", hidden=True)] = None,
) -> None:
    """Drive the API: the local gateway (`meterlake up`) or a real API Gateway stage; run_test.py's flags."""
    as_json = _json_format(fmt)
    rest_api_id = _one_spelling("--rest-api-id", rest_api_id, "--execution-id", execution_id)
    stage = _one_spelling("--stage", stage, "--api-stage", api_stage)
    region = _one_spelling("--region", region, "--region-name", region_name)
    user = _one_spelling("--user", user, "--username", username)
    url = apigw_invoke_url or invoke_url_from_parts(
        rest_api_id=rest_api_id, region=region or "us-east-1", stage=stage or "prod"
    )
    callers = [Caller(tenant_id=None, token=t) for t in auth_token or []]
    callers += [Caller(tenant_id=None, token=None, api_key=key) for key in api_key_value or []]
    if cognito_client_id:
        callers.append(_cognito_caller(cognito_client_id, user, password, region, profile))
    elif user is not None:
        raise UsageError("--user only applies with --cognito-client-id")
    elif profile is not None:
        raise UsageError("--profile only applies with --cognito-client-id")
    if tenants:
        c = _context(ctx)
        callers += _local_callers(c.config(), c.data_dir().ensure(), tenants, port=_loopback_port(url))
    if not callers:
        if unauthenticated_share < 1.0:
            raise UsageError(
                "no token: give --auth-token, --api-key or --cognito-client-id, or --tenants N against the local "
                "gateway"
            )
        callers = [Caller(tenant_id=None, token=None)]
    plan = LoadTestPlan(
        invoke_url=url,
        callers=tuple(callers),
        total=None if duration is not None and max_count is None else (10 if max_count is None else max_count),
        duration_s=duration,
        concurrency=concurrency,
        unauthenticated_share=unauthenticated_share,
        not_found_share=not_found_share,
        seed=seed,
    )
    if dry_run:
        for command in dry_run_commands(plan, plan.total or 10):
            print(command)
        return
    with Progress(
        TextColumn("load test"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("requests", total=plan.total)
        report = run_load_test(plan, on_progress=lambda n: progress.advance(task, n))
    if as_json:
        _print_json(report_document(report))
    else:
        for line in summary_lines(report):
            console.print(_shown(line), highlight=False)
    if report.interrupted:
        raise UsageError(f"interrupted after {report.answered} answered requests")
    failure = report.failure()
    if failure is not None:
        raise LoadTestError(failure)


def _one_spelling(option: str, value: str | None, alias: str, alias_value: str | None) -> str | None:
    """The value of an option given under its name or its older alias, refused when given under both."""
    if alias_value is None:
        return value
    if value is not None:
        raise UsageError(f"{alias} is the old spelling of {option}: give one of them")
    return alias_value


def _loopback_port(url: str) -> int | None:
    """The port of an http URL on loopback (the local gateway's), so tokens carry that gateway's issuer."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        return parts.port or 80
    except ValueError:
        return None


def _local_callers(config: Config, data_dir: DataDir, tenants: int, *, port: int | None) -> list[Caller]:
    """``tenants`` callers of the local gateway on ``port`` (None: the configured one), with the credentials its
    tenant source takes."""
    from meterlake.local.auth import LocalApiKeys, for_config

    pool = for_config(config, data_dir, port=port)
    source = config.meterlake.tenant_source
    if source.kind != TenantSourceKind.API_KEY.value:
        return [
            Caller(tenant_id=f"tenant-{i}", token=pool.issue_id_token(user=f"user-{i}", tenant_id=f"tenant-{i}"))
            for i in range(1, tenants + 1)
        ]
    mapped = list(source.tenants_by_api_key.items())
    if tenants > len(mapped):
        raise UsageError(
            f"--tenants {tenants}: tenants come from API keys, and meterlake.tenant_source.tenants_by_api_key maps "
            f"{len(mapped)}"
        )
    keys = LocalApiKeys.for_config(config, pool)
    return [Caller(tenant_id=tenant, token=None, api_key=keys.value(key_id)) for key_id, tenant in mapped[:tenants]]


def _aws(profile: str | None, region: str | None, *, service: str) -> Any:
    """The AWS session of a command (profile, credentials, region as the AWS CLI resolves them); says on stderr
    which region, from where, and which profile it uses."""
    from meterlake.aws import aws_session

    session = aws_session(profile=profile, region=region, option="--region", service=service)
    err_console.print(_shown(session.describe()), highlight=False, soft_wrap=True)
    return session


def _cognito_caller(
    client_id: str, username: str | None, password: str | None, region: str | None, profile: str | None
) -> Caller:
    """Sign in to Cognito for an ID token; the caller's tenant label is the token's custom:tenant_id."""
    from meterlake.aws.cognito import fetch_id_token, tenant_of

    if not username:
        raise UsageError("--cognito-client-id needs --user")
    client = _aws(profile, region, service="cognito-idp").client("cognito-idp")
    if password is None:
        password = typer.prompt(f"Cognito password for {username}", hide_input=True)
    token = fetch_id_token(
        client_id=client_id,
        username=username,
        password=password,
        region=client.meta.region_name,
        cognito_client=client,
    )
    return Caller(tenant_id=tenant_of(token), token=token)


@app.command()
def query(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="A query name from sql/ (see --list) or a .sql file.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Parameter as k=v (repeatable).")] = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="Window start, ISO-8601 (UTC if no zone): the start parameter.")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="Window end, exclusive: the end parameter.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    list_: Annotated[bool, typer.Option("--list", help="List the queries in sql/ and their parameters.")] = False,
    athena: Annotated[bool, typer.Option("--athena", help="Run on Amazon Athena instead of locally.")] = False,
    workgroup: Annotated[
        str, typer.Option("--workgroup", envvar="METERLAKE_ATHENA_WORKGROUP", help="Athena workgroup, with --athena.")
    ] = ATHENA_WORKGROUP,
    region: Annotated[
        str | None,
        typer.Option("--region", help="AWS region, with --athena (default: $AWS_REGION, the profile's)."),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="AWS profile, with --athena (default: $AWS_PROFILE).")
    ] = None,
    output_location: Annotated[
        str | None,
        typer.Option("--output-location", help="s3:// prefix for Athena's results (default: the workgroup's)."),
    ] = None,
    table_bucket: Annotated[
        str | None,
        typer.Option(
            "--table-bucket",
            help="With --athena and s3_tables: the table bucket (default: the config's, else the deployed stack's).",
        ),
    ] = None,
) -> None:
    """Run an Athena-dialect SQL query from sql/: locally (sqlglot -> DuckDB over the table's files) or on Athena."""
    from meterlake.lake.query import format_result, list_queries, load_query, parse_param_args, run_local_query

    if list_ or name is None:
        for q in list_queries():
            params = ", ".join(p.name for p in q.params)
            console.print(f"[bold]{_shown(q.name)}[/bold]  {_shown(q.description)}  [dim]params: {params or '-'}[/dim]")
        return
    if fmt not in ("table", "csv", "json"):
        raise UsageError(f"--format must be table, csv or json, got {fmt!r}")
    output: Literal["table", "csv", "json"] = fmt  # type: ignore[assignment]
    raw_params = parse_param_args(param or [])
    # --from/--to spell a window as `reconcile` does; they are the queries' start/end parameters.
    for option, bound, value in (("--from", "start", from_), ("--to", "end", to)):
        if value is not None:
            if bound in raw_params:
                raise UsageError(f"give {option} or --param {bound}=..., not both")
            raw_params[bound] = value
    c = _context(ctx)
    if not athena:
        if region is not None or output_location is not None or table_bucket is not None or profile is not None:
            raise UsageError("--region, --profile, --output-location and --table-bucket only apply with --athena")
        result = run_local_query(load_query(name), raw_params, config=c.config(), data_dir=c.data_dir())
        _say_what_is_not_committed_yet(c)
    else:
        from meterlake.aws.athena import deployed_table_bucket, run_athena_query

        config = c.config()
        aws = _aws(profile, region, service="athena")
        if config.s3_tables is not None and table_bucket is None:
            table_bucket = config.s3_tables.table_bucket_name or deployed_table_bucket(aws.client("cloudformation"))
        result = run_athena_query(
            load_query(name),
            raw_params,
            config=config,
            athena_client=aws.client("athena"),
            workgroup=workgroup,
            output_location=output_location,
            table_bucket=table_bucket,
        )
    sys.stdout.write(format_result(result, output))


def _say_what_is_not_committed_yet(c: Context) -> None:
    """On stderr: whether the delivery stream holds acknowledged lines the table (and so the query) does not have."""
    from meterlake.embedded.running import uncommitted_spool_bytes
    from meterlake.lake.catalog import ensure_metering_table, open_catalog

    data_dir, config = c.data_dir(), c.config()
    if not data_dir.catalog_db.exists():
        return
    pending = uncommitted_spool_bytes(data_dir, ensure_metering_table(open_catalog(data_dir), config))
    if pending:
        interval = config.data_firehose_configuration.buffering_hints.interval_in_seconds
        err_console.print(
            f"note: the delivery stream holds {pending} bytes of access-log lines not committed yet, so not in "
            f"this result: the next flush (within {interval} s while `meterlake up` runs) or `meterlake flush` "
            "commits them",
            highlight=False,
        )


@app.command()
def ingest(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="File of access-log lines, one per line, or - for stdin.")],
) -> None:
    """Put access-log lines into the local delivery stream and flush them into Iceberg.

    A line too long to be a record stops the ingest there: the lines before it are flushed, nothing after it is read.
    """
    from meterlake.local.stream import MAX_PUT_RECORD_BYTES, DeliveryStream, ingest_lines

    c = _context(ctx)
    config = c.config()
    path = None if source == "-" else Path(source)
    if path is not None and not path.is_file():
        raise UsageError(f"{source}: no such file")
    data_dir = c.writable_data_dir()
    stopped_at: list[tuple[int, int]] = []  # (line number, size) of the line that stopped the ingest

    def records(handle: Any) -> Iterator[bytes]:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = line.rstrip(b"\r\n")
            if len(record) > MAX_PUT_RECORD_BYTES:
                stopped_at.append((number, len(record)))
                return
            yield record

    with (
        sys.stdin.buffer if path is None else path.open("rb") as handle,
        DeliveryStream(config=config, data_dir=data_dir) as stream,
    ):
        count = ingest_lines(stream, records(handle))
        report = stream.flush()
    if stopped_at:
        number, size = stopped_at[0]
        raise UsageError(
            f"{'stdin' if path is None else source} line {number} is {size} bytes; a record may be at most "
            f"{MAX_PUT_RECORD_BYTES}: ingest stopped there; the {count} lines before it were acknowledged and flushed "
            f"(committed {report.ok_written}, rejected {report.failed}, dropped {report.dropped}); "
            "nothing after it was read"
        )
    console.print(
        f"acknowledged {count} lines; committed {report.ok_written}, rejected {report.failed}, "
        f"dropped {report.dropped}, duplicates skipped {report.duplicates_skipped}"
    )
    _say_where_rejects_went(report.failed, data_dir)


def _say_where_rejects_went(rejected: int, data_dir: DataDir) -> None:
    """After a flush that rejected records: where Firehose's error output (each line and its reason) went."""
    if rejected:
        console.print(
            f"{rejected} rejected records are kept, each with its reason, under {_shown(data_dir.errors)} "
            "(Firehose's error output prefix)",
            highlight=False,
        )


@app.command()
def flush(
    ctx: typer.Context,
    recover: Annotated[
        bool,
        typer.Option(
            "--recover",
            help="Deliver every readable record past damaged spool segments, kept in spool/quarantine/.",
        ),
    ] = False,
) -> None:
    """Commit whatever the delivery streams acknowledged but have not committed yet (e.g. after a crash): the access
    log's and, where the metering service has run, its meter events' (with the service stopped)."""
    from meterlake.local.stream import DeliveryStream
    from meterlake.service.delivery import METER_EVENT_SPOOL_DIR, open_meter_event_stream

    c = _context(ctx)
    config, data_dir = c.config(), c.writable_data_dir()
    with DeliveryStream(config=config, data_dir=data_dir, recover=recover) as stream:
        _say_recovered(stream)
        report = stream.flush()
    console.print(f"committed {report.ok_written}, rejected {report.failed}, dropped {report.dropped}")
    _say_where_rejects_went(report.failed, data_dir)
    if (data_dir.root / METER_EVENT_SPOOL_DIR).is_dir():
        with open_meter_event_stream(config, data_dir, recover=recover) as events:
            _say_recovered(events)
            flushed = events.flush()
        console.print(
            f"meter events: committed {flushed.ok_written}, duplicates skipped {flushed.duplicates_skipped}",
            highlight=False,
        )


def _say_recovered(stream: DeliveryStream) -> None:
    """What ``--recover`` repaired in ``stream``'s spool."""
    for repair in stream.recovered:
        console.print(f"recovered {_shown(repair.describe())}", highlight=False, soft_wrap=True)


@app.command()
def compact(ctx: typer.Context) -> None:
    """Rewrite the small files of closed days into large sorted ones (one replace commit), then expire old snapshots.

    What `meterlake up` also does on a schedule, and Glue's optimizers on AWS: for the access-log table, then for the
    metering service's meter-events table. Snapshots a forwarding outbox has not staged yet are kept.
    """
    import logging

    from meterlake.amberflo.outbox import Outbox
    from meterlake.lake.catalog import ensure_metering_table, open_catalog
    from meterlake.lake.compact import Retention, maintain
    from meterlake.schema import METER_EVENTS_TABLE
    from meterlake.service.forwarding import meter_events_outbox

    c = _context(ctx)
    config, data_dir = c.config(), c.writable_data_dir()
    # What maintenance logs for a schedule's log (a day it left as it is), this command prints in its report.
    logging.getLogger("meterlake.lake.compact").setLevel(logging.ERROR)
    catalog = open_catalog(data_dir)
    retention = Retention.from_config(config)
    table = ensure_metering_table(catalog, config)
    with Outbox.in_data_dir(data_dir, meters=config.meters, settings=config.amberflo) as outbox:
        report = maintain(
            data_dir, table, retention=retention, readers=lambda: [outbox.status().checkpoint_snapshot_id]
        )
    _say_maintained("", report)
    events_identifier = (config.database_name, METER_EVENTS_TABLE)
    if catalog.table_exists(events_identifier):
        events_table = catalog.load_table(events_identifier)
        with meter_events_outbox(data_dir, config.amberflo) as events_outbox:
            report = maintain(
                data_dir,
                events_table,
                retention=retention,
                readers=lambda: [events_outbox.status().checkpoint_snapshot_id],
            )
        _say_maintained("meter events: ", report)


def _say_maintained(prefix: str, report: MaintenanceReport) -> None:
    """What one table's maintenance did, in two lines starting with ``prefix``."""
    done, expiry = report.compaction, report.expiry
    for day in done.unreadable:
        err_console.print(
            # Already printable (compact escapes the error's control characters): only rich's markup is escaped.
            f"warning: {prefix}day {escape(day)}; the day was not compacted: restore the file from a copy",
            highlight=False,
            soft_wrap=True,
        )
    if done.snapshot_id is None:
        nothing = "nothing compacted" if done.unreadable else "nothing to compact: no closed day holds two small files"
        console.print(f"{prefix}{nothing}", highlight=False)
    else:
        console.print(
            f"{prefix}compacted {done.partitions} day(s): {done.files_replaced} files -> {done.files_written}, "
            f"{done.rows} rows unchanged (replace snapshot {done.snapshot_id})",
            highlight=False,
        )
    console.print(
        f"{prefix}expired {expiry.expired_snapshots} snapshot(s), kept {expiry.retained_snapshots}; "
        f"deleted {expiry.deleted_files} unreferenced file(s) ({expiry.deleted_bytes / 1e6:.1f} MB)",
        highlight=False,
    )


forward_app = typer.Typer(help="Forwarding of committed usage to Amberflo (the local outbox).", no_args_is_help=True)
meters_app = typer.Typer(help="The meters declared in the config, and their Amberflo twins.", no_args_is_help=True)
amberflo_app = typer.Typer(
    help="A local Amberflo-compatible server, for trying forwarding offline.", no_args_is_help=True
)
aws_app = typer.Typer(help="The AWS deployment: checks before and after `cdk deploy`.", no_args_is_help=True)
app.add_typer(aws_app, name="aws")
app.add_typer(forward_app, name="forward")
app.add_typer(meters_app, name="meters")
app.add_typer(amberflo_app, name="amberflo")


_REST_API_ID = typer.Option("--rest-api-id", help="The REST API's id (the first part of its execute-api host).")
_STAGE = typer.Option("--stage", help="The stage to meter.")
_PROFILE = typer.Option("--profile", help="AWS profile (default: $AWS_PROFILE).")
_REGION = typer.Option("--region", help="AWS region (default: the profile's).")


@aws_app.command("preflight")
def aws_preflight(
    ctx: typer.Context,
    profile: Annotated[str | None, _PROFILE] = None,
    region: Annotated[str | None, _REGION] = None,
) -> None:
    """Check what `cdk deploy` needs before it needs it (read-only): bootstrap, Lake Formation, names, secret."""
    from meterlake.aws.account import connect
    from meterlake.aws.preflight import Outcome, preflight

    config = _context(ctx).config()
    account = connect(profile=profile, region=region)
    console.print(
        f"account {_shown(account.account_id)}, region {_shown(account.region)} (from {_shown(account.region_source)})",
        highlight=False,
    )
    checks = preflight(config, account)
    for check in checks:
        console.print(
            f"{check.outcome.value:<5} {_shown(check.name)}: {_shown(check.detail)}", highlight=False, soft_wrap=True
        )
    failed = [check.name for check in checks if check.outcome is Outcome.FAIL]
    if failed:
        raise UsageError(f"{len(failed)} prerequisite(s) missing: {', '.join(failed)}")


@aws_app.command("attach")
def aws_attach(
    ctx: typer.Context,
    rest_api_id: Annotated[str, _REST_API_ID],
    stage: Annotated[str, _STAGE],
    profile: Annotated[str | None, _PROFILE] = None,
    region: Annotated[str | None, _REGION] = None,
) -> None:
    """Meter a REST API stage made outside this CDK app: its access log goes to the pipeline's stream."""
    from meterlake.aws.account import connect
    from meterlake.aws.attach import attach_stage

    account = connect(profile=profile, region=region)
    change = attach_stage(
        _context(ctx).config(),
        apigateway=account.client("apigateway"),
        apigatewayv2=account.client("apigatewayv2"),
        firehose=account.client("firehose"),
        rest_api_id=rest_api_id,
        stage=stage,
    )
    for warning in change.warnings:
        err_console.print(f"warning: {_shown(warning)}", highlight=False, soft_wrap=True)
    console.print(
        f"metered: {_shown(change.api_name)} ({change.rest_api_id}) stage {_shown(change.stage)} logs every request "
        f"to {change.stream_arn}",
        highlight=False,
        soft_wrap=True,
    )


@aws_app.command("detach")
def aws_detach(
    ctx: typer.Context,
    rest_api_id: Annotated[str, _REST_API_ID],
    stage: Annotated[str, _STAGE],
    profile: Annotated[str | None, _PROFILE] = None,
    region: Annotated[str | None, _REGION] = None,
) -> None:
    """Stop metering a stage that `meterlake aws attach` metered (its access log is removed)."""
    from meterlake.aws.account import connect
    from meterlake.aws.attach import detach_stage

    account = connect(profile=profile, region=region)
    change = detach_stage(
        _context(ctx).config(),
        apigateway=account.client("apigateway"),
        firehose=account.client("firehose"),
        rest_api_id=rest_api_id,
        stage=stage,
    )
    console.print(
        f"not metered: {_shown(change.api_name)} ({change.rest_api_id}) stage {_shown(change.stage)} no longer "
        f"logs to {change.stream_arn}",
        highlight=False,
        soft_wrap=True,
    )


@aws_app.command("check")
def aws_check(
    ctx: typer.Context,
    profile: Annotated[str | None, _PROFILE] = None,
    region: Annotated[str | None, _REGION] = None,
    tenants: Annotated[int, typer.Option(min=1, max=10, help="Check tenants, one Cognito user each.")] = 2,
    requests: Annotated[int, typer.Option(min=1, max=1000, help="Requests per tenant.")] = 20,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds to wait for the pipeline after the traffic (default: Firehose's buffering intervals + 600).",
        ),
    ] = None,
) -> None:
    """Prove the deployment: real tokens, real requests, counted in Athena and Amberflo (creates and deletes users)."""
    from meterlake.aws.account import connect
    from meterlake.aws.check import CheckFailed, run_check

    config = _context(ctx).config()
    account = connect(profile=profile, region=region)
    console.print(
        f"account {_shown(account.account_id)}, region {_shown(account.region)} (from {_shown(account.region_source)})",
        highlight=False,
    )
    report = run_check(
        config,
        account,
        tenants=tenants,
        requests_per_tenant=requests,
        timeout_s=timeout,
        say=lambda line: console.print(_shown(line), highlight=False, soft_wrap=True),
    )
    console.print(
        "\n[bold]reconciliation[/bold] (answered == counted in Athena; billable == api-calls units in Amberflo):"
    )
    for line in report.reconciliation.lines:
        console.print(_shown(line), style="green" if line.matches else "bold red", highlight=False, soft_wrap=True)
    for ids in report.request_id_lines():
        console.print(_shown(ids), highlight=False, soft_wrap=True)
    if not report.ok:
        raise CheckFailed(report.problems)


@aws_app.command("cost")
def aws_cost(
    ctx: typer.Context,
    requests_per_month: Annotated[
        int, typer.Option("--requests-per-month", min=1, help="Metered requests a month.")
    ] = 1_000_000,
    record_bytes: Annotated[
        int | None,
        typer.Option("--record-bytes", min=1, help="Access-log record size (default: the format, typical values)."),
    ] = None,
    athena_queries: Annotated[
        int, typer.Option("--athena-queries-per-month", min=0, help="Athena queries, each of one day of events.")
    ] = 30,
    fmt: Annotated[str, _FORMAT] = "text",
) -> None:
    """Estimate what the AWS pipeline costs a month and per million requests, from the config and us-east-1 list
    prices (dated in meterlake/aws/cost.py, with every assumption)."""
    from meterlake.aws.cost import Assumptions, estimate_cost, format_estimate

    as_json = _json_format(fmt)
    estimate = estimate_cost(
        _context(ctx).config(),
        requests_per_month=requests_per_month,
        record_bytes=record_bytes,
        assumptions=Assumptions(athena_queries_per_month=athena_queries),
    )
    if as_json:
        _print_json(estimate.as_json())
        return
    sys.stdout.write(format_estimate(estimate))


@aws_app.command("evolve")
def aws_evolve(
    ctx: typer.Context,
    table_bucket: Annotated[
        str | None, typer.Option("--table-bucket", help="With s3_tables: the table bucket (Storage output).")
    ] = None,
    fmt: Annotated[str, _FORMAT] = "text",
) -> None:
    """Print the Athena DDL that adds to the deployed table the fields the record gained since it was created (run
    it in Athena before deploying the transform that writes them)."""
    import dataclasses

    from meterlake.aws.evolve import AthenaTypeError, evolution
    from meterlake.lake.catalog import IncompatibleSchemaError

    as_json = _json_format(fmt)
    try:
        plan = evolution(_context(ctx).config(), table_bucket=table_bucket)
    except (AthenaTypeError, IncompatibleSchemaError) as exc:
        raise UsageError(str(exc)) from None
    if as_json:
        _print_json(dataclasses.asdict(plan))
    elif plan.statement is None:
        sys.stdout.write("the table as created has every field of the record: nothing to add\n")
    else:
        sys.stdout.write(f"-- in Athena, catalog {plan.catalog}; adds {', '.join(plan.columns)}\n{plan.statement};\n")


def _amberflo_key(config: Config) -> str | None:
    import os

    return os.environ.get(config.amberflo.api_key_env) or None


@forward_app.command("status")
def forward_status(ctx: typer.Context, fmt: Annotated[str, _FORMAT] = "text") -> None:
    """Show the outbox: backlog, lag, sent, dead-lettered, events without a tenant, and whether it is sending."""
    import dataclasses

    from meterlake.amberflo.outbox import Outbox

    as_json = _json_format(fmt)
    c = _context(ctx)
    config = c.config()
    with Outbox.in_data_dir(c.writable_data_dir(), meters=config.meters, settings=config.amberflo) as outbox:
        status = outbox.status()
    if as_json:
        _print_json(dataclasses.asdict(status))
        return
    if status.paused is not None:
        console.print(
            f"paused: {status.paused.describe()}; the backlog waits, nothing is dead-lettered", highlight=False
        )
    console.print(f"backlog        {status.pending_records} records in {status.pending_batches} batches")
    console.print(f"lag            {status.lag_seconds:.1f} s (age of the oldest unsent commit)")
    console.print(f"sent           {status.sent_records} records in {status.sent_batches} batches")
    console.print(f"dead-lettered  {status.dead_records} records in {status.dead_batches} batches")
    console.print(f"no tenant      {status.untenanted_events} events (never forwarded)")
    console.print(f"checkpoint     snapshot {status.checkpoint_snapshot_id} ({status.staged_snapshots} staged)")
    if status.last_error:
        console.print(f"last error     {_shown(status.last_error)}", highlight=False)
    # Whoever drains (an `up` holding the key, `forward run`) says how; this shell's environment does not tell.
    if status.last_drain is None:
        console.print("forwarding     not drained yet (`meterlake up` or `meterlake forward run` drains)")
    else:
        console.print(f"forwarding     {_shown(status.last_drain.describe())}", highlight=False)


@forward_app.command("retry-dead")
def forward_retry_dead(ctx: typer.Context) -> None:
    """Queue every dead-lettered batch again (after fixing what Amberflo refused); `forward run` or `up` sends them."""
    from meterlake.amberflo.outbox import Outbox

    c = _context(ctx)
    config = c.config()
    with Outbox.in_data_dir(c.writable_data_dir(), meters=config.meters, settings=config.amberflo) as outbox:
        for entry in outbox.dead_letters():
            console.print(
                f"batch {_shown(entry.batch_id)}: {entry.records} records, Amberflo said {entry.http_status}: "
                f"{_shown((entry.answer or '')[:160])}",
                highlight=False,
            )
        count = outbox.retry_dead()
    console.print(f"{count} dead-lettered batches queued again")


@forward_app.command("run")
def forward_run(ctx: typer.Context) -> None:
    """Stage what Iceberg committed since the last run and send the backlog once (what `up` does continuously): the
    access-log meters' records, then the metering service's ingested events (its own outbox)."""
    from meterlake.api import forward_once

    c = _context(ctx)
    config = c.config()
    result = forward_once(c.writable_data_dir(), config, api_key=_amberflo_key(config))
    report, events_report = result.drain, result.event_drain
    console.print(
        f"staged {result.staged_records} records; sent {report.sent_records} records in {report.sent_batches} "
        f"batches; dead-lettered {report.dead_batches} batches; still pending {report.pending_batches} batches"
    )
    console.print(
        f"meter events: staged {result.event_staged_records} records; sent {events_report.sent_records} records in "
        f"{events_report.sent_batches} batches; dead-lettered {events_report.dead_batches} batches; still pending "
        f"{events_report.pending_batches} batches"
    )
    if report.dry_run:
        console.print(f"dry run: ${config.amberflo.api_key_env} is not set (or amberflo.dry_run); nothing was sent")
    if report.paused is not None:
        raise UsageError(
            f"paused: {report.paused.describe()}; check ${config.amberflo.api_key_env}. "
            "The backlog stays queued; nothing was dead-lettered"
        )


@meters_app.command("list")
def meters_list(ctx: typer.Context) -> None:
    """Show the meters of the config: what counts, what each event contributes, which dimensions."""
    config = _context(ctx).config()
    for meter in config.meters:
        conditions = (
            " and ".join(
                f"{c.column} {c.op.replace('_', ' ')}" + ("" if c.value is None else f" {c.value!r}")
                for c in meter.filter
            )
            or "every event"
        )
        console.print(
            f"[bold]{_shown(meter.meter_api_name)}[/bold] ({_shown(meter.meter_type)}): {_shown(meter.label)}; "
            f"counts {_shown(conditions)}; value {_shown(repr(meter.value))}; "
            f"dimensions {_shown(', '.join(meter.dimensions) or '-')}",
            highlight=False,
        )


@meters_app.command("sync")
def meters_sync(ctx: typer.Context) -> None:
    """Create or update the config's meters in Amberflo (needs the API key)."""
    import httpx

    from meterlake.amberflo.sync import sync_meters

    config = _context(ctx).config()
    key = _amberflo_key(config)
    if key is None:
        raise UsageError(f"${config.amberflo.api_key_env} is not set: meters sync needs an Amberflo API key")
    with httpx.Client() as client:
        results = sync_meters(client, base_url=config.amberflo.base_url, api_key=key, meters=config.meters)
    for result in results:
        console.print(
            f"{_shown(result.meter_api_name)}: {_shown(result.action)} (id {_shown(result.meter_id)})", highlight=False
        )


@app.command()
def reconcile(
    ctx: typer.Context,
    from_: Annotated[str, typer.Option("--from", help="Start, ISO-8601 (UTC if no zone); whole hours are compared.")],
    to: Annotated[str, typer.Option("--to", help="End, ISO-8601, exclusive.")],
    repair: Annotated[
        bool, typer.Option(help="Re-send the lake's records of every bucket Amberflo is short of.")
    ] = False,
    fmt: Annotated[str, _FORMAT] = "text",
) -> None:
    """Compare usage per customer, meter and hour: the lake against Amberflo (or, dry, against what was staged), for
    the config's meters and the metering service's event meters."""
    import httpx

    from meterlake.amberflo.outbox import Outbox
    from meterlake.amberflo.reconcile import Window, amberflo_usage, compare, lake_usage, staged_usage
    from meterlake.amberflo.reconcile import repair as repair_usage
    from meterlake.service.forwarding import event_meter_usage, meter_events_outbox, staged_event_usage

    as_json = _json_format(fmt)
    c = _context(ctx)
    config, data_dir = c.config(), c.writable_data_dir()
    window = Window.covering(_timestamp("--from", from_), _timestamp("--to", to))
    key = _amberflo_key(config)
    lake = lake_usage(config, data_dir, window)
    # Event meters: rules leave Amberflo's numbers as they leave the lake's, not what was staged before them.
    events, event_meters = event_meter_usage(config, data_dir, window, apply_rules=key is not None)
    lake.update(events)
    with Outbox.in_data_dir(data_dir, meters=config.meters, settings=config.amberflo) as outbox:
        if key is None:
            staged = staged_usage(outbox, config.meters, window)
            staged.update(staged_event_usage(data_dir, config.amberflo, event_meters, window))
            report = compare(lake, staged, against="staged records (dry run)")
        else:
            with httpx.Client() as client:
                other = amberflo_usage(
                    client,
                    base_url=config.amberflo.base_url,
                    api_key=key,
                    meters=[*config.meters, *event_meters],
                    window=window,
                )
            report = compare(lake, other, against=f"Amberflo at {config.amberflo.base_url}")
        queued = None
        if repair and report.missing:
            with meter_events_outbox(data_dir, config.amberflo) as event_outbox:
                queued = repair_usage(
                    report, config=config, data_dir=data_dir, outbox=outbox, event_outbox=event_outbox
                )
    if as_json:
        _print_json(
            {
                "against": report.against,
                "buckets": report.buckets,
                "differences": [
                    {
                        "customer_id": d.customer_id,
                        "meter_api_name": d.meter_api_name,
                        "hour": datetime.fromtimestamp(d.hour_s, UTC).strftime("%Y-%m-%dT%H:00:00Z"),
                        "lake": d.lake,
                        "other": d.other,
                    }
                    for d in report.differences
                ],
                "repaired_records": queued,
            }
        )
    else:
        console.print(
            f"{report.buckets} customer/meter/hour buckets compared against {_shown(report.against)}; "
            f"{len(report.differences)} differ",
            highlight=False,
        )
        for d in report.differences:
            hour = datetime.fromtimestamp(d.hour_s, UTC).strftime("%Y-%m-%dT%H:00Z")
            console.print(
                f"  {_shown(d.customer_id)} {_shown(d.meter_api_name)} {hour}: lake {d.lake:g}, other {d.other:g}",
                highlight=False,
            )
        if queued is not None:
            console.print(f"repair: {queued} records queued again (same uniqueIds); `meterlake forward run` sends them")
    if report.differences and not repair:
        raise typer.Exit(1)


def _timestamp(option: str, value: str) -> datetime:
    from meterlake.window import WindowError, parse_instant

    try:
        return parse_instant(value, name=option)
    except WindowError as exc:
        raise UsageError(str(exc)) from None


@amberflo_app.command("serve")
def amberflo_serve(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free one).")] = 8851,
    api_key: Annotated[str, typer.Option("--api-key", help="The X-API-KEY it accepts.")] = "local-api-key",
    transient_rate: Annotated[
        float, typer.Option(help="Share of ingest requests answered with a transient fault.")
    ] = 0.0,
) -> None:
    """Run a local Amberflo-compatible server (ingest, usage, meters) until Ctrl-C."""
    from meterlake.amberflo.server import FaultPlan, LocalAmberflo
    from meterlake.local.serving import stop_signals

    with (
        stop_signals() as wait_for_stop,
        LocalAmberflo(api_key=api_key, port=port, faults=FaultPlan(transient_rate=transient_rate)) as server,
    ):
        console.print(
            f"local Amberflo on {server.url} (X-API-KEY: {_shown(api_key)}); point amberflo.base_url at it",
            highlight=False,
        )
        wait_for_stop()


keys_app = typer.Typer(
    help="X-API-KEY keys of the metering service: stored as digests, each shown once.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


def _service_pool(config: Config, data_dir: DataDir) -> Any:
    """The local user pool whose tokens the service takes: the serving gateway's issuer, else the configured one."""
    from meterlake.embedded.running import serving_gateway
    from meterlake.local.auth import for_config

    serving = serving_gateway(data_dir)
    return for_config(config, data_dir, port=serving.port if serving is not None else None)


@app.command()
def serve(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Port (default: config meterlake.service.port; 0: any).")] = None,
) -> None:
    """Run the metering service on loopback until Ctrl-C or SIGTERM: meters, ingest, usage and cancellation in the
    SaaS Builder Toolkit's dialect and Amberflo's, described at /openapi.json."""
    from meterlake.local.serving import stop_signals
    from meterlake.service.local import LocalMeteringService

    _check_port(port)
    c = _context(ctx)
    config, data_dir = c.config(), c.writable_data_dir()
    with (
        stop_signals() as wait_for_stop,
        LocalMeteringService(
            config=config,
            data_dir=data_dir,
            port=port,
            user_pool=_service_pool(config, data_dir),
            amberflo=config.amberflo,
            amberflo_api_key=_amberflo_key(config),
        ) as service,
    ):
        console.print(f"MeteringServiceEndpoint {service.url}", highlight=False)
        console.print(
            f"API: {service.url}/openapi.json; a key: meterlake keys create --admin (or --tenant acme); "
            "a control-plane token: meterlake admin-token",
            highlight=False,
        )
        wait_for_stop()
        console.print("stopping: committing acknowledged events ...")
        report = service.settle()
        console.print(f"committed {report.ok_written} events; stopped cleanly")


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    admin: Annotated[bool, typer.Option("--admin", help="A key that may do everything.")] = False,
    tenant: Annotated[
        str | None, typer.Option(help="A key bound to this customerId (ingest and read its own).")
    ] = None,
    label: Annotated[str, typer.Option(help="A note kept with the key.")] = "",
) -> None:
    """Make a key and print it (on stdout, alone): it is shown this once, the service keeps only its digest."""
    from meterlake.service.auth import ApiKeys
    from meterlake.service.store import ServiceStore

    if admin == (tenant is not None):
        raise UsageError("give --admin or --tenant CUSTOMER_ID (one of them)")
    with ServiceStore.in_data_dir(_context(ctx).writable_data_dir()) as store:
        try:
            info, key = ApiKeys(store).create(role="admin" if admin else "tenant", customer_id=tenant, label=label)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    err_console.print(f"key {info.key_id} ({info.role}{'' if tenant is None else ' ' + _shown(tenant)})")
    print(key)


@keys_app.command("list")
def keys_list(ctx: typer.Context) -> None:
    """List the keys: id, role, customer, when made and revoked (never the keys themselves)."""
    from meterlake.service.auth import ApiKeys
    from meterlake.service.store import ServiceStore

    with ServiceStore.in_data_dir(_context(ctx).data_dir().ensure()) as store:
        for info in ApiKeys(store).list_keys():
            made = datetime.fromtimestamp(info.created_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            revoked = "" if info.revoked_ms is None else "  revoked"
            console.print(
                f"{info.key_id}  {info.role:<6}  {_shown(info.customer_id or '-')}  {made}  "
                f"{_shown(info.label)}{revoked}",
                highlight=False,
            )


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="The key's id (keys list).")]) -> None:
    """Revoke a key: the service refuses it within a second."""
    from meterlake.service.auth import ApiKeys
    from meterlake.service.store import ServiceStore

    with ServiceStore.in_data_dir(_context(ctx).writable_data_dir()) as store:
        if not ApiKeys(store).revoke(key_id):
            raise UsageError(f"no active key {key_id!r} (see meterlake keys list)")
    console.print(f"revoked {_shown(key_id)}", highlight=False)


customers_app = typer.Typer(help="Customers in Amberflo: tenants onboarded to billing.", no_args_is_help=True)
app.add_typer(customers_app, name="customers")


@customers_app.command("onboard")
def customers_onboard(
    ctx: typer.Context,
    customer_id: Annotated[str, typer.Argument(help="The tenant's customerId (its tenantId).")],
    name: Annotated[str | None, typer.Option(help="The customer's name (default: the customerId).")] = None,
    email: Annotated[str | None, typer.Option(help="The customer's email.")] = None,
    trait: Annotated[list[str] | None, typer.Option(help="A trait KEY=VALUE (repeatable).")] = None,
) -> None:
    """Create the tenant's Amberflo customer, or update it if it exists (as the service does on onboarding)."""
    from meterlake.amberflo.api import RequestError, parse_customer
    from meterlake.service.forwarding import AmberfloMirror, MirrorError

    config = _context(ctx).config()
    key = _amberflo_key(config)
    if key is None or config.amberflo.dry_run:
        raise UsageError(f"forwarding to Amberflo is off: set {config.amberflo.api_key_env} (and no dry run)")
    traits = dict(item.partition("=")[::2] for item in trait or [])
    body: dict[str, object] = {"customerId": customer_id, "customerName": name or customer_id, "traits": traits}
    if email is not None:
        body["customerEmail"] = email
    try:
        customer = parse_customer(body)
    except RequestError as exc:
        raise UsageError(exc.message) from None
    mirror = AmberfloMirror(base_url=config.amberflo.base_url, api_key=key)
    try:
        action = mirror.ensure_customer(customer)
    except MirrorError as exc:
        raise UsageError(str(exc)) from None
    finally:
        mirror.close()
    console.print(f"{action} customer {_shown(customer_id)} in Amberflo", highlight=False)


@app.command("admin-token")
def admin_token(
    ctx: typer.Context,
    user: Annotated[str, typer.Option(help="The admin's user name.")] = "admin",
) -> None:
    """Print a control-plane access token of the admin group (meterlake.service.admin_group) from the local user pool,
    as the toolkit's control plane sends: Authorization: Bearer <token>."""
    c = _context(ctx)
    config = c.config()
    pool = _service_pool(config, c.data_dir().ensure())
    print(pool.issue_access_token(user=user, groups=[config.meterlake.service.admin_group]))


def _fail(message: str) -> NoReturn:
    # One line, whatever the message carries (a file name, Amberflo's answer): control characters made visible.
    sys.stderr.write(f"error: {printable(message, escape_backslash=False)}\n")
    raise SystemExit(2)


def _shortened(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (a database's message may quote a whole damaged value)."""
    return text if len(text) <= limit else text[:limit] + " ..."


def _os_error(exc: OSError) -> str:
    """A failure of the environment (read-only or full file system, no permission) as one line: path, reason, errno."""
    reason = exc.strerror or str(exc)
    name = errno.errorcode.get(exc.errno) if exc.errno else None
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{reason}" + (f" ({name})" if name else "")


def main() -> None:
    """Console-script entry: run the app, turning known failures into one line."""
    from sqlalchemy.exc import DBAPIError

    from meterlake.amberflo.outbox import OutboxError
    from meterlake.amberflo.reconcile import ReconcileError
    from meterlake.amberflo.sync import MeterSyncError
    from meterlake.aws import AwsError
    from meterlake.lake.compact import MaintenanceError
    from meterlake.local.auth import InvalidClaimError, InvalidToken, SigningKeyError
    from meterlake.local.gateway import GatewayError
    from meterlake.local.serving import ServingError
    from meterlake.local.stream import StreamError
    from meterlake.service.registry import RegistryConflictError
    from meterlake.service.store import StoreError

    try:
        code = app(prog_name="meterlake", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        # `meterlake` (or a group) alone: its help, as click prints it, and click's exit code for it.
        print(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        raise SystemExit(exc.exit_code) from None
    except CommandLineError as exc:
        # A mistyped option or a bad value: one line naming it, never click's framed box.
        where = exc.ctx.command_path if exc.ctx is not None else "meterlake"
        _fail(f"{where}: {' '.join(exc.format_message().split())} (see {where} --help)")
    except typer.Abort:
        _fail("aborted")
    except (
        ConfigError,
        QueryError,
        LoadTestError,
        UsageError,
        GatewayError,
        StreamError,
        InvalidToken,
        AwsError,
        OutboxError,
        ReconcileError,
        MeterSyncError,
        ServingError,
        DataDirError,
        SigningKeyError,
        InvalidClaimError,
        MaintenanceError,
        StoreError,
        RegistryConflictError,
    ) as exc:
        _fail(str(exc))
    except OSError as exc:
        # The disk filled up or became read-only under a command, past what its own errors name.
        _fail(_os_error(exc))
    except DBAPIError as exc:
        # The Iceberg catalog's SQLite database failed under a command: damaged past its header (which opening it
        # checks, see open_catalog), or locked by another process for longer than SQLite waits.
        _fail(f"the data dir's Iceberg catalog ({CATALOG_FILE}) failed: {_shortened(str(exc.orig))}")
    except KeyboardInterrupt:
        _fail("interrupted")
    if code == _INTERRUPTED_EXIT:
        # typer turns Ctrl-C into this exit code, silently: say what happened.
        _fail("interrupted")
    # As click's standalone mode ends: always by SystemExit, 0 unless the command said otherwise.
    raise SystemExit(code if isinstance(code, int) else 0)
