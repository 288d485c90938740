"""meterlake's Python API: the main jobs in a few calls, for scripts and notebooks.

What ``meterlake`` does on the command line, as functions: query usage (:func:`query_usage`), run the local stack
(:func:`run_local_stack`), forward committed usage to Amberflo (:func:`forward`). Each takes the data dir and the
config file as the command line does (``home``: else ``$METERLAKE_HOME``, else ./.meterlake; ``config``: else
``$METERLAKE_CONFIG``, else ./cdk.context.json, else the defaults). These names are the stable surface; the modules
behind them may change. They are also importable from the package itself (``meterlake.query_usage``), where they are
loaded on first use, so ``import meterlake`` stays cheap.

Example (README.md's "Python API" runs it in full, and a test runs the README's)::

    import httpx
    import meterlake

    with meterlake.run_local_stack(port=0) as stack:
        token = stack.token(tenant="acme", user="alice")
        httpx.get(f"{stack.invoke_url}/random/strings", headers={"Authorization": token})
    usage = meterlake.query_usage("usage_per_tenant_day", params={"tenant_id": "acme"})
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meterlake.amberflo.outbox import DrainReport
    from meterlake.config import Config
    from meterlake.embedded.stack import LocalStack, Settled
    from meterlake.lake.home import DataDir
    from meterlake.lake.query import QueryResult

__all__ = ["ForwardResult", "RunningStack", "forward", "query_usage", "run_local_stack"]


def query_usage(
    query: str = "usage_per_tenant_day",
    *,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    params: Mapping[str, str] | None = None,
    home: Path | str | None = None,
    config: Path | str | None = None,
) -> QueryResult:
    """Run a query of ``sql/`` (by name, or a path to a ``.sql`` file) over the local table, as ``meterlake query``.

    Args:
        query: The query's name (``meterlake query --list``) or a ``.sql`` file.
        start: The window's start (the query's ``start`` parameter): ISO-8601 text (UTC without a zone) or a
            datetime (naive is UTC). None: the query's default.
        end: The window's end, exclusive (the ``end`` parameter).
        params: Other parameters by name, as text (``{"tenant_id": "acme"}``).
        home: The data dir.
        config: The config file.

    Returns:
        The result: ``columns``, ``rows`` (timestamps are aware UTC datetimes), ``to_arrow()``.

    Raises:
        meterlake.lake.query.QueryError: the query is unknown or malformed, or a parameter is (e.g. an end not
            after its start).
        meterlake.config.ConfigError: the config file cannot be read or holds a bad value.
    """
    from meterlake.config import load_config
    from meterlake.lake.home import DataDir
    from meterlake.lake.query import QueryParamError, load_query, run_local_query

    raw = dict(params or {})
    for name, value in (("start", start), ("end", end)):
        if value is not None:
            if name in raw:
                raise QueryParamError(name, f"given as {name}= and in params; give it once")
            raw[name] = _instant_text(value)
    return run_local_query(load_query(query), raw, config=load_config(config), data_dir=DataDir.resolve(home))


@dataclass(frozen=True, slots=True)
class RunningStack:
    """The local stack :func:`run_local_stack` started: its URLs, tokens for it, and the stack itself."""

    #: Everything that runs (gateway, delivery stream, forwarding, maintenance, metering service).
    stack: LocalStack

    @property
    def invoke_url(self) -> str:
        """The gateway's invoke URL, e.g. ``http://127.0.0.1:8850/prod`` (GET ``/random/strings`` is metered)."""
        return self.stack.gateway.invoke_url

    @property
    def service_url(self) -> str:
        """The metering service's base URL (``/openapi.json`` describes it)."""
        return self.stack.service.url

    def token(self, *, tenant: str | None, user: str = "demo-user") -> str:
        """An ID token from the gateway's user pool, sent raw in ``Authorization`` (``tenant`` None: no tenant)."""
        return self.stack.gateway.user_pool.issue_id_token(user=user, tenant_id=tenant)

    def settle(self) -> Settled:
        """Commit every request answered so far to the table, then let the forwarder send what was committed."""
        return self.stack.settle()


