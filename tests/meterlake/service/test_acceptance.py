"""Issue 12's acceptance, against `meterlake serve` in its own process: the Amberflo workflow fixture run by an
executor that reads the YAML, the toolkit README's sequence with the toolkit's request shapes, Amberflo's own Python
SDK, and a SIGKILL during ingest that loses nothing acknowledged."""

from __future__ import annotations

import asyncio
import re
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]

from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.local.auth import for_config
from meterlake.service.auth import ApiKeys
from meterlake.service.store import ServiceStore
from tests.conftest import FaultReport

WORKFLOW = Path(__file__).parents[1] / "amberflo" / "fixtures" / "amberflo-ingest-and-query-usage-workflow.yml"
DAY_S = 86_400
_CLI = [sys.executable, "-c", "from meterlake.cli import main; main()"]


@dataclass
class Serving:
    """A `meterlake serve` process and what calling it takes."""

    process: subprocess.Popen[str]
    url: str
    home: Path


def _start_serve(home: Path, *, file_size_limit: int | None = None) -> Serving:
    """``meterlake serve`` on an ephemeral port; with ``file_size_limit``, no file it (or its delivery process) writes
    may grow past that many bytes: a write beyond fails as on a full disk (EFBIG, SIGXFSZ ignored)."""

    def limit_files() -> None:
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    process = subprocess.Popen(
        [*_CLI, "--home", str(home), "serve", "--port", "0"],
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_files,
    )
    assert process.stdout is not None
    first = process.stdout.readline().split()
    if first[:1] != ["MeteringServiceEndpoint"]:
        process.kill()
        raise AssertionError(f"meterlake serve did not start: {first} {process.communicate()[1][-2000:]}")
    return Serving(process, first[1], home)


def _stop(serving: Serving) -> str:
    serving.process.send_signal(signal.SIGTERM)
    out, err = serving.process.communicate(timeout=60)
    assert serving.process.returncode == 0, err
    return out


