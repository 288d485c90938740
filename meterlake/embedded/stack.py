"""The embedded pipeline wired together: gateway -> delivery stream (spool -> transform -> Iceberg) -> Amberflo, and
beside the gateway the metering service (its own meter-event stream into meter_events, forwarded the same way).

``meterlake up`` keeps it running; ``meterlake demo`` drives it with a load test and reconciles the result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import TracebackType

import msgspec
from pyiceberg.table import Table

from meterlake.amberflo.forwarder import Forwarder
from meterlake.amberflo.outbox import ForwardingWorker, Outbox, OutboxStatus
from meterlake.config import Config
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.compact import MAINTENANCE_INTERVAL_S, MaintenanceWorker, Retention
from meterlake.lake.home import DataDir
from meterlake.local.gateway import GatewayServer
from meterlake.local.stream import DeliveryStream, FlushReport
from meterlake.service.local import LocalMeteringService

DRAIN_TIMEOUT_S = 30.0
FORWARD_SETTLE_TIMEOUT_S = 60.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AmberfloTarget:
    """Where the forwarder sends usage: Amberflo's base URL and the API key (None: dry run, records only staged)."""

    base_url: str
    api_key: str | None

    @classmethod
    def from_config(cls, config: Config) -> AmberfloTarget:
        """The configured base URL and the key from the configured environment variable (unset: dry run)."""
        return cls(config.amberflo.base_url, os.environ.get(config.amberflo.api_key_env) or None)


@dataclass(frozen=True, slots=True)
class Settled:
    """What :meth:`LocalStack.settle` achieved: the stream's flush and the forwarding outbox afterwards."""

    flush: FlushReport
    forwarding: OutboxStatus
    forwarding_caught_up: bool
    #: What the metering service's meter-event stream committed.
    meter_events: FlushReport


class LocalStack:
    """Start the forwarder, the delivery stream (with its background flusher), then the gateway that writes into it.

    Stopping goes the other way: the gateway stops taking requests and hands over its last log lines, the stream
    flushes everything it acknowledged into Iceberg, and the forwarder makes a last attempt to send what was committed.
    Forwarding never blocks ingestion: it runs in its own thread and reads only what Iceberg committed. Neither does
    table maintenance, which compacts closed days and expires old snapshots every ``maintenance_interval_s`` (as
    Glue's optimizers do on AWS), keeping every snapshot the forwarding outbox has not staged: the access-log table
    here, the meter-events table in the metering service's delivery process.
    """

    def __init__(
        self,
        *,
        config: Config,
        data_dir: DataDir,
        port: int | None = None,
        amberflo: AmberfloTarget | None = None,
        maintenance_interval_s: float = MAINTENANCE_INTERVAL_S,
        service_port: int | None = None,
    ) -> None:
        """``port`` is the gateway's (None: the config's); ``service_port`` the metering service's (None: the
        config's, or any free one when the gateway's is 0)."""
        self.config = config
        self.data_dir = data_dir.ensure()
        self._port = port
        self._service_port = service_port if service_port is not None or port != 0 else 0
        self._service: LocalMeteringService | None = None
        self.amberflo = amberflo or AmberfloTarget.from_config(config)
        self._stream: DeliveryStream | None = None
        self._gateway: GatewayServer | None = None
        self._worker: ForwardingWorker | None = None
        self._forwarder: Forwarder | None = None
        self._maintenance_interval_s = maintenance_interval_s
        self._maintenance: MaintenanceWorker | None = None

    @property
    def stream(self) -> DeliveryStream:
        """The running delivery stream."""
        if self._stream is None:
            raise RuntimeError("the local stack is not running")
        return self._stream

    @property
    def gateway(self) -> GatewayServer:
        """The running gateway."""
        if self._gateway is None:
            raise RuntimeError("the local stack is not running")
        return self._gateway

    @property
    def service(self) -> LocalMeteringService:
        """The running metering service."""
        if self._service is None:
            raise RuntimeError("the local stack is not running")
        return self._service

    @property
    def forwarding(self) -> ForwardingWorker:
        """The running forwarding worker."""
        if self._worker is None:
            raise RuntimeError("the local stack is not running")
        return self._worker

    @property
    def maintenance(self) -> MaintenanceWorker:
        """The running table-maintenance schedule."""
        if self._maintenance is None:
            raise RuntimeError("the local stack is not running")
        return self._maintenance

    def _load_table(self) -> Table:
        return ensure_metering_table(open_catalog(self.data_dir), self.config)

    def __enter__(self) -> LocalStack:
        # Create the catalog and table before any thread opens them.
        self._load_table()
        settings = msgspec.structs.replace(self.config.amberflo, base_url=self.amberflo.base_url)
        outbox = Outbox.in_data_dir(self.data_dir, meters=self.config.meters, settings=settings)
        self._forwarder = Forwarder(settings)
        self._worker = ForwardingWorker(
            outbox, load_table=self._load_table, forwarder=self._forwarder, api_key=self.amberflo.api_key
        )
        if self.amberflo.api_key is None or settings.dry_run:
            logger.warning(
                "Amberflo forwarding runs dry: records are staged in %s, nothing is sent (set $%s to send)",
                outbox.path,
                self.config.amberflo.api_key_env,
            )
        try:
            self._worker.start()
            self._stream = DeliveryStream(
                config=self.config, data_dir=self.data_dir, on_commit=lambda _snapshot: self.forwarding.wake()
            )
            self._stream.start()
            self._maintenance = MaintenanceWorker(
                self.data_dir,
                load_table=self._load_table,
                retention=Retention.from_config(self.config),
                readers=lambda: [outbox.status().checkpoint_snapshot_id],
                interval_s=self._maintenance_interval_s,
            )
            self._maintenance.start()
            self._gateway = GatewayServer(
                config=self.config, data_dir=self.data_dir, access_log=self._stream, port=self._port
            )
            self._service = LocalMeteringService(
                config=self.config,
                data_dir=self.data_dir,
                port=self._service_port,
                user_pool=self._gateway.user_pool,
                access_log_stream=self._stream,
                amberflo=settings,
                amberflo_api_key=self.amberflo.api_key,
                maintenance_interval_s=self._maintenance_interval_s,
            ).__enter__()
        except BaseException:
            self._stop()
            raise
        return self

    def settle(self, *, forward_timeout_s: float = FORWARD_SETTLE_TIMEOUT_S) -> Settled:
        """Commit every access-log line written so far, then let the forwarder stage and send what was committed."""
        self.gateway.drain(DRAIN_TIMEOUT_S)
        flush = self.stream.flush()
        meter_events = self.service.settle(forward_timeout_s=forward_timeout_s)
        caught_up = self.forwarding.wait_for_cycle(forward_timeout_s)
        return Settled(
            flush=flush,
            forwarding=self.forwarding.outbox.status(),
            forwarding_caught_up=caught_up,
            meter_events=meter_events,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        maintenance, self._maintenance = self._maintenance, None
        if maintenance is not None:
            maintenance.stop()
        gateway, stream, worker, forwarder = self._gateway, self._stream, self._worker, self._forwarder
        service, self._service = self._service, None
        self._gateway = self._stream = None
        try:
            try:
                if service is not None:
                    service.close()
            finally:
                if gateway is not None:
                    gateway.close()
        finally:
            try:
                if stream is not None:
                    stream.close()
            finally:
                if worker is not None:
                    worker.stop()
                if forwarder is not None:
                    forwarder.close()
                self._worker = self._forwarder = None
