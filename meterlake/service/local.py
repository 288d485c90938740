"""The service's local adapter: the meter-event delivery stream in the data dir (the Firehose stand-in), and the
whole service wired on this machine (:class:`LocalMeteringService`, what ``meterlake serve`` and ``meterlake up`` run).

On AWS (a later issue) a Firehose stream takes this stream's place; the rows and their table are the same.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from types import TracebackType

from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from meterlake.amberflo.forwarder import Forwarder
from meterlake.amberflo.outbox import ForwardingWorker
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.local.auth import UserPool
from meterlake.local.serving import BackgroundServer, bind_listening_socket
from meterlake.local.stream import DeliveryStream, FlushReport, StreamTarget
from meterlake.schema import METER_EVENT_KEY_COLUMNS, METER_EVENTS_TABLE
from meterlake.service.app import create_app
from meterlake.service.auth import ApiKeys, Authenticator, JwtVerifier
from meterlake.service.cancellation import CancellationRules
from meterlake.service.durable import GroupCommitSink
from meterlake.service.forwarding import AmberfloMirror, meter_events_outbox
from meterlake.service.ingest import Ingestor
from meterlake.service.operations import MeteringService, Mirror
from meterlake.service.registry import MeterRegistry
from meterlake.service.store import ServiceStore
from meterlake.service.usage import UsageEngine

#: The meter-event stream's name (its commits' snapshot summaries and error files carry it).
METER_EVENT_STREAM = "meterlake-meter-events"
#: Its spool directory under the data dir, beside the access-log stream's ``spool``.
METER_EVENT_SPOOL_DIR = "spool-meter-events"
#: The interpreter's switch interval (seconds) while the service runs (see ``LocalMeteringService.__enter__``).
SWITCH_INTERVAL_S = 0.0005


def meter_event_target(config: Config, data_dir: DataDir) -> StreamTarget:
    """Where the meter-event stream spools and delivers: the meter_events table, deduplicated on (meter, uniqueId)."""
    settings = config.meterlake.service

    def ensure(catalog: Catalog) -> Table:
        return ensure_meter_events_table(catalog, config)

    return StreamTarget(
        name=METER_EVENT_STREAM,
        spool_dir=data_dir.root / METER_EVENT_SPOOL_DIR,
        destination=(config.database_name, METER_EVENTS_TABLE),
        ensure_table=ensure,
        key_columns=METER_EVENT_KEY_COLUMNS,
        size_in_mbs=settings.buffer_size_mb,
        interval_in_seconds=settings.buffer_interval_s,
    )


def open_meter_event_stream(
    config: Config,
    data_dir: DataDir,
    *,
    on_commit: Callable[[int], None] | None = None,
    recover: bool = False,
) -> DeliveryStream:
    """Open the meter-event delivery stream (resuming what a previous run acknowledged); call ``start`` to flush on
    its buffering hints.

    Raises:
        StreamError: its spool is in use by another process, damaged or unusable (see DeliveryStream).
    """
    return DeliveryStream(
        config=config,
        data_dir=data_dir,
        on_commit=on_commit,
        recover=recover,
        target=meter_event_target(config, data_dir),
    )


class LocalMeteringService:
    """The metering service on this machine: registry and keys in the data dir, the meter-event stream, the usage
    engine over the local lake, and the ASGI app served on loopback from a background thread.

    ``user_pool`` verifies Bearer tokens (None: only X-API-KEY callers); ``access_log_stream`` is committed before
    request-meter usage is read, when the access-log stream runs in the same process (``meterlake up``).

    With ``amberflo`` settings, committed events are forwarded through the meter-event outbox (a dry run without
    ``amberflo_api_key``); with the key too, meter changes and cancellation rules are repeated in Amberflo.

    Raises (from ``__enter__``):
        StreamError: the meter-event stream's spool is in use or damaged.
        RegistryConflictError: a config meter is named like an event meter.
        ServingError: the port is taken or the server does not start.
    """

    def __init__(
        self,
        *,
        config: Config,
        data_dir: DataDir,
        port: int | None = None,
        user_pool: UserPool | None = None,
        access_log_stream: DeliveryStream | None = None,
        amberflo: AmberfloSettings | None = None,
        amberflo_api_key: str | None = None,
    ) -> None:
        self.config = config
        self.data_dir = data_dir.ensure()
        self._port = config.meterlake.service.port if port is None else port
        self._user_pool = user_pool
        self._access_log_stream = access_log_stream
        self._amberflo = amberflo
        self._api_key = amberflo_api_key
        self._closers: list[Callable[[], object]] = []
        self._server: BackgroundServer | None = None
        #: The meter-event forwarding worker (None without ``amberflo`` settings).
        self.forwarding: ForwardingWorker | None = None

    def __enter__(self) -> LocalMeteringService:
        settings = self.config.meterlake.service
        # The event loop gives up the GIL at every socket call, and the flusher's Python (decoding, dedup, commits)
        # then kept it for up to the default 5 ms switch interval each time: ingest answered ~20% fewer records/s
        # while a flush ran. A shorter interval bounds that wait; it is only ever lowered, for the whole process.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        try:
            # Create the catalog and tables before any thread (the forwarding worker, the flusher) opens them.
            catalog = open_catalog(self.data_dir)
            ensure_metering_table(catalog, self.config)
            ensure_meter_events_table(catalog, self.config)
            self.store = ServiceStore.in_data_dir(self.data_dir)
            self._closers.append(self.store.close)
            self.registry = MeterRegistry(self.store, self.config.meters)
            self.rules = CancellationRules(self.store)
            self.keys = ApiKeys(self.store)
            mirror = self._start_forwarding()
            self.stream = open_meter_event_stream(self.config, self.data_dir, on_commit=self._committed)
            self._closers.append(self.stream.close)
            self.stream.start()
            sink = GroupCommitSink(self.stream)
            self._closers.append(sink.close)
            ingestor = Ingestor(registry=self.registry, settings=settings, sink=sink)
            usage = UsageEngine(
                config=self.config,
                data_dir=self.data_dir,
                registry=self.registry,
                rules=self.rules,
                before_read=self._commit_pending,
            )
            self.service = MeteringService(
                registry=self.registry, rules=self.rules, ingestor=ingestor, usage=usage, mirror=mirror
            )
            tokens = None
            if self._user_pool is not None:
                pool = self._user_pool
                tokens = JwtVerifier(
                    jwks=pool.jwks(),
                    issuer=pool.issuer,
                    client_id=pool.client_id,
                    admin_group=settings.admin_group,
                    tenant_claim=pool.tenant_claim,
                )
            app = create_app(
                self.service, Authenticator(keys=self.keys, tokens=tokens), max_body_bytes=settings.max_body_bytes
            )
            self._server = BackgroundServer(
                app, bind_listening_socket(settings.host, self._port), name="metering-service", graceful_shutdown_s=2.0
            )
        except BaseException:
            self._close_parts()
            raise
        # What starting made (modules, the catalog, the app) lives as long as the service: frozen, it is not walked
        # by every full collection that ingest's and the flusher's allocations set off (~3 s of a 200k-record run).
        gc.collect()
        gc.freeze()
        return self

    def _start_forwarding(self) -> Mirror | None:
        """Start forwarding committed events (and return the Amberflo mirror) when Amberflo settings are given."""
        settings = self._amberflo
        if settings is None:
            return None
        outbox = meter_events_outbox(self.data_dir, settings)
        self._closers.append(outbox.close)
        forwarder = Forwarder(settings)
        self._closers.append(forwarder.close)
        config, data_dir = self.config, self.data_dir
        self.forwarding = ForwardingWorker(
            outbox,
            load_table=lambda: ensure_meter_events_table(open_catalog(data_dir), config),
            forwarder=forwarder,
            api_key=self._api_key,
        )
        self.forwarding.start()
        self._closers.append(self.forwarding.stop)
        if self._api_key is None or settings.dry_run:
            return None
        mirror = AmberfloMirror(base_url=settings.base_url, api_key=self._api_key)
        self._closers.append(mirror.close)
        return mirror

    def _committed(self, _snapshot_id: int) -> None:
        if self.forwarding is not None:
            self.forwarding.wake()

    @property
    def url(self) -> str:
        """The service's base URL, e.g. ``http://127.0.0.1:8852``."""
        if self._server is None:
            raise RuntimeError("the metering service is not running")
        return self._server.url

    def _commit_pending(self) -> None:
        """Read-your-writes: commit what ingest acknowledged (and the access log, in ``up``) before a usage query."""
        for stream in (self.stream, self._access_log_stream):
            if stream is not None and stream.stats().pending_bytes > 0:
                stream.flush()

    def settle(self, *, forward_timeout_s: float = 60.0) -> FlushReport:
        """Commit every acknowledged event to meter_events, then let forwarding stage and send what was committed."""
        report = self.stream.flush()
        if self.forwarding is not None:
            self.forwarding.wait_for_cycle(forward_timeout_s)
        return report

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, then commit what was acknowledged and release the stream and the database (idempotent)."""
        server, self._server = self._server, None
        try:
            if server is not None:
                server.close()
        finally:
            self._close_parts()

    def _close_parts(self) -> None:
        while self._closers:
            self._closers.pop()()
