"""The service and Amberflo: ingested events forwarded through the outbox, meters and rules repeated there.

Forwarding: meter_events rows are Amberflo records already (customer, meter, value, time, uniqueId, dimensions), so
the outbox (:mod:`meterlake.amberflo.outbox`) stages them from the table's committed snapshots exactly as it stages
the access-log meters' records, with the events' own uniqueIds: the same exactly-once argument, in a second outbox
file. Mirroring: when forwarding is on, each meter created, changed or deleted through the API and each cancellation
rule is repeated in Amberflo (a failure is logged; the change stands in the registry and a repeated request
repeats it there), and an onboarded tenant becomes (or updates) its Amberflo customer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import httpx
import pyarrow as pa
import pyarrow.compute as pc

from meterlake.amberflo.api import Aggregation, UsageQuery
from meterlake.amberflo.outbox import OUTBOX_DIR, Outbox, RecordSource
from meterlake.amberflo.reconcile import Window, staged_usage
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.config import Config
from meterlake.lake.home import DataDir
from meterlake.meters import (
    CUSTOMER_ID,
    DIMENSIONS,
    METER_TIME,
    METER_VALUE,
    UNIQUE_ID,
    Meter,
    MeterBatch,
    MeterRecords,
    MeterType,
    UsageKey,
)
from meterlake.schema import meter_event_arrow_schema
from meterlake.service.cancellation import CancellationRule, CancellationRules
from meterlake.service.registry import MeterRegistry, RegisteredMeter
from meterlake.service.store import ServiceStore
from meterlake.service.usage import UsageEngine

logger = logging.getLogger(__name__)

#: The meter-event outbox, beside the access-log one in ``<data dir>/amberflo``.
METER_EVENTS_OUTBOX_FILE = "meter-events-outbox.db"
_COLUMNS = ("unique_id", "meter_api_name", "customer_id", "meter_value", "meter_time", "dimensions")


def meter_event_records(events: pa.Table) -> MeterBatch:
    """The Amberflo records of meter_events rows: one per row, grouped by meter, with the row's uniqueId."""
    parts = []
    names = events.column("meter_api_name")
    for name in sorted(pc.unique(names).to_pylist()):
        rows = events.filter(pc.equal(names, name))
        columns: dict[str, pa.Array | pa.ChunkedArray] = {
            CUSTOMER_ID: rows.column("customer_id"),
            METER_VALUE: rows.column("meter_value"),
            METER_TIME: pc.divide(rows.column("meter_time").cast(pa.int64()), 1000),
            UNIQUE_ID: rows.column("unique_id"),
        }
        # One struct field per dimension name, looked up in Arrow (not row by row in Python).
        dimensions = rows.column("dimensions").combine_chunks()
        key_lists = pa.ListArray.from_arrays(dimensions.offsets, dimensions.keys, mask=dimensions.is_null())
        keys = sorted(pc.unique(pc.list_flatten(key_lists)).to_pylist())
        if keys:
            key_type = dimensions.type.key_type
            values = [pc.map_lookup(dimensions, pa.scalar(key, key_type), "first").cast(pa.string()) for key in keys]
            columns[DIMENSIONS] = pa.StructArray.from_arrays(values, names=keys)
        parts.append(MeterRecords(name, pa.table(columns)))
    return MeterBatch(parts=tuple(parts), untenanted=0)


def meter_event_source() -> RecordSource:
    """What the meter-event outbox reads from meter_events and the records it makes."""
    schema = meter_event_arrow_schema()
    return RecordSource(columns=_COLUMNS, schema=schema, to_records=meter_event_records)


def meter_events_outbox(data_dir: DataDir, settings: AmberfloSettings) -> Outbox:
    """The local outbox of ingested events: ``<data dir>/amberflo/meter-events-outbox.db``."""
    return Outbox(data_dir.root / OUTBOX_DIR / METER_EVENTS_OUTBOX_FILE, settings=settings, source=meter_event_source())


