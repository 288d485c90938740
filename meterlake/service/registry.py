"""The meter registry: every meter the service answers for, event meters and request meters in one list.

* **Event meters** are created, changed and deleted through the API (Amberflo's meter shape); ingested records count
  for them.
* **Request meters** are the config's meters (``meterlake.meters.Meter``) over the access-log table: ``api-calls``,
  ``egress-bytes`` and any the user declares. They are written into the registry from the config every time it is
  opened, with ids derived from their names, and the API refuses to change or delete them: the config is their one
  definition, so the registry cannot drift from it. A config meter named like an existing event meter is refused.

A meter's ``lockingStatus`` works as Amberflo's: ``close_to_changes`` refuses every change but the one that unlocks
it (and deletion), ``close_to_deletion`` refuses deletion, ``deprecated`` refuses new events.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from meterlake.amberflo.api import Aggregation, RequestError, meter_type_aggregation, validate_meter
from meterlake.meters import METER_NAME_PATTERN, Meter
from meterlake.service.store import ServiceStore

MeterKind = Literal["event", "request"]
#: Request meters' ids: uuid5 of their name in this namespace, the same in every data dir.
_REQUEST_METER_NAMESPACE = uuid.UUID("5d1b6f9e-3c0a-4f43-9e0c-2a7f1f0b8e11")
_METER_NAME = re.compile(METER_NAME_PATTERN)
_COLUMNS = (
    "id, meter_api_name, kind, label, meter_type, description, dimensions, aggregation_dimensions, locking_status, "
    "create_time_ms, update_time_ms"
)


class RegistryConflictError(Exception):
    """The config declares a meter whose name an event meter created through the API already has."""


@dataclass(frozen=True, slots=True)
class RegisteredMeter:
    """One meter of the registry, as the API shows it (:meth:`to_api`)."""

    id: str
    meter_api_name: str
    kind: MeterKind
    label: str
    meter_type: str
    description: str
    dimensions: tuple[str, ...]
    aggregation_dimensions: tuple[str, ...]
    locking_status: str
    create_time_ms: int
    update_time_ms: int

    @property
    def default_aggregation(self) -> Aggregation:
        """How its usage aggregates when a query names no aggregation."""
        return meter_type_aggregation(self.meter_type)

    def to_api(self) -> dict[str, Any]:
        """Amberflo's meter object, plus ``kind`` (event or request)."""
        return {
            "id": self.id,
            **self.fields(),
            "createTime": self.create_time_ms,
            "updateTime": self.update_time_ms,
            "kind": self.kind,
        }

    def fields(self) -> dict[str, Any]:
        """The fields a create or update body sets (what :func:`validate_meter` returns)."""
        return {
            "label": self.label,
            "meterApiName": self.meter_api_name,
            "meterType": self.meter_type,
            "description": self.description,
            "dimensions": list(self.dimensions),
            "aggregationDimensions": list(self.aggregation_dimensions),
            "lockingStatus": self.locking_status,
        }


def request_meter_id(meter_api_name: str) -> str:
    """The id of the request meter with this name (stable across restarts and data dirs)."""
    return str(uuid.uuid5(_REQUEST_METER_NAMESPACE, meter_api_name))


def parse_meter_body(body: object) -> dict[str, Any]:
    """A create/update body checked as Amberflo checks it, and as meterlake's meter names require.

    Raises:
        RequestError: (400) naming the field.
    """
    fields = validate_meter(body)
    name = fields["meterApiName"]
    if not _METER_NAME.match(name):
        raise RequestError(f"meterApiName {name!r} must be letters, digits, '_' or '-'")
    for key in ("dimensions", "aggregationDimensions"):
        names = fields[key]
        if any(not item for item in names) or len(set(names)) != len(names):
            raise RequestError(f"{key} must be distinct non-empty names, got {names!r}")
    if meter_type_aggregation(fields["meterType"]) == "UNIQUE_COUNT" and not fields["dimensions"]:
        raise RequestError(
            f"dimensions must name the dimension a {fields['meterType']} meter counts distinct values of (its first)"
        )
    return fields


