"""Reconciliation: what the lake says each customer used, per meter and hour, against what Amberflo reports.

The lake side is computed by DuckDB from the Iceberg table's current files with the meters' own predicates
(:func:`aggregate_lake`, in the local queries' DuckDB sandbox); the other side is Amberflo's ``/usage`` (SUM, or MAX
for max_usage meters, per HOUR, grouped by customerId) or, on a dry run, the records staged in the outbox. Repair
re-stages the lake's records of every bucket Amberflo is short of: they carry their original uniqueIds, so nothing can
be counted twice; the metering service's event meters are re-staged from the meter-event outbox the same way.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import httpx
import pyarrow as pa
from pyiceberg.schema import Schema

from meterlake.amberflo.outbox import Outbox
from meterlake.config import Config
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.files import read_data_file
from meterlake.lake.home import DataDir
from meterlake.lake.query import printable, read_table_files, sandboxed_duckdb
from meterlake.meters import Meter, UsageKey, lake_usage_query, meter_records
from meterlake.schema import metering_event_arrow_schema
from meterlake.window import WindowError, require_ordered

HOUR_S = 3600


class ReconcileError(Exception):
    """Amberflo could not be asked for usage, or answered something that is not a usage report."""


@dataclass(frozen=True, slots=True)
class Window:
    """Whole UTC hours ``[start_s, end_s)`` in epoch seconds."""

    start_s: int
    end_s: int

    @classmethod
    def covering(cls, start: datetime, end: datetime) -> Window:
        """The whole hours covering ``[start, end)``.

        Raises:
            ReconcileError: ``end`` is not after ``start`` (:func:`meterlake.window.require_ordered`).
        """
        try:
            require_ordered(start, end, start_name="--from", end_name="--to")
        except WindowError as exc:
            raise ReconcileError(str(exc)) from None
        low = math.floor(start.timestamp() / HOUR_S) * HOUR_S
        high = math.ceil(end.timestamp() / HOUR_S) * HOUR_S
        return cls(low, high)

    def __contains__(self, hour_s: object) -> bool:
        return isinstance(hour_s, int) and self.start_s <= hour_s < self.end_s


@dataclass(frozen=True, slots=True)
class UsageDifference:
    """One customer, meter and hour where the lake and the other side disagree."""

    customer_id: str
    meter_api_name: str
    hour_s: int
    lake: float
    other: float


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """Buckets compared and every difference, with what the lake was compared against."""

    against: str
    buckets: int
    differences: list[UsageDifference]

    @property
    def missing(self) -> list[UsageDifference]:
        """Buckets where the other side has less than the lake: what repair re-sends."""
        return [d for d in self.differences if d.other < d.lake]


def _lake_files(config: Config, data_dir: DataDir) -> tuple[Schema, list[str]]:
    """The metering table's schema and the local paths of its current data files."""
    table = ensure_metering_table(open_catalog(data_dir), config)
    return table.schema(), [task.file.file_path.removeprefix("file://") for task in table.scan().plan_files()]


def aggregate_lake(
    events: pa.Table | Sequence[str], meters: Sequence[Meter], *, schema: Schema | None = None
) -> dict[UsageKey, int]:
    """Usage per customer, meter and UTC hour computed by DuckDB from the lake rows (a table or Parquet paths).

    The SQL twin of :func:`meterlake.meters.expected_usage`: reconciliation checks that the two agree. It runs in the
    same sandbox as every local query: DuckDB may read the given files and nothing else. Paths with the table's
    ``schema`` are read by field id, as Iceberg reads them (a column added later reads as null from older files);
    without it, by name.
    """
    from sqlglot import exp

    paths = [] if isinstance(events, pa.Table) else list(events)
    if not isinstance(events, pa.Table) and not paths:
        return {}
    con = sandboxed_duckdb(paths)
    try:
        if isinstance(events, pa.Table):
            con.register("metering_events", events)
            source: exp.Expr = exp.to_table("metering_events")
        else:
            source = (
                read_table_files(paths, schema)
                if schema is not None
                else exp.func("read_parquet", exp.array(*(exp.Literal.string(path) for path in paths)))
            )
        rows = con.execute(lake_usage_query(meters, source).sql(dialect="duckdb")).fetchall()
    finally:
        con.close()
    return {(str(customer), str(meter), int(hour)): int(usage) for customer, meter, hour, usage in rows}


