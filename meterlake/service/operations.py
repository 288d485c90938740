"""The metering service's operations, whatever the transport: each checks the caller, then calls the domain.

Adapters (the ASGI app locally; Lambda handlers on AWS, in a later issue) parse the request, call one method here
with the caller (:class:`~meterlake.service.auth.Principal`) and shape the answer in their dialect. Meter changes and
new cancellation rules are told to ``mirror`` (Amberflo, when forwarding is on) after they are stored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from meterlake.amberflo.api import (
    ALL_AGGREGATIONS,
    CUSTOMER_KEY,
    IngestRecord,
    RequestError,
    UsageQuery,
    parse_customer,
    parse_usage_query,
)
from meterlake.service.auth import Principal, require_admin, scope_usage_query
from meterlake.service.cancellation import CancellationRule, CancellationRules, parse_rule
from meterlake.service.events import EventSource
from meterlake.service.forwarding import MirrorError
from meterlake.service.ingest import Ingestor, IngestOutcome
from meterlake.service.registry import MeterRegistry, RegisteredMeter
from meterlake.service.usage import UsageEngine

DAY_S = 86_400


class Mirror(Protocol):
    """Where meter changes and cancellation rules are repeated (Amberflo, when forwarding is on)."""

    def meter_changed(self, action: str, meter: RegisteredMeter, previous: RegisteredMeter | None = None) -> None:
        """``action`` is created, updated (``previous``: the meter before) or deleted."""

    def rule_created(self, rule: CancellationRule) -> None:
        """A cancellation rule was stored."""

    def ensure_customer(self, customer: dict[str, Any]) -> Literal["created", "updated"]:
        """Create the customer, or update it if it exists (raises MirrorError when refused)."""


class MeteringService:
    """Meters, ingest, usage and cancellation for one deployment of the service."""

    def __init__(
        self,
        *,
        registry: MeterRegistry,
        rules: CancellationRules,
        ingestor: Ingestor,
        usage: UsageEngine,
        mirror: Mirror | None = None,
    ) -> None:
        self.registry = registry
        self.rules = rules
        self.ingestor = ingestor
        self.usage_engine = usage
        self._mirror = mirror

    # -- meters ------------------------------------------------------------------------------------------------------

    def list_meters(self, principal: Principal) -> list[RegisteredMeter]:
        """Every meter (admins only)."""
        require_admin(principal, "listing meters")
        return self.registry.meters()

    def get_meter(self, principal: Principal, meter_id: str) -> RegisteredMeter:
        """One meter by id (admins only; 404 if unknown)."""
        require_admin(principal, "reading meters")
        return self.registry.get(meter_id)

    def create_meter(self, principal: Principal, body: object) -> RegisteredMeter:
        """Create an event meter (admins only)."""
        require_admin(principal, "creating meters")
        meter = self.registry.create(body)
        if self._mirror is not None:
            self._mirror.meter_changed("created", meter)
        return meter

    def update_meter(self, principal: Principal, meter_id: str | None, body: object) -> RegisteredMeter:
        """Replace an event meter's fields; its id from the path or, for Amberflo's ``PUT /meters``, the body.

        Raises:
            RequestError: (400) no id, or the body's id differs from the path's, or a new meterApiName for a meter
                that has events or cancellation rules; and the registry's errors.
        """
        require_admin(principal, "changing meters")
        body_id = body.get("id") if isinstance(body, dict) else None
        if meter_id is not None and body_id is not None and body_id != meter_id:
            raise RequestError(f"id: the body's {body_id!r} differs from the path's {meter_id!r}")
        chosen = meter_id or body_id
        if not isinstance(chosen, str) or not chosen:
            raise RequestError("id is required: in the path (PUT /meters/{meterId}) or in the body (PUT /meters)")
        previous = self.registry.get(chosen)
        name = body.get("meterApiName") if isinstance(body, dict) else None
        if previous.kind == "event" and isinstance(name, str) and name != previous.meter_api_name:
            self._refuse_orphaning_rename(previous, name)
        meter = self.registry.update(chosen, body)
        if self._mirror is not None:
            self._mirror.meter_changed("updated", meter, previous)
        return meter

    def _refuse_orphaning_rename(self, meter: RegisteredMeter, name: str) -> None:
        """Events and rules name their meter by meterApiName: once a meter has either, a new name would leave them
        counting for no meter (and its billing history with them), so it keeps its name.

        Raises:
            RequestError: (400) the meter has events or cancellation rules.
        """
        held = []
        if self.usage_engine.has_events(meter):
            held.append("events")
        if self.rules.rules(meter_api_name=meter.meter_api_name, include_removed=True):
            held.append("cancellation rules")
        if held:
            raise RequestError(
                f"meterApiName: meter {meter.meter_api_name!r} has {' and '.join(held)}, which name it; renaming it "
                f"to {name!r} would orphan them. Create a meter named {name!r} instead"
            )

    def delete_meter(self, principal: Principal, meter_id: str) -> RegisteredMeter:
        """Delete an event meter (admins only); its events stay in the lake."""
        require_admin(principal, "deleting meters")
        meter = self.registry.delete(meter_id)
        if self._mirror is not None:
            self._mirror.meter_changed("deleted", meter)
        return meter

    # -- customers ---------------------------------------------------------------------------------------------------

    def onboard_customer(self, principal: Principal, body: object) -> dict[str, Any]:
        """Onboard a tenant as a customer (admins only): with forwarding on, its Amberflo customer is created, or
        updated if it exists (so onboarding twice is harmless); without, nothing is sent (``amberflo: "off"``).

        Raises:
            RequestError: (403) not an admin; (400) an invalid customer; (502) Amberflo refused it.
        """
        require_admin(principal, "onboarding customers")
        customer = parse_customer(body)
        if self._mirror is None:
            return {"customer": customer, "amberflo": "off"}
        try:
            action = self._mirror.ensure_customer(customer)
        except MirrorError as exc:
            raise RequestError(f"Amberflo did not take customer {customer['customerId']!r}: {exc}", status=502) from exc
        return {"customer": customer, "amberflo": action}

    # -- ingest ------------------------------------------------------------------------------------------------------

    async def ingest(
        self,
        principal: Principal,
        items: Sequence[IngestRecord] | Sequence[object],
        *,
        source: EventSource,
        partial: bool,
    ) -> IngestOutcome:
        """Check and durably store usage records (admins, or a tenant for its own customerId)."""
        return await self.ingestor.ingest(principal, items, source=source, partial=partial)

    # -- usage -------------------------------------------------------------------------------------------------------

    def parse_query(self, body: object) -> UsageQuery:
        """A usage query body (either accepted shape); aggregation defaults to the meter's own."""
        return parse_usage_query(body, now_s=_now_s(), aggregations=ALL_AGGREGATIONS, aggregation_required=False)

    def usage(self, principal: Principal, query: UsageQuery, *, zero_fill: bool) -> dict[str, Any]:
        """Amberflo's usage report (a tenant's narrowed to its own customerId)."""
        return self.usage_engine.report(scope_usage_query(principal, query), zero_fill=zero_fill)

    def usage_of_meter_id(self, principal: Principal, meter_id: str, params: dict[str, list[str]]) -> dict[str, Any]:
        """The toolkit's ``GET /usage/{meterId}``: the query string's ``meterApiName`` (else the meter's own),
        ``startTimeInSeconds`` (default: 24 h ago), ``endTimeInSeconds`` (default: now), ``timeGroupingInterval``
        (default DAY), optionally ``aggregation``, ``groupBy`` and ``customerId`` (repeatable).

        Raises:
            RequestError: (404) unknown meter; (400) a malformed value or a meterApiName not the meter's.
        """
        meter = self.registry.get(meter_id)
        name = _one(params, "meterApiName") or meter.meter_api_name
        if name != meter.meter_api_name:
            raise RequestError(f"meterApiName {name!r} is not the name of meter {meter_id} ({meter.meter_api_name!r})")
        now_s = _now_s()
        body: dict[str, object] = {
            "meterApiName": name,
            "timeGroupingInterval": _one(params, "timeGroupingInterval") or "DAY",
            "startTimeInSeconds": _int(params, "startTimeInSeconds", now_s - DAY_S),
            "endTimeInSeconds": _int(params, "endTimeInSeconds", now_s),
        }
        aggregation = _one(params, "aggregation")
        if aggregation is not None:
            body["aggregation"] = aggregation
        if params.get("groupBy"):
            body["groupBy"] = [key for value in params["groupBy"] for key in value.split(",") if key]
        if params.get(CUSTOMER_KEY):
            body["customerFilter"] = list(params[CUSTOMER_KEY])
        return self.usage(principal, self.parse_query(body), zero_fill=True)

    def usage_of_all_meters(self, principal: Principal, params: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Amberflo's ``GET /usage/all``: one SUM report per meter (``startTimeInSeconds``, ``endTimeInSeconds``,
        ``timeGroupingInterval``, ``groupBy=customerId``, ``customerId``)."""
        body: dict[str, object] = {"aggregation": "SUM", "timeGroupingInterval": _one(params, "timeGroupingInterval")}
        for name in ("startTimeInSeconds", "endTimeInSeconds"):
            if _one(params, name) is not None:
                body[name] = _int(params, name, 0)
        group_by = _one(params, "groupBy")
        if group_by is not None:
            body["groupBy"] = [group_by]
        if params.get(CUSTOMER_KEY):
            body["customerFilter"] = list(params[CUSTOMER_KEY])
        return [
            self.usage(principal, self.parse_query({**body, "meterApiName": meter.meter_api_name}), zero_fill=True)
            for meter in self.registry.meters()
        ]

    # -- cancellation ------------------------------------------------------------------------------------------------

    def create_rule(self, principal: Principal, body: object) -> CancellationRule:
        """Store a cancellation rule (admins only): matching events leave every usage number from now on."""
        require_admin(principal, "cancelling usage")
        rule = self.rules.put(parse_rule(body, self.registry, now_ms=time.time_ns() // 1_000_000))
        if self._mirror is not None:
            self._mirror.rule_created(rule)
        return rule

    def list_rules(
        self, principal: Principal, *, meter_api_name: str | None, include_removed: bool
    ) -> list[CancellationRule]:
        """The cancellation rules (admins only)."""
        require_admin(principal, "listing cancellation rules")
        return self.rules.rules(meter_api_name=meter_api_name, include_removed=include_removed)

    def remove_rule(self, principal: Principal, rule_id: str) -> CancellationRule:
        """Remove a rule (admins only): its events count again."""
        require_admin(principal, "removing cancellation rules")
        return self.rules.remove(rule_id)


def _now_s() -> int:
    """ "Now" as a range's default end: the end of the current second, so an event of this very second counts."""
    return int(time.time()) + 1


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise RequestError(f"{name} is given {len(values)} times; give it once")
    return values[0]


def _int(params: dict[str, list[str]], name: str, default: int) -> int:
    value = _one(params, name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RequestError(f"{name} must be an integer (epoch seconds), got {value!r}") from None
