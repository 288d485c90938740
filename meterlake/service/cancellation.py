"""Cancellation rules: undo wrong usage by excluding matching events from every usage number, deleting nothing.

A rule is Amberflo's custom filtering rule (``POST /ingest-snapshot/custom-filtering-rules``, which the toolkit
plug-in exposes as ``DELETE /usage``): ``id``, ``meterApiName``, ``type`` ``by_property_filter_out`` and an
``ingestionTimeRange``, optionally narrowed by ``filter`` to customers (``customerId``) and dimension values. An event
of the meter matches when it was ingested within the range (``[start, end)``, by the service's ingestion time, not
the event's own time) and, for each filter key, its value is one of those listed. Matching events leave every usage
number from the moment the rule is stored; removing the rule brings them back. Rules are kept when removed (with the
time), so what was cancelled when can always be told.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from meterlake.amberflo.api import CUSTOMER_KEY, FILTER_OUT_RULE_TYPE, RequestError, epoch_seconds, parse_filter
from meterlake.service.registry import MeterRegistry
from meterlake.service.store import ServiceStore

RULE_ID_MAX_CHARS = 128


@dataclass(frozen=True, slots=True)
class CancellationRule:
    """One rule: which meter's events, ingested when, narrowed by which customers and dimension values."""

    id: str
    meter_api_name: str
    start_s: int
    end_s: int
    filters: Mapping[str, frozenset[str]]
    created_ms: int
    removed_ms: int | None = None

    def to_api(self) -> dict[str, object]:
        """Amberflo's rule object, plus when it was created (and removed)."""
        document: dict[str, object] = {
            "id": self.id,
            "meterApiName": self.meter_api_name,
            "type": FILTER_OUT_RULE_TYPE,
            "ingestionTimeRange": {"startTimeInSeconds": self.start_s, "endTimeInSeconds": self.end_s},
            "filter": {key: sorted(values) for key, values in sorted(self.filters.items())},
            "createTime": self.created_ms,
        }
        if self.removed_ms is not None:
            document["removeTime"] = self.removed_ms
        return document


def parse_rule(body: object, registry: MeterRegistry, *, now_ms: int) -> CancellationRule:
    """A rule from a request body; ``id``, ``meterApiName`` and ``ingestionTimeRange`` are required.

    Raises:
        RequestError: (400) naming the field at fault.
    """
    if not isinstance(body, dict):
        raise RequestError(f"a cancellation rule must be a JSON object, got {type(body).__name__}")
    missing = [key for key in ("id", "meterApiName", "ingestionTimeRange") if key not in body]
    if missing:
        raise RequestError(f"{', '.join(missing)}: required (id, meterApiName and ingestionTimeRange)")
    rule_id = body["id"]
    if not isinstance(rule_id, str) or not 1 <= len(rule_id) <= RULE_ID_MAX_CHARS:
        raise RequestError(f"id must be a string of 1-{RULE_ID_MAX_CHARS} characters, got {rule_id!r}")
    name = body["meterApiName"]
    meter = registry.by_name(name) if isinstance(name, str) else None
    if meter is None:
        raise RequestError(f"meterApiName {name!r} is not a meter")
    rule_type = body.get("type", FILTER_OUT_RULE_TYPE)
    if rule_type != FILTER_OUT_RULE_TYPE:
        raise RequestError(f"type must be {FILTER_OUT_RULE_TYPE!r}, got {rule_type!r}")
    window = body["ingestionTimeRange"]
    if not isinstance(window, dict):
        raise RequestError(f"ingestionTimeRange must be an object, got {window!r}")
    for key in ("startTimeInSeconds", "endTimeInSeconds"):
        if key not in window:
            raise RequestError(f"ingestionTimeRange.{key} is required")
    start_s = epoch_seconds("ingestionTimeRange.startTimeInSeconds", window["startTimeInSeconds"])
    end_s = epoch_seconds("ingestionTimeRange.endTimeInSeconds", window["endTimeInSeconds"])
    if end_s <= start_s:
        raise RequestError(f"ingestionTimeRange.endTimeInSeconds ({end_s}) must be after its start ({start_s})")
    filters = parse_filter("filter", body.get("filter"))
    for key, values in filters.items():
        if not values:
            raise RequestError(f"filter.{key} must list at least one value")
        if meter.kind == "request" and key != CUSTOMER_KEY and key not in meter.dimensions:
            raise RequestError(f"filter.{key}: request meter {name!r} has no such dimension ({list(meter.dimensions)})")
    return CancellationRule(rule_id, meter.meter_api_name, start_s, end_s, filters, now_ms)


class CancellationRules:
    """The rules, stored in the service's database; the active ones of a meter are read on every usage query."""

    def __init__(self, store: ServiceStore) -> None:
        self._store = store

    def put(self, rule: CancellationRule) -> CancellationRule:
        """Store ``rule``, replacing an earlier rule with its id (removed or not), as Amberflo's create-or-update."""
        with self._store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO cancellation_rules (id, meter_api_name, start_s, end_s, filter, created_ms, "
                "removed_ms) VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (rule.id, rule.meter_api_name, rule.start_s, rule.end_s, _encode(rule.filters), rule.created_ms),
            )
        return rule

    def rules(self, *, meter_api_name: str | None = None, include_removed: bool = False) -> list[CancellationRule]:
        """Rules, oldest first: active ones (and removed ones with ``include_removed``), of one meter or all."""
        rows = self._store.query(
            "SELECT id, meter_api_name, start_s, end_s, filter, created_ms, removed_ms FROM cancellation_rules "
            "WHERE (? IS NULL OR meter_api_name = ?) AND (? OR removed_ms IS NULL) ORDER BY created_ms, id",
            (meter_api_name, meter_api_name, include_removed),
        )
        return [
            CancellationRule(str(i), str(m), int(s), int(e), _decode(f), int(c), None if r is None else int(r))
            for i, m, s, e, f, c, r in rows
        ]

    def remove(self, rule_id: str) -> CancellationRule:
        """Remove an active rule (kept, marked removed): its events count again.

        Raises:
            RequestError: (404) no active rule has this id.
        """
        now = time.time_ns() // 1_000_000
        with self._store.transaction() as db:
            changed = db.execute(
                "UPDATE cancellation_rules SET removed_ms = ? WHERE id = ? AND removed_ms IS NULL", (now, rule_id)
            ).rowcount
        if not changed:
            raise RequestError(f"cancellation rule {rule_id!r} not found", status=404)
        return next(rule for rule in self.rules(include_removed=True) if rule.id == rule_id)


def _encode(filters: Mapping[str, frozenset[str]]) -> str:
    return json.dumps({key: sorted(values) for key, values in sorted(filters.items())})


def _decode(text: str) -> dict[str, frozenset[str]]:
    return {key: frozenset(values) for key, values in json.loads(text).items()}
