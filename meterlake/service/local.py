"""The service's local adapter: the whole service wired on this machine (:class:`LocalMeteringService`, what
``meterlake serve`` and ``meterlake up`` run), its meter events delivered by a process of their own (the Firehose
stand-in, see :mod:`meterlake.service.delivery`).

On AWS (a later issue) a Firehose stream takes that stream's place; the rows and their table are the same.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from types import TracebackType

from meterlake.amberflo.api import RequestError
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, ensure_metering_table, open_catalog
from meterlake.lake.compact import MAINTENANCE_INTERVAL_S
from meterlake.lake.home import DataDir
from meterlake.local.auth import UserPool
from meterlake.local.serving import BackgroundServer, bind_listening_socket
from meterlake.local.stream import DeliveryStream, FlushReport, StreamError
from meterlake.service.app import create_app
from meterlake.service.auth import ApiKeys, Authenticator, JwtVerifier
from meterlake.service.cancellation import CancellationRules
from meterlake.service.delivery import SWITCH_INTERVAL_S, MeterEventProcess
from meterlake.service.forwarding import AmberfloMirror
from meterlake.service.ingest import Ingestor
from meterlake.service.operations import MeteringService, Mirror
from meterlake.service.registry import MeterRegistry
from meterlake.service.store import ServiceStore
from meterlake.service.usage import UsageEngine


class LocalMeteringService:
    """The metering service on this machine: registry and keys in the data dir, the meter-event stream (in its own
    process, :attr:`events`), the usage engine over the local lake, and the ASGI app served on loopback from a
    background thread.

    ``user_pool`` verifies Bearer tokens (None: only X-API-KEY callers); ``access_log_stream`` is committed before
    request-meter usage is read, when the access-log stream runs in the same process (``meterlake up``).

    With ``amberflo`` settings, committed events are forwarded through the meter-event outbox (a dry run without
    ``amberflo_api_key``); with the key too, meter changes and cancellation rules are repeated in Amberflo. The
    delivery process maintains the meter-events table every ``maintenance_interval_s``.

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
        maintenance_interval_s: float = MAINTENANCE_INTERVAL_S,
    ) -> None:
        self.config = config
        self._maintenance_interval_s = maintenance_interval_s
        self.data_dir = data_dir.ensure()
        self._port = config.meterlake.service.port if port is None else port
        self._user_pool = user_pool
        self._access_log_stream = access_log_stream
        self._amberflo = amberflo
        self._api_key = amberflo_api_key
        self._closers: list[Callable[[], object]] = []
        self._server: BackgroundServer | None = None
        #: The meter-event delivery process (its stream, and forwarding with ``amberflo`` settings); set on start.
        self.events: MeterEventProcess | None = None

    def __enter__(self) -> LocalMeteringService:
        settings = self.config.meterlake.service
        # The event loop gives up the GIL at every socket call, and a busy thread (a usage query's planning, the
        # server's own) then kept it for up to the default 5 ms switch interval each time. A shorter interval
        # bounds that wait; it is only ever lowered, for the whole process.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        try:
            # Create the catalog and tables before the delivery process (its flusher, forwarding) opens them.
            catalog = open_catalog(self.data_dir)
            ensure_metering_table(catalog, self.config)
            ensure_meter_events_table(catalog, self.config)
            self.store = ServiceStore.in_data_dir(self.data_dir)
            self._closers.append(self.store.close)
            self.registry = MeterRegistry(self.store, self.config.meters)
            self.rules = CancellationRules(self.store)
            self.keys = ApiKeys(self.store)
            events = MeterEventProcess(
                config=self.config,
                data_dir=self.data_dir,
                amberflo=self._amberflo,
                amberflo_api_key=self._api_key,
                maintenance_interval_s=self._maintenance_interval_s,
            )
            events.start()
            self.events = events
            self._closers.append(events.close)
            mirror = self._mirror()
            ingestor = Ingestor(registry=self.registry, settings=settings, sink=events)
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
        # by every full collection that ingest's allocations set off (~3 s of a 200k-record run, with the flusher here).
        gc.collect()
        gc.freeze()
        return self

    def _mirror(self) -> Mirror | None:
        """The Amberflo mirror of meter changes and cancellation rules, when forwarding sends (settings and a key)."""
        settings = self._amberflo
        if settings is None or self._api_key is None or settings.dry_run:
            return None
        mirror = AmberfloMirror(base_url=settings.base_url, api_key=self._api_key)
        self._closers.append(mirror.close)
        return mirror

    @property
    def url(self) -> str:
        """The service's base URL, e.g. ``http://127.0.0.1:8852``."""
        if self._server is None:
            raise RuntimeError("the metering service is not running")
        return self._server.url

    def _commit_pending(self) -> None:
        """Read-your-writes: commit what ingest acknowledged (and the access log, in ``up``) before a usage query.

        Raises:
            RequestError: (503) what was acknowledged cannot be committed now (the delivery process is gone, busy past
                its timeout, or a commit failed): an answer read without it would miss acknowledged usage.
        """
        try:
            if self.events is not None:
                self.events.flush_pending()
            stream = self._access_log_stream
            if stream is not None and stream.stats().pending_bytes > 0:
                stream.flush()
        except StreamError as exc:
            raise RequestError(
                f"Service Unavailable: acknowledged usage cannot be committed before this read ({exc})", status=503
            ) from exc

    def settle(self, *, forward_timeout_s: float = 60.0) -> FlushReport:
        """Commit every acknowledged event to meter_events, then let forwarding stage and send what was committed."""
        if self.events is None:
            raise RuntimeError("the metering service is not running")
        return self.events.settle(forward_timeout_s)

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
        """Run every closer, last added first, even past one that fails (then raise the first failure)."""
        failure: BaseException | None = None
        while self._closers:
            try:
                self._closers.pop()()
            except BaseException as exc:  # the rest still close: the delivery process, the database
                failure = failure or exc
        if failure is not None:
            raise failure