class AmberfloMirror:
    """Repeats the registry's event-meter changes and new cancellation rules in Amberflo (its meters API and its
    custom filtering rules), found there by meterApiName, and creates onboarded tenants' customers there."""

    def __init__(self, *, base_url: str, api_key: str, timeout_s: float = 30.0) -> None:
        self._root = base_url.rstrip("/")
        self._client = httpx.Client(headers={"X-API-KEY": api_key}, timeout=timeout_s)

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()

    def meter_changed(self, action: str, meter: RegisteredMeter, previous: RegisteredMeter | None = None) -> None:
        """Create, update (found by its previous name) or delete ``meter`` in Amberflo."""
        try:
            existing = self._find(previous.meter_api_name if previous is not None else meter.meter_api_name)
            if action == "deleted":
                if existing is not None:
                    self._call("DELETE", f"/meters/{existing['id']}", None)
                return
            body = _amberflo_meter(meter)
            if existing is None:
                self._call("POST", "/meters", body)
            else:
                self._call("PUT", "/meters", {**body, "id": existing["id"]})
        except (httpx.HTTPError, MirrorError) as exc:
            logger.error("meter %r %s here but not in Amberflo: %s", meter.meter_api_name, action, exc)

    def rule_created(self, rule: CancellationRule) -> None:
        """Create ``rule`` in Amberflo (its custom filtering rules)."""
        body = rule.to_api()
        body.pop("createTime", None)
        try:
            self._call("POST", "/ingest-snapshot/custom-filtering-rules", body)
        except (httpx.HTTPError, MirrorError) as exc:
            logger.error("cancellation rule %r stored here but not in Amberflo: %s", rule.id, exc)

    def ensure_customer(self, customer: dict[str, Any]) -> Literal["created", "updated"]:
        """Create ``customer`` in Amberflo, or replace its fields there if it exists: looked up by customerId
        first, so onboarding the same tenant again changes nothing but its fields.

        Raises:
            MirrorError: Amberflo refused a call (its status and answer in the message), or could not be reached.
        """
        try:
            existing = self._call("GET", "/customers", None, params={"customerId": customer["customerId"]})
            if isinstance(existing, dict) and existing.get("customerId") == customer["customerId"]:
                self._call("PUT", "/customers", customer)
                return "updated"
            self._call("POST", "/customers", customer)
            return "created"
        except httpx.HTTPError as exc:
            raise MirrorError(f"Amberflo could not be reached: {exc}") from exc

    def _find(self, meter_api_name: str) -> dict[str, Any] | None:
        meters: Sequence[dict[str, Any]] = self._call("GET", "/meters", None)
        return next((m for m in meters if m.get("meterApiName") == meter_api_name), None)

    def _call(self, method: str, path: str, body: object, *, params: dict[str, str] | None = None) -> Any:
        answer = self._client.request(method, self._root + path, json=body, params=params)
        if answer.status_code >= 300:
            raise MirrorError(f"Amberflo answered {method} {path} with {answer.status_code}: {answer.text[:200]}")
        return answer.json() if answer.content else None


class MirrorError(Exception):
    """Amberflo refused a mirrored change."""


def _amberflo_meter(meter: RegisteredMeter) -> dict[str, Any]:
    fields = meter.fields()
    return {key: fields[key] for key in ("label", "meterApiName", "meterType", "description", "dimensions")}


# -- meterlake reconcile --------------------------------------------------------------------------------------------


def event_meter_usage(
    config: Config, data_dir: DataDir, window: Window, *, apply_rules: bool
) -> tuple[dict[UsageKey, float], list[Meter]]:
    """Every event meter's usage per customer, meter and UTC hour in ``window``, from meter_events (SUM, or MAX for
    max_usage meters, as Amberflo reports them), and the meters as reconciliation names them. ``apply_rules``: leave
    out what cancellation rules match (Amberflo has the rules too); a dry run compares with the staged records, which
    hold every forwarded event."""
    with ServiceStore.in_data_dir(data_dir) as store:
        registry = MeterRegistry(store, config.meters)
        engine = UsageEngine(
            config=config,
            data_dir=data_dir,
            registry=registry,
            rules=CancellationRules(store) if apply_rules else None,
        )
        usage: dict[UsageKey, float] = {}
        meters: list[Meter] = []
        for meter in registry.event_meters().values():
            aggregation: Aggregation = "MAX" if meter.meter_type == "max_usage" else "SUM"
            # As reconciliation names a meter: its name and how Amberflo aggregates it (a sum, or a max).
            meter_type: MeterType = "max_usage" if aggregation == "MAX" else "sum_of_all_usage"
            meters.append(Meter(meter_api_name=meter.meter_api_name, label=meter.label, meter_type=meter_type))
            query = UsageQuery(
                meter.meter_api_name,
                aggregation,
                "HOUR",
                window.start_s,
                window.end_s,
                ("customerId",),
                {},
                None,
                False,
            )
            for group in engine.groups(meter, query, aggregation):
                for hour, value in group.buckets.items():
                    if value:
                        usage[(str(group.key[0]), meter.meter_api_name, hour)] = value
    return usage, meters


def staged_event_usage(
    data_dir: DataDir, settings: AmberfloSettings, meters: list[Meter], window: Window
) -> dict[UsageKey, float]:
    """Usage per (customer, meter, hour) of the event records staged in the meter-event outbox (a dry run's side)."""
    with meter_events_outbox(data_dir, settings) as outbox:
        return staged_usage(outbox, meters, window)
