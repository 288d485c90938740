"""What the service tests share: a data dir with the service's registry and meter-event stream, wired as served."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest

from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.local.auth import UserPool, for_config
from meterlake.service.auth import Principal
from meterlake.service.delivery import MeterEventProcess
from meterlake.service.events import EventSource
from meterlake.service.ingest import Ingestor, IngestOutcome
from meterlake.service.local import LocalMeteringService
from meterlake.service.registry import MeterRegistry
from meterlake.service.store import ServiceStore

ADMIN = Principal("admin", None, "test-admin", "api_key")
NOW_MS = int(time.time() * 1000)


def tenant(customer_id: str) -> Principal:
    """A tenant-scoped caller."""
    return Principal("tenant", customer_id, f"key-of-{customer_id}", "api_key")


@dataclass
class Harness:
    """The service's domain over a real data dir: registry, the meter-event delivery process (its stream flushes on
    its hints, 60 s by default: tests flush), ingest."""

    config: Config
    data_dir: DataDir
    store: ServiceStore
    registry: MeterRegistry
    stream: MeterEventProcess
    ingestor: Ingestor

    def ingest(
        self,
        items: Sequence[object],
        *,
        principal: Principal = ADMIN,
        source: EventSource = "ingest",
        partial: bool = False,
    ) -> IngestOutcome:
        """Ingest decoded JSON objects as the app does."""
        return asyncio.run(self.ingestor.ingest(principal, items, source=source, partial=partial))

    def committed_rows(self) -> list[dict[str, Any]]:
        """Flush the stream and read every row of meter_events."""
        self.stream.flush()
        table = ensure_meter_events_table(open_catalog(self.data_dir), self.config)
        arrow: pa.Table = table.scan().to_arrow()
        return sorted(arrow.to_pylist(), key=lambda row: (row["meter_time"], row["unique_id"]))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    config = Config()
    data_dir = DataDir(tmp_path / "home").ensure()
    store = ServiceStore.in_data_dir(data_dir)
    registry = MeterRegistry(store, config.meters)
    registry.create({"label": "LLM tokens", "meterApiName": "llm-tokens", "meterType": "sum_of_all_usage"})
    stream = MeterEventProcess(config=config, data_dir=data_dir)
    stream.start()
    ingestor = Ingestor(registry=registry, settings=config.meterlake.service, sink=stream)
    try:
        yield Harness(config, data_dir, store, registry, stream, ingestor)
    finally:
        stream.close()
        store.close()


def record(**overrides: Any) -> dict[str, Any]:
    """A valid ingest record for llm-tokens (customer acme, now)."""
    return {
        "customerId": "acme",
        "meterApiName": "llm-tokens",
        "meterValue": 12,
        "meterTimeInMillis": NOW_MS,
        **overrides,
    }


@dataclass
class Served:
    """A LocalMeteringService on an ephemeral port with an admin key, two tenant keys and the user pool."""

    service: LocalMeteringService
    pool: UserPool
    admin_key: str
    acme_key: str
    globex_key: str

    @property
    def url(self) -> str:
        """The service's base URL."""
        return self.service.url

    def admin_token(self) -> str:
        """A control-plane access token of the admin group."""
        return self.pool.issue_access_token(user="ops", groups=[self.service.config.meterlake.service.admin_group])

    def client(self, *, key: str | None = None, token: str | None = None) -> httpx.Client:
        """An httpx client calling with ``key`` (X-API-KEY) or ``token`` (Bearer)."""
        headers = {}
        if key is not None:
            headers["X-API-KEY"] = key
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    config = Config()
    data_dir = DataDir(tmp_path / "served").ensure()
    pool = for_config(config, data_dir)
    with LocalMeteringService(config=config, data_dir=data_dir, port=0, user_pool=pool) as service:
        _, admin_key = service.keys.create(role="admin")
        _, acme_key = service.keys.create(role="tenant", customer_id="acme")
        _, globex_key = service.keys.create(role="tenant", customer_id="globex")
        yield Served(service, pool, admin_key, acme_key, globex_key)
