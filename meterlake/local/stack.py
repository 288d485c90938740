"""The embedded pipeline wired together: gateway -> delivery stream (spool -> transform -> Iceberg).

``meterlake up`` keeps it running; ``meterlake demo`` drives it with a load test and reconciles the result.
"""

from __future__ import annotations

from types import TracebackType

from meterlake.config import Config
from meterlake.local.gateway import GatewayServer
from meterlake.local.home import DataDir
from meterlake.local.stream import DeliveryStream, FlushReport

DRAIN_TIMEOUT_S = 30.0


class LocalStack:
    """Start the delivery stream (with its background flusher), then the gateway that writes into it.

    Stopping goes the other way: the gateway stops taking requests and hands over its last log lines, then the
    stream flushes everything it acknowledged into Iceberg before it closes.
    """

    def __init__(self, *, config: Config, data_dir: DataDir, port: int | None = None) -> None:
        self.config = config
        self.data_dir = data_dir.ensure()
        self._port = port
        self._stream: DeliveryStream | None = None
        self._gateway: GatewayServer | None = None

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

    def __enter__(self) -> LocalStack:
        stream = DeliveryStream(config=self.config, data_dir=self.data_dir)
        try:
            stream.start()
            gateway = GatewayServer(config=self.config, data_dir=self.data_dir, access_log=stream, port=self._port)
            gateway.__enter__()
        except BaseException:
            stream.close()
            raise
        self._stream, self._gateway = stream, gateway
        return self

    def settle(self) -> FlushReport:
        """Hand every access-log line written so far to the stream and commit it: afterwards queries see it all."""
        self.gateway.drain(DRAIN_TIMEOUT_S)
        return self.stream.flush()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gateway, stream = self._gateway, self._stream
        self._gateway = self._stream = None
        try:
            if gateway is not None:
                gateway.__exit__(exc_type, exc, tb)
        finally:
            if stream is not None:
                stream.close()