def _cli(home: Path, *args: str) -> str:
    done = subprocess.run([*_CLI, "--home", str(home), *args], cwd=home, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    home = tmp_path_factory.mktemp("serve")
    started = _start_serve(home)
    try:
        yield started
    finally:
        if started.process.poll() is None:
            _stop(started)


@pytest.fixture(scope="module")
def admin_key(serving: Serving) -> str:
    return _cli(serving.home, "keys", "create", "--admin", "--label", "acceptance")


def _ensure_meter(url: str, key: str, name: str) -> None:
    answer = httpx.post(
        f"{url}/meters",
        json={"label": name, "meterApiName": name, "meterType": "sum_of_all_usage"},
        headers={"X-API-KEY": key},
    )
    assert answer.status_code == 200 or "is taken" in answer.text, answer.text


# -- the Amberflo workflow fixture, run by an executor that reads it ------------------------------------------------


class WorkflowExecutor:
    """Runs an Arazzo workflow's steps: operations found by operationId in the service's OpenAPI document,
    ``$inputs``/``$steps`` expressions substituted, successCriteria evaluated, outputs read (JSON pointers)."""

    def __init__(self, base_url: str, openapi: dict[str, Any]) -> None:
        self._base_url = base_url
        self._operations = {
            operation["operationId"]: (method.upper(), path)
            for path, methods in openapi["paths"].items()
            for method, operation in methods.items()
        }

    def run(self, workflow: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        """Run every step in order; returns the workflow's outputs. A failed success criterion raises."""
        missing = set(workflow.get("inputs", {}).get("required", [])) - set(inputs)
        assert not missing, f"required inputs missing: {missing}"
        steps: dict[str, dict[str, Any]] = {}
        context = {"inputs": inputs, "steps": steps}
        with httpx.Client(base_url=self._base_url, timeout=30) as client:
            for step in workflow["steps"]:
                method, path = self._operations[step["operationId"]]
                headers, params = {}, {}
                for parameter in step.get("parameters", []):
                    value = self._value(parameter["value"], context)
                    if parameter["in"] == "header":
                        headers[parameter["name"]] = str(value)
                    elif parameter["in"] == "query":
                        params[parameter["name"]] = value
                    elif parameter["in"] == "path":
                        path = path.replace("{" + parameter["name"] + "}", str(value))
                body = step.get("requestBody")
                payload = None if body is None else self._value(body["payload"], context)
                response = client.request(method, path, json=payload, headers=headers, params=params)
                for criterion in step.get("successCriteria", []):
                    assert self._holds(criterion["condition"], response), (step["stepId"], response.text)
                steps[step["stepId"]] = {
                    "outputs": {name: self._output(expr, response) for name, expr in step.get("outputs", {}).items()}
                }
        return {name: self._value(expr, context) for name, expr in workflow.get("outputs", {}).items()}

    def _value(self, value: Any, context: dict[str, Any]) -> Any:
        if isinstance(value, dict):
            resolved = {key: self._value(item, context) for key, item in value.items()}
            return {key: item for key, item in resolved.items() if item is not _ABSENT}
        if isinstance(value, list):
            return [self._value(item, context) for item in value]
        if isinstance(value, str) and value.startswith("$inputs."):
            return context["inputs"].get(value.removeprefix("$inputs."), _ABSENT)
        if isinstance(value, str) and value.startswith("$steps."):
            step, _, name = value.removeprefix("$steps.").partition(".outputs.")
            return context["steps"][step]["outputs"][name]
        return value

    @staticmethod
    def _holds(condition: str, response: httpx.Response) -> bool:
        match = re.fullmatch(r"\$statusCode\s*(==|!=)\s*(\d+)", condition.strip())
        assert match is not None, f"unsupported success criterion {condition!r}"
        return (response.status_code == int(match.group(2))) == (match.group(1) == "==")

    @staticmethod
    def _output(expression: str, response: httpx.Response) -> Any:
        if expression == "$response.body":
            return response.text
        prefix = "$response.body#"
        assert expression.startswith(prefix), f"unsupported output {expression!r}"
        node: Any = response.json()
        for part in expression.removeprefix(prefix).strip("/").split("/"):
            node = node[int(part)] if isinstance(node, list) else node[part.replace("~1", "/").replace("~0", "~")]
        return node


_ABSENT = object()


def test_the_amberflo_workflow_fixture_succeeds_against_meterlake_serve(serving: Serving, admin_key: str) -> None:
    _ensure_meter(serving.url, admin_key, "workflow-meter")
    document = yaml.safe_load(WORKFLOW.read_text())
    [workflow] = document["workflows"]
    now_s = int(time.time())
    inputs = {
        "apiKey": admin_key,
        "meterApiName": "workflow-meter",
        "customerId": "tenant-a",
        "meterValue": 42,
        "meterTimeInMillis": (now_s - 3600) * 1000,
        "uniqueId": str(uuid.uuid4()),
        "startTimeInSeconds": now_s - 2 * DAY_S,
        "endTimeInSeconds": now_s + 60,
    }
    spec = httpx.get(serving.url + "/openapi.json").json()
    outputs = WorkflowExecutor(serving.url, spec).run(workflow, inputs)
    assert outputs["ingestResult"] == "1 records were ingested"
    [meter] = outputs["clientMeters"]
    assert meter["group"] == {"groupInfo": {"customerId": "tenant-a"}}
    assert meter["groupValue"] == 42.0
    assert [v["value"] for v in meter["values"] if v["value"]] == [42.0]


# -- the toolkit README's sequence ----------------------------------------------------------------------------------


def test_the_toolkit_readme_sequence_against_meterlake_serve(serving: Serving, admin_key: str) -> None:
    token = _cli(serving.home, "admin-token", "--user", "saas-admin")
    pool = for_config(Config(), DataDir(serving.home))
    control = httpx.Client(base_url=serving.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    with control:
        created = control.post(
            "/meters", json={"label": "SBT Meter", "meterApiName": "sbt-meter", "meterType": "sum_of_all_usage"}
        )
        assert created.status_code == 201
        meter_id = created.json()["data"]["id"]
        updated = control.put(
            f"/meters/{meter_id}",
            json={"label": "SBT trial meter", "meterApiName": "sbt-trial", "meterType": "sum_of_all_usage"},
        )
        assert (updated.status_code, updated.json()["data"]["meterApiName"]) == (200, "sbt-trial")
        fetched = control.get(f"/meters/{meter_id}").json()["data"]
        assert (fetched["id"], fetched["label"]) == (meter_id, "SBT trial meter")
        assert meter_id in [m["id"] for m in control.get("/meters").json()["data"]]

        # Ingest by event (the application plane's ingestUsage event, as EventBridge delivers it) and by POST.
        tenant_token = pool.issue_id_token(user="app", tenant_id="tenant-1")
        detail = {"tenantId": "tenant-1", "meterApiName": "sbt-trial", "meterValue": 7, "region": "eu"}
        event = {"detail-type": "ingestUsage", "source": "app-plane", "id": str(uuid.uuid4()), "detail": detail}
        by_event = httpx.post(f"{serving.url}/events", json=event, headers={"Authorization": f"Bearer {tenant_token}"})
        assert by_event.json() == {"data": {"ingested": 1, "rejected": []}}
        by_post = control.post(
            "/ingest",
            json={
                "customerId": "tenant-2",
                "meterApiName": "sbt-trial",
                "meterValue": 5,
                "meterTimeInMillis": int(time.time() * 1000),
            },
        )
        assert by_post.json()["data"]["ingested"] == 1

        start, end = int(time.time()) - DAY_S, int(time.time()) + 60
        query: dict[str, str | int] = {
            "meterApiName": "sbt-trial",
            "startTimeInSeconds": start,
            "endTimeInSeconds": end,
        }
        usage = control.get(f"/usage/{meter_id}", params=query)
        assert usage.status_code == 200
        assert usage.json()["data"]["clientMeters"][0]["groupValue"] == 12.0
        defaults = control.get(f"/usage/{meter_id}").json()["data"]  # no query: the last 24 h by DAY
        assert defaults["metadata"]["timeGroupingInterval"] == "DAY"
        assert defaults["clientMeters"][0]["groupValue"] == 12.0

        now = int(time.time())
        rule = {"id": "sbt-filtering-rule", "meterApiName": "sbt-trial",
                "ingestionTimeRange": {"startTimeInSeconds": now - 600, "endTimeInSeconds": now + 600}}  # fmt: skip
        cancelled = control.request("DELETE", "/usage", json=rule)
        assert (cancelled.status_code, cancelled.json()["data"]["id"]) == (200, "sbt-filtering-rule")
        assert control.get(f"/usage/{meter_id}", params=query).json()["data"]["clientMeters"][0]["groupValue"] == 0.0

        deleted = control.delete(f"/meters/{meter_id}")
        assert (deleted.status_code, deleted.json()["data"]["id"]) == (200, meter_id)
        assert control.get(f"/meters/{meter_id}").status_code == 404


# -- Amberflo's own Python SDK --------------------------------------------------------------------------------------


def test_amberflos_python_sdk_ingests_and_reads_back(
    serving: Serving, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metering.ingest import create_ingest_client, create_ingest_payload  # type: ignore[import-untyped]
    from metering.ingest.api_client import IngestApiClient  # type: ignore[import-untyped]
    from metering.session.api_session import ApiSession  # type: ignore[import-untyped]
    from metering.session.ingest_session import IngestSession  # type: ignore[import-untyped]
    from metering.usage import (  # type: ignore[import-untyped]
        AggregationType,
        TimeGroupingInterval,
        TimeRange,
        UsageApiClient,
        create_all_usage_query,
        create_usage_query,
    )

    _ensure_meter(serving.url, admin_key, "sdk-meter")
    monkeypatch.setattr(IngestSession, "root_url", serving.url)
    monkeypatch.setattr(ApiSession, "root_url", serving.url)
    now_ms = int(time.time() * 1000)
    sync = IngestApiClient(admin_key)
    answer = sync.send(create_ingest_payload("sdk-meter", 3, now_ms, "sdk-customer", dimensions={"plan": "pro"}))
    assert answer == "1 records were ingested"
    threaded = create_ingest_client(api_key=admin_key)
    for i in range(250):
        threaded.meter("sdk-meter", 2, now_ms - i, "sdk-customer", unique_id=f"sdk-{i}")
    threaded.flush()
    threaded.shutdown()

    usage = UsageApiClient(admin_key)
    time_range = TimeRange(int(time.time()) - DAY_S, int(time.time()) + 60)
    report = usage.get(
        create_usage_query(
            AggregationType.SUM, "sdk-meter", TimeGroupingInterval.HOUR, time_range, group_by=["customerId"]
        )
    )
    assert report["clientMeters"][0]["groupValue"] == 503.0
    counted = usage.get([create_usage_query(AggregationType.COUNT, "sdk-meter", TimeGroupingInterval.DAY, time_range)])
    assert counted[0]["clientMeters"][0]["groupValue"] == 251.0
    every = usage.get_all(create_all_usage_query(TimeGroupingInterval.DAY, time_range, group_by_customer_id=True))
    [mine] = [r for r in every if r["metadata"]["meterApiName"] == "sdk-meter"]
    assert mine["clientMeters"][0]["groupValue"] == 503.0


# -- SIGKILL during ingest ------------------------------------------------------------------------------------------


async def _ingest_until_killed(url: str, key: str, process: subprocess.Popen[str], kill_after_s: float) -> list[str]:
    """Ingest 20-record batches from 8 connections until the service is SIGKILLed; the uniqueIds answered 200."""
    acknowledged: list[str] = []
    started = time.monotonic()

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, headers={"X-API-KEY": key}, timeout=30) as client:
            while True:
                batch = [str(uuid.uuid4()) for _ in range(20)]
                records = [
                    {"customerId": "kill", "meterApiName": "kill-meter", "meterValue": 1,
                     "meterTimeInMillis": int(time.time() * 1000), "uniqueId": unique_id}
                    for unique_id in batch
                ]  # fmt: skip
                try:
                    answer = await client.post("/ingest", json=records)
                except httpx.TransportError:
                    return
                assert answer.status_code == 200, answer.text
                acknowledged.extend(batch)

    async def killer() -> None:
        while time.monotonic() - started < kill_after_s or len(acknowledged) < 200:
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGKILL)

    await asyncio.gather(killer(), *(worker() for _ in range(8)))
    return acknowledged


@pytest.mark.slow
def test_a_sigkill_during_ingest_loses_nothing_acknowledged(tmp_path: Path, fault_report: FaultReport) -> None:
    home = tmp_path / "home"
    home.mkdir()
    data_dir = DataDir.resolve(home)
    with ServiceStore.in_data_dir(data_dir) as store:
        _, key = ApiKeys(store).create(role="admin")
    acknowledged: list[str] = []
    for run in range(2):
        serving = _start_serve(home)
        try:
            _ensure_meter(serving.url, key, "kill-meter")
            acknowledged += asyncio.run(_ingest_until_killed(serving.url, key, serving.process, 0.5 + 0.3 * run))
        finally:
            serving.process.kill()
            serving.process.wait(timeout=30)
        assert serving.process.returncode == -signal.SIGKILL
    out = _stop(_start_serve(home))  # the next start takes the spool up again; stopping commits it
    assert "stopped cleanly" in out
    table = ensure_meter_events_table(open_catalog(data_dir), Config())
    committed = table.scan(selected_fields=("unique_id",)).to_arrow().column("unique_id").to_pylist()
    counts = Counter(committed)
    missing = set(acknowledged) - set(counts)
    fault_report(
        "SIGKILL of serve during ingest, 2 times (meter events)",
        answered=len(acknowledged),
        committed=len(counts),
        lost=len(missing),
        duplicated=len(committed) - len(counts),
    )
    assert len(acknowledged) == len(set(acknowledged)) >= 400
    assert (len(missing), len(committed) - len(counts)) == (0, 0)


@pytest.mark.slow
def test_a_full_disk_under_serve_answers_503_and_loses_nothing_acknowledged(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    data_dir = DataDir.resolve(home)
    with ServiceStore.in_data_dir(data_dir) as store:
        _, key = ApiKeys(store).create(role="admin")
    first = _start_serve(home)
    _ensure_meter(first.url, key, "disk-meter")
    _stop(first)
    # The spool's segment may grow by ~64 KB more (its first ~60 KB of 20-record requests), then the disk is "full".
    segment_bytes = sum(path.stat().st_size for path in (home / "spool-meter-events").glob("*.seg"))
    full = _start_serve(home, file_size_limit=segment_bytes + 64 * 1024)
    answered: list[str] = []
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=full.url, headers={"X-API-KEY": key}, timeout=30) as client:
        for _ in range(120):
            batch = [str(uuid.uuid4()) for _ in range(20)]
            now_ms = int(time.time() * 1000)
            records = [
                {"customerId": "disk", "meterApiName": "disk-meter", "meterValue": 1, "meterTimeInMillis": now_ms,
                 "uniqueId": unique_id}
                for unique_id in batch
            ]  # fmt: skip
            answer = client.post("/ingest", json=records)
            statuses[answer.status_code] += 1
            if answer.status_code == 200:
                answered.extend(batch)
            else:
                assert answer.status_code == 503, answer.text
                assert "could not be stored" in answer.json()["message"]
    full.process.kill()  # whatever it could still commit or not: the spool holds what was answered
    full.process.wait(timeout=30)
    assert statuses[200] > 0
    assert statuses[503] > 0
    _stop(_start_serve(home))  # room again: the next start commits what was acknowledged
    table = ensure_meter_events_table(open_catalog(data_dir), Config())
    committed = table.scan(selected_fields=("unique_id",)).to_arrow().column("unique_id").to_pylist()
    counts = Counter(committed)
    fault_report(
        "full disk under serve (503 meanwhile, meter events)",
        answered=len(answered),
        committed=len(set(answered) & set(counts)),
        lost=len(set(answered) - set(counts)),
        duplicated=len(committed) - len(counts),
    )
    assert (len(set(answered) - set(counts)), len(committed) - len(counts)) == (0, 0)


# -- keys through the CLI, against the running service --------------------------------------------------------------


def test_keys_create_list_and_revoke_through_the_cli_against_a_running_serve(serving: Serving) -> None:
    created = subprocess.run(
        [*_CLI, "--home", str(serving.home), "keys", "create", "--tenant", "acme", "--label", "cli-tenant"],
        cwd=serving.home,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = re.fullmatch(r"key (\w+) \(tenant acme\)", created.stderr.strip())
    assert key_id is not None, created.stderr
    assert key.split("_")[1] == key_id.group(1)  # the key names its id; only its digest is stored
    [listed] = [line for line in _cli(serving.home, "keys", "list").splitlines() if "cli-tenant" in line]
    assert listed.split()[:3] == [key_id.group(1), "tenant", "acme"]
    assert "revoked" not in listed

    body = {"meterApiName": "api-calls", "aggregation": "SUM", "timeGroupingInterval": "DAY",
            "timeRange": {"startTimeInSeconds": int(time.time()) - DAY_S}}  # fmt: skip
    with httpx.Client(base_url=serving.url, headers={"X-API-KEY": key}, timeout=30) as tenant:
        answered = tenant.post("/usage", json=body)
        assert answered.status_code == 200, answered.text
        assert answered.json()["metadata"]["filter"] == {"customerId": ["acme"]}  # its own customer only
        assert _cli(serving.home, "keys", "revoke", key_id.group(1)) == f"revoked {key_id.group(1)}"
        deadline = time.monotonic() + 10
        while (refused := tenant.post("/usage", json=body)).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)  # the service caches a verified key for a second
        assert refused.status_code == 401
        assert "revoked" in refused.json()["message"]
    with ServiceStore.in_data_dir(DataDir.resolve(serving.home)) as store:
        [revoked] = [info for info in ApiKeys(store).list_keys() if info.key_id == key_id.group(1)]
    assert revoked.revoked_ms is not None
