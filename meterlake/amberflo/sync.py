"""``meterlake meters sync``: make Amberflo's meters match the config's (create the missing, update the changed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from meterlake.meters import Meter


class MeterSyncError(Exception):
    """Amberflo could not be reached, or refused to list, create or update a meter."""


@dataclass(frozen=True, slots=True)
class MeterSyncResult:
    """What happened to one meter."""

    meter_api_name: str
    action: Literal["created", "updated", "unchanged"]
    meter_id: str


def amberflo_meter(meter: Meter) -> dict[str, Any]:
    """The meter as Amberflo's meters API takes it (its dimensions are the meter's dimension columns)."""
    return {
        "label": meter.label,
        "meterApiName": meter.meter_api_name,
        "meterType": meter.meter_type,
        "description": meter.description,
        "dimensions": list(meter.dimensions),
    }


def sync_meters(client: httpx.Client, *, base_url: str, api_key: str, meters: Sequence[Meter]) -> list[MeterSyncResult]:
    """Create the meters Amberflo lacks and update those whose definition differs; leave others alone.

    Raises:
        MeterSyncError: naming the meter and Amberflo's answer.
    """
    root = base_url.rstrip("/")
    headers = {"X-API-KEY": api_key}
    existing = {m.get("meterApiName"): m for m in _call(client, "GET", f"{root}/meters", headers, None, "list meters")}
    results = []
    for meter in meters:
        wanted = amberflo_meter(meter)
        current = existing.get(meter.meter_api_name)
        if current is None:
            made = _call(client, "POST", f"{root}/meters", headers, wanted, f"create meter {meter.meter_api_name!r}")
            results.append(MeterSyncResult(meter.meter_api_name, "created", str(made.get("id", ""))))
        elif any(current.get(key) != value for key, value in wanted.items()):
            body = {**current, **wanted}
            _call(client, "PUT", f"{root}/meters", headers, body, f"update meter {meter.meter_api_name!r}")
            results.append(MeterSyncResult(meter.meter_api_name, "updated", str(current.get("id", ""))))
        else:
            results.append(MeterSyncResult(meter.meter_api_name, "unchanged", str(current.get("id", ""))))
    return results


def _call(
    client: httpx.Client, method: str, url: str, headers: dict[str, str], body: dict[str, Any] | None, what: str
) -> Any:
    try:
        answer = client.request(method, url, headers=headers, json=body, timeout=30)
    except httpx.HTTPError as exc:
        raise MeterSyncError(f"cannot {what}: Amberflo at {url} could not be reached ({exc})") from None
    if answer.status_code >= 300:
        raise MeterSyncError(f"cannot {what}: Amberflo answered {answer.status_code}: {answer.text[:200]}")
    return answer.json()