def lake_usage(config: Config, data_dir: DataDir, window: Window) -> dict[UsageKey, float]:
    """Usage per (customer, meter, hour) in the window, from the lake's committed files."""
    schema, files = _lake_files(config, data_dir)
    usage = aggregate_lake(files, config.meters, schema=schema)
    return {key: float(value) for key, value in usage.items() if key[2] in window}


def amberflo_usage(
    client: httpx.Client, *, base_url: str, api_key: str, meters: Sequence[Meter], window: Window
) -> dict[UsageKey, float]:
    """Usage per (customer, meter, hour) as Amberflo's ``/usage`` reports it.

    Raises:
        ReconcileError: Amberflo refused the query or could not be reached.
    """
    usage: dict[UsageKey, float] = {}
    for meter in meters:
        query = {
            "meterApiName": meter.meter_api_name,
            "aggregation": "MAX" if meter.aggregation == "max" else "SUM",
            "timeGroupingInterval": "HOUR",
            "timeRange": {"startTimeInSeconds": window.start_s, "endTimeInSeconds": window.end_s},
            "groupBy": ["customerId"],
        }
        try:
            answer = client.post(
                f"{base_url.rstrip('/')}/usage", json=query, headers={"X-API-KEY": api_key}, timeout=30
            )
        except httpx.HTTPError as exc:
            raise ReconcileError(f"Amberflo at {base_url} could not be reached: {exc}") from None
        if answer.status_code != 200:
            raise ReconcileError(f"Amberflo answered {answer.status_code} to the usage query: {answer.text[:200]}")
        for group in _client_meters(answer.json()):
            customer = str(group.get("group", {}).get("groupInfo", {}).get("customerId", ""))
            for bucket in group.get("values", []):
                value = float(bucket.get("value", 0))
                hour = int(bucket["secondsSinceEpochUtc"])
                if value and hour in window:
                    usage[(customer, meter.meter_api_name, hour)] = value
    return usage


def _client_meters(report: Any) -> list[dict[str, Any]]:
    if not isinstance(report, dict) or not isinstance(report.get("clientMeters"), list):
        raise ReconcileError("Amberflo's usage answer has no clientMeters list")
    return [group for group in report["clientMeters"] if isinstance(group, dict)]


def staged_usage(outbox: Outbox, meters: Sequence[Meter], window: Window) -> dict[UsageKey, float]:
    """Usage per (customer, meter, hour) of the records staged in the outbox (the dry run's other side)."""
    records = outbox.staged_records(window.start_s * 1000, window.end_s * 1000)
    return _sum_records(records, meters)


def _sum_records(records: Iterable[Mapping[str, Any]], meters: Sequence[Meter]) -> dict[UsageKey, float]:
    maximum = {m.meter_api_name for m in meters if m.aggregation == "max"}
    usage: dict[UsageKey, float] = defaultdict(float)
    for record in records:
        key = (
            str(record["customerId"]),
            str(record["meterApiName"]),
            record["meterTimeInMillis"] // 1000 // HOUR_S * HOUR_S,
        )
        value = float(record["meterValue"])
        usage[key] = max(usage[key], value) if key[1] in maximum else usage[key] + value
    return dict(usage)


def compare(lake: Mapping[UsageKey, float], other: Mapping[UsageKey, float], *, against: str) -> ReconcileReport:
    """Every bucket on either side whose values differ."""
    keys = sorted(set(lake) | set(other))
    differences = [
        UsageDifference(
            customer, meter, hour, lake.get((customer, meter, hour), 0.0), other.get((customer, meter, hour), 0.0)
        )
        for customer, meter, hour in keys
        if not math.isclose(lake.get((customer, meter, hour), 0.0), other.get((customer, meter, hour), 0.0))
    ]
    return ReconcileReport(against=against, buckets=len(keys), differences=differences)


def repair(
    report: ReconcileReport, *, config: Config, data_dir: DataDir, outbox: Outbox, event_outbox: Outbox | None = None
) -> int:
    """Re-stage the records of every bucket the other side is short of; returns the records queued.

    A config meter's records are made again from the lake and queued in ``outbox``; an event meter's (the metering
    service's: any other meter) are the records ``event_outbox`` staged for the bucket, queued there again. Either way
    they carry their original uniqueIds.
    """
    config_meters = {meter.meter_api_name for meter in config.meters}
    wanted = {(d.customer_id, d.meter_api_name, d.hour_s) for d in report.missing}
    lake_wanted = {key for key in wanted if key[1] in config_meters}
    event_wanted = wanted - lake_wanted
    queued = 0
    if lake_wanted:
        target = metering_event_arrow_schema()
        pieces = [read_data_file(path, target) for path in _lake_files(config, data_dir)[1]]
        events = pa.concat_tables(pieces) if pieces else target.empty_table()
        records = [
            record for record in meter_records(events, config.meters).records() if _bucket(record) in lake_wanted
        ]
        outbox.restage(records)
        queued += len(records)
    if event_wanted and event_outbox is not None:
        hours = [hour for _, _, hour in event_wanted]
        staged = event_outbox.staged_records(min(hours) * 1000, (max(hours) + HOUR_S) * 1000)
        # An earlier repair's batches are staged records too: each uniqueId is queued once.
        chosen = {str(r["uniqueId"]): r for r in reversed(staged) if _bucket(r) in event_wanted}
        event_outbox.restage(list(chosen.values()))
        queued += len(chosen)
    return queued