@contextmanager
def run_local_stack(
    *, port: int | None = None, home: Path | str | None = None, config: Path | str | None = None
) -> Iterator[RunningStack]:
    """Run the local pipeline (what ``meterlake up`` runs) for the ``with`` block; on leaving it the stack stops as
    ``up`` does: everything the gateway answered is committed, and the forwarder makes a last attempt to send.

    Args:
        port: The gateway's port (None: the config's ``meterlake.local.port``; 0: any free one, and the metering
            service on any free one too).
        home: The data dir.
        config: The config file.

    Raises:
        meterlake.config.ConfigError: the config file cannot be read or holds a bad value.
        meterlake.lake.home.DataDirError: the data dir cannot be created or written.
        meterlake.local.gateway.GatewayError: the port is taken.
    """
    from meterlake.config import load_config
    from meterlake.embedded.stack import LocalStack
    from meterlake.lake.home import DataDir

    data_dir = DataDir.resolve(home).ensure().require_writable()
    with LocalStack(config=load_config(config), data_dir=data_dir, port=port) as stack:
        yield RunningStack(stack)


@dataclass(frozen=True, slots=True)
class ForwardResult:
    """What :func:`forward` did, per outbox: records staged from the table's new commits and the drain of the backlog,
    for the access-log meters and for the metering service's ingested events."""

    staged_records: int
    drain: DrainReport
    event_staged_records: int
    event_drain: DrainReport


def forward(
    *, api_key: str | None = None, home: Path | str | None = None, config: Path | str | None = None
) -> ForwardResult:
    """Stage what the tables committed since the last run and send the backlog to Amberflo once, as
    ``meterlake forward run`` (exactly once per record: uniqueIds are stable, the outboxes keep what was sent).

    Args:
        api_key: Amberflo's API key; None: the environment variable the config names (``amberflo.api_key_env``), and
            when that is unset a dry run (records staged, nothing sent; ``drain.dry_run`` says so).
        home: The data dir.
        config: The config file.

    Raises:
        meterlake.config.ConfigError: the config file cannot be read or holds a bad value.
        meterlake.amberflo.outbox.OutboxError: an outbox cannot be used (e.g. it belongs to another table).
    """
    import os

    from meterlake.config import load_config
    from meterlake.lake.home import DataDir

    settings = load_config(config)
    data_dir = DataDir.resolve(home).ensure().require_writable()
    key = api_key if api_key is not None else os.environ.get(settings.amberflo.api_key_env) or None
    return forward_once(data_dir, settings, api_key=key)


def forward_once(data_dir: DataDir, settings: Config, *, api_key: str | None) -> ForwardResult:
    """One forwarding pass over both outboxes (what :func:`forward` and ``meterlake forward run`` do): the access-log
    meters' records first, then the metering service's events; ``api_key`` None is a dry run."""
    from meterlake.amberflo.forwarder import Forwarder
    from meterlake.amberflo.outbox import Outbox
    from meterlake.lake.catalog import ensure_meter_events_table, ensure_metering_table, open_catalog
    from meterlake.service.forwarding import meter_events_outbox

    catalog = open_catalog(data_dir)
    table = ensure_metering_table(catalog, settings)
    events_table = ensure_meter_events_table(catalog, settings)
    with (
        Outbox.in_data_dir(data_dir, meters=settings.meters, settings=settings.amberflo) as outbox,
        meter_events_outbox(data_dir, settings.amberflo) as events_outbox,
        Forwarder(settings.amberflo) as forwarder,
    ):
        staged = outbox.stage_committed(table)
        drain = outbox.drain(forwarder, api_key=api_key)
        event_staged = events_outbox.stage_committed(events_table)
        event_drain = events_outbox.drain(forwarder, api_key=api_key)
    return ForwardResult(staged_records=staged, drain=drain, event_staged_records=event_staged, event_drain=event_drain)


def _instant_text(value: str | datetime) -> str:
    """A window bound as the queries' parameters take it: ISO-8601 text, a naive datetime read as UTC."""
    if isinstance(value, str):
        return value
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.isoformat()
