"""Ingest: check a request's records, make the valid ones durable, and only then answer.

Durable before 200: the rows go to an :class:`EventSink` (locally the meter-event delivery stream's spool, fsync'd;
on AWS, in a later issue, a Firehose stream), and :meth:`Ingestor.ingest` returns only once the sink has them. A
request with any invalid record stores none of them (400, listing each bad record's index, field and reason) unless
the caller asked for ``partial``, which stores the valid ones and lists the others.

Exactly once: every row carries its uniqueId (the sender's or one derived from the content); the delivery stream
drops a row whose (meterApiName, uniqueId) was committed before, so a retried request never counts twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from meterlake.amberflo.api import IngestRecord, RequestError
from meterlake.service.auth import Principal, require_customer
from meterlake.service.events import (
    EventSource,
    RecordError,
    check_records,
    encode_rows,
    event_rows,
)
from meterlake.service.registry import MeterRegistry
from meterlake.service.settings import ServiceSettings


class NotDurableError(Exception):
    """The sink could not make the records durable (a full or failing disk): nothing was acknowledged."""


class EventSink(Protocol):
    """Where accepted rows go: durable when :meth:`commit` returns."""

    async def commit(self, lines: Sequence[bytes]) -> None:
        """Make every line durable, or none.

        Raises:
            NotDurableError: none of the lines is durable.
        """


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What a request stored (``ingested`` records, durable) and the records it refused (with ``partial``)."""

    ingested: int
    rejected: list[RecordError]


class Ingestor:
    """Checks and stores usage records for the service's adapters."""

    def __init__(
        self,
        *,
        registry: MeterRegistry,
        settings: ServiceSettings,
        sink: EventSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._sink = sink
        self._clock = clock

    async def ingest(
        self,
        principal: Principal,
        items: Sequence[IngestRecord] | Sequence[object],
        *,
        source: EventSource,
        partial: bool,
    ) -> IngestOutcome:
        """Check ``items`` (typed records, or decoded JSON objects) and store the valid ones durably.

        Raises:
            RequestError: (400) no records, too many, or invalid ones without ``partial`` (``extra["errors"]``
                lists each); (403) a tenant sends another customer's usage. Nothing is stored then.
            NotDurableError: the sink could not store them (answer 503).
        """
        if not items:
            raise RequestError("records: the request holds no records")
        limit = self._settings.max_records_per_request
        if len(items) > limit:
            raise RequestError(f"records: {len(items)} in one request; at most {limit}", status=413)
        if not principal.is_admin:
            require_customer(principal, _customers(items))
        now = self._clock()
        checked = check_records(
            items,
            meters=self._registry.event_meters(),
            request_meters=self._registry.request_meter_names(),
            settings=self._settings,
            now_ms=int(now * 1000),
        )
        if checked.errors and not partial:
            first = checked.errors[0]
            raise RequestError(
                f"{len(checked.errors)} of {len(items)} records are invalid, so none was stored (add ?partial=true "
                f"to store the valid ones); record {first.index}: {first.field}: {first.reason}",
                extra={"errors": [error.to_api() for error in checked.errors]},
            )
        rows = event_rows(
            [record for _, record in checked.accepted], ingested_at_us=int(now * 1_000_000), source=source
        )
        if rows:
            await self._sink.commit([encode_rows(rows)])
        return IngestOutcome(len(rows), checked.errors)


def _customers(items: Sequence[IngestRecord] | Sequence[object]) -> list[str]:
    """The customerIds the items name (whatever their other faults)."""
    customers: list[str] = []
    for item in items:
        if isinstance(item, IngestRecord):
            customers.append(item.customer_id)
        elif isinstance(item, dict) and isinstance(item.get("customerId"), str):
            customers.append(item["customerId"])
    return customers