def _bucket(record: Mapping[str, Any]) -> UsageKey:
    """A record's (customer, meter, UTC hour)."""
    return (
        str(record["customerId"]),
        str(record["meterApiName"]),
        int(record["meterTimeInMillis"]) // 1000 // HOUR_S * HOUR_S,
    )


# --- one run, per tenant: answered == counted == forwarded (make demo, meterlake aws check) -------------------------

#: How a reconciliation line names a request that reached the lake with no tenant.
NO_TENANT = "(no tenant)"
#: The meter whose units a run is reconciled by: one unit per billable request (the shipped definition).
CALLS_METER = "api-calls"
#: The columns of the usage queries (sql/usage_per_tenant_*.sql) a run's counts are read from.
_TENANT_COLUMN, _REQUESTS_COLUMN, _BILLABLE_COLUMN = "tenant_id", "requests", "billable_requests"


@dataclass(frozen=True, slots=True)
class Tally:
    """A tenant's requests and, of them, the billable ones (status < 500; requests with no tenant never are)."""

    requests: int = 0
    billable: int = 0


def usage_tallies(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> dict[str | None, Tally]:
    """Requests and billable requests per tenant of a usage query's rows (summed over its days or hours); no rows
    (Athena may then name no columns either) is no tenants."""
    rows = list(rows)
    if not rows:
        return {}
    tenant_at = columns.index(_TENANT_COLUMN)
    requests_at, billable_at = columns.index(_REQUESTS_COLUMN), columns.index(_BILLABLE_COLUMN)
    tallies: dict[str | None, Tally] = {}
    for row in rows:
        value = row[tenant_at]
        tenant = value if isinstance(value, str) else None
        before = tallies.get(tenant, Tally())
        tallies[tenant] = Tally(
            before.requests + int(str(row[requests_at])), before.billable + int(str(row[billable_at]))
        )
    return tallies


#: The columns of sql/meter_events/usage.sql an event meter's counts are read from.
_CUSTOMER_COLUMN, _EVENTS_COLUMN, _UNITS_COLUMN = "customer_id", "event_count", "sum_value"


def event_usage_tallies(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> dict[str | None, Tally]:
    """Events and units (summed, whole) per customer of sql/meter_events/usage.sql's rows (over its buckets)."""
    rows = list(rows)
    if not rows:
        return {}
    customer_at, events_at, units_at = (columns.index(c) for c in (_CUSTOMER_COLUMN, _EVENTS_COLUMN, _UNITS_COLUMN))
    tallies: dict[str | None, Tally] = {}
    for row in rows:
        customer = str(row[customer_at])
        before = tallies.get(customer, Tally())
        units = float(str(row[units_at]))
        tallies[customer] = Tally(before.requests + int(str(row[events_at])), before.billable + round(units))
    return tallies


def _mark(left: int, right: int) -> str:
    return "==" if left == right else "!="


@dataclass(frozen=True, slots=True)
class TenantReconciliation:
    """One tenant's line for one meter: answered by the API, counted in the lake (``counted_in``), units in Amberflo.

    For the calls meter (:data:`CALLS_METER`) the tallies are requests answered and billable; for an event meter
    (usage the metering service ingested) they are events ingested and their units, as acknowledged by the service.
    ``forwarded`` None: Amberflo is not compared, for ``not_forwarded_reason`` (a dry run; requests with no tenant
    are never forwarded).
    """

    tenant: str | None
    answered: Tally
    counted: Tally
    forwarded: int | None
    counted_in: str
    not_forwarded_reason: str = "forwarding is a dry run"
    meter: str = CALLS_METER

    @property
    def label(self) -> str:
        """The tenant as printed: escaped (tenants are data), or :data:`NO_TENANT`."""
        return NO_TENANT if self.tenant is None else printable(self.tenant)

    @property
    def differences(self) -> list[str]:
        """Each comparison that does not hold, naming both sides."""
        a, c, t, where = self.answered, self.counted, self.label, self.counted_in
        found = []
        if self.meter != CALLS_METER:
            if a.requests != c.requests:
                found.append(f"{t} {self.meter}: ingested {a.requests} events, counted in {where} {c.requests}")
            if a.billable != c.billable:
                found.append(f"{t} {self.meter}: ingested {a.billable} units, in {where} {c.billable}")
            if self.forwarded is not None and self.forwarded != a.billable:
                found.append(f"{t} {self.meter}: ingested {a.billable} units, units in Amberflo {self.forwarded}")
            return found
        if a.requests != c.requests:
            found.append(f"{t}: answered {a.requests}, counted in {where} {c.requests}")
        if a.billable != c.billable:
            found.append(f"{t}: billable {a.billable}, billable in {where} {c.billable}")
        if self.forwarded is not None and self.forwarded != a.billable:
            found.append(f"{t}: billable {a.billable}, {CALLS_METER} units in Amberflo {self.forwarded}")
        return found

    @property
    def matches(self) -> bool:
        """True when the lake counted exactly what was answered and Amberflo holds exactly the billable units."""
        return not self.differences

    def __str__(self) -> str:
        a, c = self.answered, self.counted
        if self.meter != CALLS_METER:
            return self._event_line()
        line = (
            f"{self.label:>12}: answered {a.requests:>5} {_mark(a.requests, c.requests)} counted in "
            f"{self.counted_in} {c.requests:>5}  billable {a.billable:>5}"
        )
        if c.billable != a.billable:
            line += f" != billable in {self.counted_in} {c.billable:>5}"
        if self.forwarded is None:
            line += f"  ({self.not_forwarded_reason})"
        else:
            line += f" {_mark(a.billable, self.forwarded)} {CALLS_METER} units in Amberflo {self.forwarded:>5}"
        return f"{line}  {'OK' if self.matches else 'MISMATCH'}"

    def _event_line(self) -> str:
        a, c = self.answered, self.counted
        same = "==" if (a.requests, a.billable) == (c.requests, c.billable) else "!="
        line = (
            f"{self.label:>12} {self.meter}: ingested {a.requests:>5} events {a.billable:>7} units {same} counted "
            f"in {self.counted_in} {c.requests:>5} / {c.billable:>7}"
        )
        if self.forwarded is None:
            line += f"  ({self.not_forwarded_reason})"
        else:
            line += f" {_mark(a.billable, self.forwarded)} units in Amberflo {self.forwarded:>7}"
        return f"{line}  {'OK' if self.matches else 'MISMATCH'}"


@dataclass(frozen=True, slots=True)
class RunReconciliation:
    """Every tenant's line and the verdict."""

    lines: tuple[TenantReconciliation, ...]

    @property
    def ok(self) -> bool:
        """True when there is a line and every line matches."""
        return bool(self.lines) and all(line.matches for line in self.lines)

    @property
    def differences(self) -> list[str]:
        """Every difference of every line."""
        return [difference for line in self.lines for difference in line.differences]


#: A tenant as a run's tallies key it: the check's tenants all have ids, the demo's traffic may have none.
_Tenant = TypeVar("_Tenant", str, str | None)


def reconcile_run(
    answered: Mapping[_Tenant, Tally],
    counted: Mapping[_Tenant, Tally],
    forwarded: Mapping[str, int] | None,
    *,
    counted_in: str,
    not_forwarded_reason: str = "forwarding is a dry run",
    meter: str = CALLS_METER,
) -> RunReconciliation:
    """Pair, per tenant seen on any side, what the API answered, what the lake counted and what Amberflo holds, for
    ``meter`` (the calls meter's requests, or an event meter's ingested events and units).

    ``forwarded`` None: Amberflo is not compared (a dry run), and each line says ``not_forwarded_reason``. Requests
    with no tenant are never forwarded, so their line compares the lake only. A tenant missing from a side counts
    zero there.
    """
    tenants = sorted(set(answered) | set(counted) | set(forwarded or {}), key=lambda t: (t is None, t or ""))
    return RunReconciliation(
        tuple(
            TenantReconciliation(
                tenant,
                answered.get(tenant, Tally()),
                counted.get(tenant, Tally()),
                None if forwarded is None or tenant is None else forwarded.get(tenant, 0),
                counted_in,
                "no tenant: not forwarded" if tenant is None else not_forwarded_reason,
                meter,
            )
            for tenant in tenants
        )
    )
