"""The meter registry: event meters through the API, request meters from the config, and the rules between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meterlake.amberflo.api import RequestError
from meterlake.meters import DEFAULT_METERS, Condition, Meter
from meterlake.service.registry import MeterRegistry, RegisteredMeter, RegistryConflictError, request_meter_id
from meterlake.service.store import ServiceStore


def body(**overrides: Any) -> dict[str, Any]:
    return {"label": "LLM tokens", "meterApiName": "llm-tokens", "meterType": "sum_of_all_usage", **overrides}


@pytest.fixture
def store(tmp_path: Path) -> ServiceStore:
    return ServiceStore(tmp_path / "registry.db")


@pytest.fixture
def registry(store: ServiceStore) -> MeterRegistry:
    return MeterRegistry(store, DEFAULT_METERS)


def test_config_meters_are_request_meters_with_stable_ids(registry: MeterRegistry, store: ServiceStore) -> None:
    meters = registry.meters()
    assert [(m.meter_api_name, m.kind) for m in meters] == [("api-calls", "request"), ("egress-bytes", "request")]
    assert meters[0].id == request_meter_id("api-calls")
    assert meters[0].dimensions == ("resource_path", "http_method")
    assert meters[0].to_api()["lockingStatus"] == "close_to_changes"
    again = MeterRegistry(store, DEFAULT_METERS).meters()
    assert again == meters  # reopening changes nothing


def test_the_registry_follows_the_config_and_cannot_drift(store: ServiceStore) -> None:
    MeterRegistry(store, DEFAULT_METERS)
    slow = Meter(
        meter_api_name="slow-calls",
        label="Slow calls",
        filter=(Condition(column="response_latency_ms", op=">=", value=1000),),
    )
    relabelled = Meter(meter_api_name="api-calls", label="Calls", description="changed")
    registry = MeterRegistry(store, (relabelled, slow))
    names = {m.meter_api_name: m for m in registry.meters()}
    assert set(names) == {"api-calls", "slow-calls"}  # egress-bytes left the config, so it left the registry
    assert (names["api-calls"].label, names["api-calls"].description) == ("Calls", "changed")
    with pytest.raises(RequestError, match="request meter") as refused:
        registry.update(names["api-calls"].id, body(meterApiName="api-calls"))
    assert refused.value.status == 400
    with pytest.raises(RequestError, match="request meter"):
        registry.delete(names["slow-calls"].id)
    with pytest.raises(RequestError, match="meterApiName 'api-calls' is taken"):
        registry.create(body(meterApiName="api-calls"))


def test_a_config_meter_named_like_an_event_meter_is_refused(store: ServiceStore) -> None:
    MeterRegistry(store, DEFAULT_METERS).create(body(meterApiName="gpu-seconds"))
    with pytest.raises(RegistryConflictError, match="gpu-seconds"):
        MeterRegistry(store, (*DEFAULT_METERS, Meter(meter_api_name="gpu-seconds", label="GPU")))


def test_event_meter_crud(registry: MeterRegistry) -> None:
    changes: list[tuple[str, str]] = []
    registry._on_change = lambda action, meter: changes.append((action, meter.meter_api_name))
    created = registry.create(body(dimensions=["model"]))
    assert (created.kind, created.create_time_ms) == ("event", created.update_time_ms)
    assert registry.get(created.id) == created
    assert registry.by_name("llm-tokens") == created
    updated = registry.update(created.id, body(meterApiName="llm-trial", label="Trial"))
    assert (updated.id, updated.create_time_ms, updated.meter_api_name) == (
        created.id,
        created.create_time_ms,
        "llm-trial",
    )
    assert updated.update_time_ms > created.update_time_ms
    assert registry.by_name("llm-tokens") is None
    assert list(registry.event_meters()) == ["llm-trial"]
    assert registry.delete(created.id) == updated
    with pytest.raises(RequestError) as missing:
        registry.get(created.id)
    assert missing.value.status == 404
    assert changes == [("created", "llm-tokens"), ("updated", "llm-trial"), ("deleted", "llm-trial")]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"label": ""}, "label"),
        ({"meterApiName": None}, "meterApiName"),
        ({"meterApiName": "x" * 51}, "meterApiName"),
        ({"meterApiName": "has space"}, "meterApiName"),
        ({"meterApiName": "a:b"}, "meterApiName"),
        ({"meterType": "average"}, "meterType"),
        ({"lockingStatus": "frozen"}, "lockingStatus"),
        ({"description": 3}, "description"),
        ({"dimensions": "model"}, "dimensions"),
        ({"dimensions": ["a", "a"]}, "dimensions"),
        ({"meterType": "unique_count"}, "dimensions"),
    ],
)
def test_invalid_meters_are_400_naming_the_field_and_change_nothing(
    registry: MeterRegistry, overrides: dict[str, Any], field: str
) -> None:
    before = registry.meters()
    with pytest.raises(RequestError) as refused:
        registry.create(body(**overrides))
    assert refused.value.status == 400
    assert field in refused.value.message
    assert registry.meters() == before


def test_locked_meters_refuse_changes_as_amberflo_does(registry: MeterRegistry) -> None:
    meter = registry.create(body(lockingStatus="close_to_changes"))
    with pytest.raises(RequestError, match="lockingStatus"):
        registry.update(meter.id, body(lockingStatus="close_to_changes", label="other"))
    with pytest.raises(RequestError, match="lockingStatus"):
        registry.delete(meter.id)
    unlocked = registry.update(meter.id, body(lockingStatus="close_to_deletion"))
    assert unlocked.locking_status == "close_to_deletion"
    assert registry.update(meter.id, body(label="renamed", lockingStatus="close_to_deletion")).label == "renamed"
    with pytest.raises(RequestError, match="cannot be deleted"):
        registry.delete(meter.id)
    registry.update(meter.id, body())
    assert isinstance(registry.delete(meter.id), RegisteredMeter)


def test_unknown_ids_are_404(registry: MeterRegistry) -> None:
    with pytest.raises(RequestError) as missing:
        registry.update("nope", body())
    assert missing.value.status == 404
    with pytest.raises(RequestError) as missing:
        registry.delete("nope")
    assert missing.value.status == 404