class MeterRegistry:
    """The registry over the service's database; ``config_meters`` are written in as request meters on open.

    ``on_change`` is told every created, updated or deleted event meter (``("deleted", meter)`` for a deletion),
    after the change is committed, e.g. to sync it to Amberflo.

    Raises (from the constructor):
        RegistryConflictError: a config meter has the name of an event meter.
    """

    def __init__(
        self,
        store: ServiceStore,
        config_meters: Sequence[Meter],
        *,
        on_change: Callable[[str, RegisteredMeter], None] | None = None,
    ) -> None:
        self._store = store
        self._on_change = on_change
        # Every change goes through this object (the service is the registry's one writer), so a cached list is
        # exact; ingest reads it on every request.
        self._cache: list[RegisteredMeter] | None = None
        #: (the cached list they come from, event meters by name, request meter names).
        self._views: tuple[list[RegisteredMeter], Mapping[str, RegisteredMeter], frozenset[str]] | None = None
        self._sync_config(config_meters)

    def _sync_config(self, config_meters: Sequence[Meter]) -> None:
        now = _now_ms()
        with self._store.transaction() as db:
            existing = {row[1]: _meter(row) for row in db.execute(f"SELECT {_COLUMNS} FROM meters")}  # noqa: S608
            wanted = {meter.meter_api_name: meter for meter in config_meters}
            for name, meter in wanted.items():
                current = existing.get(name)
                if current is not None and current.kind == "event":
                    raise RegistryConflictError(
                        f"meter {name!r} is declared in the config (a request meter) and was also created through the "
                        f"API (event meter {current.id}); delete the event meter or rename one of them"
                    )
                row = (
                    meter.label,
                    meter.meter_type,
                    meter.description,
                    json.dumps(list(meter.dimensions)),
                    json.dumps([]),
                    "close_to_changes",
                )
                if current is None:
                    db.execute(
                        f"INSERT INTO meters ({_COLUMNS}) VALUES (?, ?, 'request', ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                        (request_meter_id(name), name, *row, now, now),
                    )
                elif _request_row(current) != row:
                    db.execute(
                        "UPDATE meters SET label = ?, meter_type = ?, description = ?, dimensions = ?, "
                        "aggregation_dimensions = ?, locking_status = ?, update_time_ms = ? WHERE id = ?",
                        (*row, now, current.id),
                    )
            for name, current in existing.items():
                if current.kind == "request" and name not in wanted:
                    db.execute("DELETE FROM meters WHERE id = ?", (current.id,))

    # -- reading -----------------------------------------------------------------------------------------------------

    def meters(self) -> list[RegisteredMeter]:
        """Every meter, request meters first, then event meters in creation order."""
        cached = self._cache
        if cached is None:
            rows = self._store.query(
                f"SELECT {_COLUMNS} FROM meters ORDER BY kind = 'event', create_time_ms, meter_api_name"  # noqa: S608
            )
            cached = self._cache = [_meter(row) for row in rows]
        return list(cached)

    def get(self, meter_id: str) -> RegisteredMeter:
        """The meter with this id.

        Raises:
            RequestError: (404) no such meter.
        """
        rows = self._store.query(f"SELECT {_COLUMNS} FROM meters WHERE id = ?", (meter_id,))  # noqa: S608
        if not rows:
            raise RequestError(f"meter {meter_id!r} not found", status=404)
        return _meter(rows[0])

    def by_name(self, meter_api_name: str) -> RegisteredMeter | None:
        """The meter with this meterApiName, or None."""
        rows = self._store.query(
            f"SELECT {_COLUMNS} FROM meters WHERE meter_api_name = ?",  # noqa: S608
            (meter_api_name,),
        )
        return _meter(rows[0]) if rows else None

    def event_meters(self) -> Mapping[str, RegisteredMeter]:
        """Event meters by meterApiName (what ingest checks records against)."""
        return self._derived()[1]

    def request_meter_names(self) -> frozenset[str]:
        """The names of the request meters (the config's)."""
        return self._derived()[2]

    def _derived(self) -> tuple[list[RegisteredMeter], Mapping[str, RegisteredMeter], frozenset[str]]:
        """Both views of the cached list, made once per version of it (ingest asks on every request)."""
        self.meters()
        source, views = self._cache, self._views
        if source is None:  # changed meanwhile: views of a fresh read, not kept
            source = self.meters()
        elif views is not None and views[0] is source:
            return views
        views = (
            source,
            MappingProxyType({meter.meter_api_name: meter for meter in source if meter.kind == "event"}),
            frozenset(meter.meter_api_name for meter in source if meter.kind == "request"),
        )
        if source is self._cache:
            self._views = views
        return views

    # -- changing ----------------------------------------------------------------------------------------------------

    def create(self, body: object) -> RegisteredMeter:
        """Create an event meter from an Amberflo meter body.

        Raises:
            RequestError: (400) the body is invalid or the meterApiName is taken (the message names the field).
        """
        fields = parse_meter_body(body)
        now = _now_ms()
        meter = RegisteredMeter(
            id=str(uuid.uuid4()),
            meter_api_name=fields["meterApiName"],
            kind="event",
            label=fields["label"],
            meter_type=fields["meterType"],
            description=fields["description"],
            dimensions=tuple(fields["dimensions"]),
            aggregation_dimensions=tuple(fields["aggregationDimensions"]),
            locking_status=fields["lockingStatus"],
            create_time_ms=now,
            update_time_ms=now,
        )
        with self._store.transaction() as db:
            self._check_name_free(db, meter.meter_api_name, except_id=None)
            db.execute(f"INSERT INTO meters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _row(meter))  # noqa: S608
        self._changed("created", meter)
        return meter

    def update(self, meter_id: str, body: object) -> RegisteredMeter:
        """Replace an event meter's fields (keeping its id and createTime).

        Raises:
            RequestError: (404) no such meter; (400) a request meter, a locked meter, an invalid body or a taken name.
        """
        fields = parse_meter_body(body)
        with self._store.transaction() as db:
            current = self._current(db, meter_id)
            self._check_changeable(current, "changed")
            if (
                current.locking_status == "close_to_changes"
                and {
                    **fields,
                    "lockingStatus": current.locking_status,
                }
                != current.fields()
            ):
                raise RequestError(
                    f"lockingStatus: meter {current.meter_api_name!r} is close_to_changes; only its lockingStatus can "
                    "change (unlock it first)"
                )
            self._check_name_free(db, fields["meterApiName"], except_id=meter_id)
            meter = RegisteredMeter(
                id=meter_id,
                meter_api_name=fields["meterApiName"],
                kind="event",
                label=fields["label"],
                meter_type=fields["meterType"],
                description=fields["description"],
                dimensions=tuple(fields["dimensions"]),
                aggregation_dimensions=tuple(fields["aggregationDimensions"]),
                locking_status=fields["lockingStatus"],
                create_time_ms=current.create_time_ms,
                update_time_ms=max(_now_ms(), current.update_time_ms + 1),
            )
            db.execute("DELETE FROM meters WHERE id = ?", (meter_id,))
            db.execute(f"INSERT INTO meters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _row(meter))  # noqa: S608
        self._changed("updated", meter)
        return meter

    def delete(self, meter_id: str) -> RegisteredMeter:
        """Delete an event meter and return it. Its events stay in the lake (nothing is physically deleted).

        Raises:
            RequestError: (404) no such meter; (400) a request meter, or one locked against deletion.
        """
        with self._store.transaction() as db:
            current = self._current(db, meter_id)
            self._check_changeable(current, "deleted")
            if current.locking_status in ("close_to_deletion", "close_to_changes"):
                raise RequestError(
                    f"lockingStatus: meter {current.meter_api_name!r} is {current.locking_status}; it cannot be deleted"
                )
            db.execute("DELETE FROM meters WHERE id = ?", (meter_id,))
        self._changed("deleted", current)
        return current

    # -- internals ---------------------------------------------------------------------------------------------------

    def _changed(self, action: str, meter: RegisteredMeter) -> None:
        self._cache = None
        if self._on_change is not None:
            self._on_change(action, meter)

    @staticmethod
    def _current(db: Any, meter_id: str) -> RegisteredMeter:
        row = db.execute(f"SELECT {_COLUMNS} FROM meters WHERE id = ?", (meter_id,)).fetchone()  # noqa: S608
        if row is None:
            raise RequestError(f"meter {meter_id!r} not found", status=404)
        return _meter(row)

    @staticmethod
    def _check_changeable(meter: RegisteredMeter, verb: str) -> None:
        if meter.kind == "request":
            raise RequestError(
                f"meterApiName: {meter.meter_api_name!r} is a request meter, defined in the config's meters "
                f"(cdk.context.json); it cannot be {verb} through the API"
            )

    @staticmethod
    def _check_name_free(db: Any, name: str, *, except_id: str | None) -> None:
        row = db.execute("SELECT id, kind FROM meters WHERE meter_api_name = ?", (name,)).fetchone()
        if row is not None and row[0] != except_id:
            raise RequestError(f"meterApiName {name!r} is taken by {row[1]} meter {row[0]}")


def _request_row(meter: RegisteredMeter) -> tuple[str, str, str, str, str, str]:
    return (
        meter.label,
        meter.meter_type,
        meter.description,
        json.dumps(list(meter.dimensions)),
        json.dumps(list(meter.aggregation_dimensions)),
        meter.locking_status,
    )


def _row(meter: RegisteredMeter) -> tuple[Any, ...]:
    return (
        meter.id,
        meter.meter_api_name,
        meter.kind,
        meter.label,
        meter.meter_type,
        meter.description,
        json.dumps(list(meter.dimensions)),
        json.dumps(list(meter.aggregation_dimensions)),
        meter.locking_status,
        meter.create_time_ms,
        meter.update_time_ms,
    )


def _meter(row: Sequence[Any]) -> RegisteredMeter:
    return RegisteredMeter(
        id=str(row[0]),
        meter_api_name=str(row[1]),
        kind="request" if row[2] == "request" else "event",
        label=str(row[3]),
        meter_type=str(row[4]),
        description=str(row[5]),
        dimensions=tuple(json.loads(row[6])),
        aggregation_dimensions=tuple(json.loads(row[7])),
        locking_status=str(row[8]),
        create_time_ms=int(row[9]),
        update_time_ms=int(row[10]),
    )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
