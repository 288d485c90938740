"""The service over HTTP: both dialects on every route, credentials and scopes, errors, and the OpenAPI document
that the answers are checked against."""

from __future__ import annotations

import gzip
import time
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import msgspec
import pytest
from openapi_spec_validator import validate as validate_openapi

from meterlake.amberflo.api import MAX_EPOCH_SECONDS
from meterlake.service.openapi import OPERATIONS

from .conftest import NOW_MS, Served, record

METER = {"label": "LLM tokens", "meterApiName": "llm-tokens", "meterType": "sum_of_all_usage", "dimensions": ["model"]}
DAY_S = 86400


def usage_body(**overrides: Any) -> dict[str, Any]:
    return {
        "meterApiName": "llm-tokens",
        "aggregation": "SUM",
        "timeGroupingInterval": "DAY",
        "timeRange": {"startTimeInSeconds": NOW_MS // 1000 - 2 * DAY_S, "endTimeInSeconds": NOW_MS // 1000 + 60},
        "groupBy": ["customerId"],
        **overrides,
    }


def conforms(document: dict[str, Any], schema_name: str, value: object) -> None:
    """``value`` validates against the named schema of the service's own OpenAPI document."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    jsonschema.validate(value, schema)


@pytest.fixture
def spec(served: Served) -> dict[str, Any]:
    answer = httpx.get(served.url + "/openapi.json")
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def test_the_openapi_document_is_valid_and_names_every_operation(spec: dict[str, Any]) -> None:
    validate_openapi(spec)
    ids = {op["operationId"] for methods in spec["paths"].values() for op in methods.values()}
    assert ids == {operation.operation_id for operation in OPERATIONS}
    assert {"ingestMeterEvents", "queryUsage"} <= ids
    assert spec["paths"]["/ingest"]["post"]["operationId"] == "ingestMeterEvents"
    onboard = spec["paths"]["/customers"]["post"]
    assert (onboard["operationId"], onboard["description"]) == ("onboardCustomer", "Admins only.")
    assert onboard["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CustomerInput"
    }


def test_every_route_but_the_document_needs_a_credential(served: Served) -> None:
    with httpx.Client(base_url=served.url) as anonymous:
        for operation in OPERATIONS:
            if operation.access == "public":
                continue
            path = operation.path.replace("{meterId}", "x").replace("{ruleId}", "x")
            answer = anonymous.request(operation.method, path, json={})
            assert answer.status_code == 401, operation.operation_id
            assert answer.json()["statusCode"] == 401
        bad = anonymous.post("/usage", json=usage_body(), headers={"X-API-KEY": "mlk_0_nope"})
        assert bad.status_code == 401


def test_meters_in_both_dialects(served: Served, spec: dict[str, Any]) -> None:
    with served.client(token=served.admin_token()) as toolkit, served.client(key=served.admin_key) as amberflo:
        created = toolkit.post("/meters", json=METER)
        assert created.status_code == 201
        meter = created.json()["data"]
        conforms(spec, "Meter", meter)
        assert amberflo.get(f"/meters/{meter['id']}").json() == meter
        listed = amberflo.get("/meters").json()
        conforms(spec, "MeterList", listed)
        assert [m["meterApiName"] for m in listed] == ["api-calls", "egress-bytes", "llm-tokens"]
        assert toolkit.get("/meters").json()["data"] == listed
        by_body = amberflo.put("/meters", json={**METER, "id": meter["id"], "label": "Tokens"})
        assert (by_body.status_code, by_body.json()["label"]) == (200, "Tokens")
        by_path = toolkit.put(f"/meters/{meter['id']}", json={**METER, "description": "d"})
        assert by_path.json()["data"]["description"] == "d"
        assert amberflo.put("/meters", json=METER).json()["message"].startswith("id is required")
        assert amberflo.post("/meters", json=METER).status_code == 400  # the name is taken
        refused = toolkit.post("/meters", json={**METER, "meterApiName": "x" * 51})
        assert refused.status_code == 400
        assert "meterApiName" in refused.json()["message"]
        assert toolkit.delete(f"/meters/{meter['id']}").json()["data"]["id"] == meter["id"]
        assert amberflo.get(f"/meters/{meter['id']}").status_code == 404
        request_meter = listed[0]
        assert amberflo.delete(f"/meters/{request_meter['id']}").status_code == 400


def test_tenants_may_not_manage_meters_or_rules(served: Served) -> None:
    tenant_token = served.pool.issue_id_token(user="alice", tenant_id="acme")
    rule = {
        "id": "r",
        "meterApiName": "api-calls",
        "ingestionTimeRange": {"startTimeInSeconds": 0, "endTimeInSeconds": 1},
    }
    for client in (served.client(key=served.acme_key), served.client(token=tenant_token)):
        with client:
            assert client.post("/meters", json=METER).status_code == 403
            assert client.get("/meters").status_code == 403
            assert client.request("DELETE", "/usage", json=rule).status_code == 403
            assert client.get("/ingest-snapshot/custom-filtering-rules").status_code == 403
    with served.client(token=served.pool.issue_access_token(user="bob")) as nobody:
        assert nobody.post("/usage", json=usage_body()).status_code == 403


def test_ingest_and_usage_in_the_amberflo_dialect(served: Served, spec: dict[str, Any]) -> None:
    with served.client(key=served.admin_key) as admin:
        admin.post("/meters", json=METER)
        one = admin.post("/ingest", json=record(uniqueId="u1", dimensions={"model": "m1"}))
        assert (one.status_code, one.text) == (200, "1 records were ingested")
        gzipped = gzip.compress(msgspec.json.encode([record(uniqueId="u2", meterValue=3), record(uniqueId="u3")]))
        two = admin.post("/ingest/", content=gzipped, headers={"Content-Encoding": "gzip"})
        assert two.text == "2 records were ingested"
        ndjson = b"\n".join(msgspec.json.encode(record(uniqueId=u, customerId="globex")) for u in ("u4", "u5"))
        assert admin.post("/ingest", content=ndjson).text == "2 records were ingested"
        assert admin.post("/ingest", json=record(uniqueId="u1", dimensions={"model": "m1"})).status_code == 200
        report = admin.post("/usage", json=usage_body()).json()
        conforms(spec, "UsageReport", report)
        totals = {m["group"]["groupInfo"]["customerId"]: m["groupValue"] for m in report["clientMeters"]}
        assert totals == {"acme": 27.0, "globex": 24.0}  # u1 twice counts once
        assert len(report["clientMeters"][0]["values"]) == 3  # zero-filled days
        sparse = admin.post("/usage/sparse", json=usage_body()).json()
        assert all(len(m["values"]) == 1 for m in sparse["clientMeters"])
        batch = admin.post("/usage/batch", json=[usage_body(), usage_body(aggregation="COUNT")]).json()
        conforms(spec, "UsageReportList", batch)
        assert [m["groupValue"] for m in batch[1]["clientMeters"]] == [3.0, 2.0]
        params: dict[str, str | int] = {
            "startTimeInSeconds": NOW_MS // 1000 - DAY_S,
            "endTimeInSeconds": NOW_MS // 1000 + 60,
            "timeGroupingInterval": "DAY",
            "groupBy": "customerId",
        }
        every = admin.get("/usage/all", params=params).json()
        assert [r["metadata"]["meterApiName"] for r in every] == ["api-calls", "egress-bytes", "llm-tokens"]
        workflow_shape = {**usage_body(), "customerFilter": ["globex"]}
        del workflow_shape["timeRange"]
        workflow_shape.update(startTimeInSeconds=NOW_MS // 1000 - DAY_S, endTimeInSeconds=NOW_MS // 1000 + 60)
        [only] = admin.post("/usage", json=workflow_shape).json()["clientMeters"]
        assert only["group"]["groupInfo"] == {"customerId": "globex"}


def test_bad_ingest_requests_are_4xx_naming_the_problem_and_store_nothing(served: Served, spec: dict[str, Any]) -> None:
    with served.client(key=served.admin_key) as admin:
        admin.post("/meters", json=METER)
        mixed = admin.post("/ingest", json=[record(uniqueId="a"), record(meterValue="x"), record(meterApiName="nope")])
        assert mixed.status_code == 400
        conforms(spec, "Error", mixed.json())
        assert [(e["index"], e["field"]) for e in mixed.json()["errors"]] == [(1, "meterValue"), (2, "meterApiName")]
        partial = admin.post("/ingest?partial=true", json=[record(uniqueId="a"), record(meterValue="x")])
        assert partial.json() == {
            "ingested": 1,
            "rejected": [{"index": 1, "field": "meterValue", "reason": "Expected float, got str"}],
        }
        for content, headers, status, words in (
            (b"", {}, 400, "body is empty"),
            (b"{", {}, 400, "not JSON"),
            (b"xx", {"Content-Encoding": "gzip"}, 400, "gzip"),
            (b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
            (b"[]", {}, 400, "no records"),
            (b"[" + b"1," * (6 * 1024 * 1024) + b"1]", {}, 413, "larger than"),
        ):
            answer = admin.post("/ingest", content=content, headers=headers)
            assert (answer.status_code, words in answer.json()["message"]) == (status, True), content[:10]
        assert admin.post("/ingest?partial=maybe", json=record()).status_code == 400
        report = admin.post("/usage", json=usage_body()).json()
        assert [m["groupValue"] for m in report["clientMeters"]] == [12.0]  # only the partial request's record
        assert admin.post("/usage", json={**usage_body(), "timeGroupingInterval": "YEAR"}).status_code == 400
        assert admin.post("/usage", json=usage_body(meterApiName="nope")).status_code == 404
        assert admin.post("/usage", content=b"{").status_code == 400


def test_tenant_keys_and_tokens_see_only_their_own_customer(served: Served) -> None:
    with served.client(key=served.admin_key) as admin:
        admin.post("/meters", json=METER)
    tenant_token = served.pool.issue_id_token(user="alice", tenant_id="acme")
    with served.client(key=served.acme_key) as acme, served.client(key=served.globex_key) as globex:
        assert acme.post("/ingest", json=record(uniqueId="a1")).status_code == 200
        assert globex.post("/ingest", json=record(uniqueId="g1", customerId="globex", meterValue=5)).status_code == 200
        stolen = acme.post("/ingest", json=record(uniqueId="x", customerId="globex"))
        assert stolen.status_code == 403
        for client in (acme, served.client(token=tenant_token)):
            report = client.post("/usage", json=usage_body()).json()
            report = report.get("data", report)
            assert [m["group"]["groupInfo"]["customerId"] for m in report["clientMeters"]] == ["acme"]
            assert client.post("/usage", json=usage_body(filter={"customerId": ["globex"]})).status_code == 403
        assert globex.post("/usage", json=usage_body()).json()["clientMeters"][0]["groupValue"] == 5.0


def test_cancellation_routes(served: Served, spec: dict[str, Any]) -> None:
    with served.client(key=served.admin_key) as admin, served.client(token=served.admin_token()) as toolkit:
        admin.post("/meters", json=METER)
        admin.post("/ingest", json=[record(uniqueId="c1"), record(uniqueId="c2", customerId="globex")])
        now = int(time.time())
        rule = {"id": "oops", "meterApiName": "llm-tokens", "filter": {"customerId": ["acme"]},
                "ingestionTimeRange": {"startTimeInSeconds": now - 60, "endTimeInSeconds": now + 60}}  # fmt: skip
        created = toolkit.request("DELETE", "/usage", json=rule)
        assert created.status_code == 200
        conforms(spec, "CancellationRule", created.json()["data"])
        assert created.json()["data"]["type"] == "by_property_filter_out"
        report = admin.post("/usage", json=usage_body()).json()
        assert [m["group"]["groupInfo"]["customerId"] for m in report["clientMeters"]] == ["globex"]
        listed = admin.get("/ingest-snapshot/custom-filtering-rules", params={"meterApiName": "llm-tokens"}).json()
        assert [r["id"] for r in listed] == ["oops"]
        assert toolkit.request("DELETE", "/usage", json={"id": "x"}).status_code == 400
        removed = admin.delete("/ingest-snapshot/custom-filtering-rules/oops").json()
        assert "removeTime" in removed
        assert len(admin.post("/usage", json=usage_body()).json()["clientMeters"]) == 2
        assert admin.get("/ingest-snapshot/custom-filtering-rules").json() == []
        kept = admin.get("/ingest-snapshot/custom-filtering-rules", params={"includeRemoved": "true"}).json()
        assert [r["id"] for r in kept] == ["oops"]
        again = admin.post("/ingest-snapshot/custom-filtering-rules", json=rule)
        assert again.status_code == 200
        assert admin.delete("/ingest-snapshot/custom-filtering-rules/nope").status_code == 404


def test_instants_past_9999_are_refused_naming_the_field_and_store_no_rule(served: Served) -> None:
    far, farther = 10**13, 10**15
    with served.client(key=served.admin_key) as admin, served.client(token=served.admin_token()) as toolkit:
        meter_id = admin.post("/meters", json=METER).json()["id"]
        admin.post("/ingest", json=record(uniqueId="b1"))
        now = NOW_MS // 1000
        refused = [
            (
                admin.post(
                    "/usage",
                    json=usage_body(timeRange={"startTimeInSeconds": farther, "endTimeInSeconds": farther + 60}),
                ),
                "startTimeInSeconds",
            ),
            (
                admin.post(
                    "/usage/sparse", json=usage_body(timeRange={"startTimeInSeconds": 0, "endTimeInSeconds": far})
                ),
                "endTimeInSeconds",
            ),
            (
                admin.post("/usage/batch", json=[usage_body(), usage_body(timeRange={"startTimeInSeconds": -1})]),
                "startTimeInSeconds",
            ),
            (toolkit.get(f"/usage/{meter_id}", params={"startTimeInSeconds": farther}), "startTimeInSeconds"),
            (
                admin.get(
                    "/usage/all",
                    params={"startTimeInSeconds": 0, "endTimeInSeconds": far, "timeGroupingInterval": "DAY"},
                ),
                "endTimeInSeconds",
            ),
        ]
        for start, end in ((now, farther), (farther, farther + 60)):
            rule = {"id": f"r{start}", "meterApiName": "llm-tokens",
                    "ingestionTimeRange": {"startTimeInSeconds": start, "endTimeInSeconds": end}}  # fmt: skip
            field = "ingestionTimeRange." + ("endTimeInSeconds" if start == now else "startTimeInSeconds")
            refused.append((toolkit.request("DELETE", "/usage", json=rule), field))
            refused.append((admin.post("/ingest-snapshot/custom-filtering-rules", json=rule), field))
        for answer, field in refused:
            assert answer.status_code == 400, (field, answer.text)
            message = answer.json()["message"]
            assert field in message, message
            assert "9999" in message, message
        assert admin.get("/ingest-snapshot/custom-filtering-rules", params={"includeRemoved": "true"}).json() == []
        assert admin.post("/usage", json=usage_body()).json()["clientMeters"][0]["groupValue"] == 12.0

        # The latest instant accepted works everywhere: a rule reaching it, and a window ending at it.
        latest = MAX_EPOCH_SECONDS
        rule = {"id": "to-the-end", "meterApiName": "llm-tokens",
                "ingestionTimeRange": {"startTimeInSeconds": now + 3600, "endTimeInSeconds": latest}}  # fmt: skip
        assert toolkit.request("DELETE", "/usage", json=rule).status_code == 200
        assert admin.post("/usage", json=usage_body()).json()["clientMeters"][0]["groupValue"] == 12.0
        edge = admin.post("/usage", json=usage_body(timeRange={"startTimeInSeconds": latest - 3 * DAY_S,
                                                              "endTimeInSeconds": latest}))  # fmt: skip
        assert edge.status_code == 200, edge.text
        assert edge.json()["secondsSinceEpochIntervals"][-1] == latest - DAY_S
        monthly = usage_body(timeGroupingInterval="MONTH", timeRange={"startTimeInSeconds": latest - 40 * DAY_S})
        assert (
            admin.post(
                "/usage", json={**monthly, "timeRange": {**monthly["timeRange"], "endTimeInSeconds": latest}}
            ).status_code
            == 200
        )


def test_a_meter_with_events_or_rules_keeps_its_meterapiname(served: Served) -> None:
    with served.client(key=served.admin_key) as admin, served.client(token=served.admin_token()) as toolkit:
        fresh = admin.post("/meters", json=METER).json()
        renamed = admin.put("/meters", json={**METER, "id": fresh["id"], "meterApiName": "llm-trial"})
        assert renamed.status_code == 200  # nothing names it yet: a rename is free
        assert admin.post("/ingest", json=record(meterApiName="llm-trial", uniqueId="t1")).status_code == 200
        for answer in (
            admin.put("/meters", json={**METER, "id": fresh["id"], "meterApiName": "llm-tokens"}),
            toolkit.put(f"/meters/{fresh['id']}", json={**METER, "meterApiName": "llm-renamed"}),
        ):
            assert answer.status_code == 400
            message = answer.json()["message"]
            assert message.startswith("meterApiName: meter 'llm-trial' has events"), message
        assert admin.get(f"/meters/{fresh['id']}").json()["meterApiName"] == "llm-trial"
        relabelled = admin.put("/meters", json={**METER, "id": fresh["id"], "meterApiName": "llm-trial", "label": "X"})
        assert (relabelled.status_code, relabelled.json()["label"]) == (200, "X")
        trial = usage_body(meterApiName="llm-trial")
        assert admin.post("/usage", json=trial).json()["clientMeters"][0]["groupValue"] == 12.0

        ruled = admin.post("/meters", json={**METER, "meterApiName": "gpu-seconds"}).json()
        now = int(time.time())
        rule = {"id": "g1", "meterApiName": "gpu-seconds",
                "ingestionTimeRange": {"startTimeInSeconds": now - 60, "endTimeInSeconds": now}}  # fmt: skip
        assert admin.post("/ingest-snapshot/custom-filtering-rules", json=rule).status_code == 200
        assert admin.delete("/ingest-snapshot/custom-filtering-rules/g1").status_code == 200  # removed, still kept
        refused = admin.put("/meters", json={**METER, "id": ruled["id"], "meterApiName": "gpu-hours"})
        assert refused.status_code == 400
        assert "has cancellation rules" in refused.json()["message"]


def test_onboarding_without_forwarding_sends_nothing_and_only_admins_may(served: Served, spec: dict[str, Any]) -> None:
    acme = {"customerId": "acme", "customerName": "Acme"}
    conforms(spec, "CustomerInput", acme)
    with served.client(key=served.admin_key) as admin:
        answer = admin.post("/customers", json=acme)
        assert answer.status_code == 200
        conforms(spec, "OnboardedCustomer", answer.json())
        assert answer.json() == {"customer": {**acme, "enabled": True, "traits": {}}, "amberflo": "off"}
        bad = admin.post("/customers", json={"customerId": "acme"})
        assert bad.status_code == 400
        assert "customerName" in bad.json()["message"]
    event = {"detail-type": "onboardingRequest", "detail": {"tenantId": "acme", "tenantName": "Acme"}}
    conforms(spec, "ToolkitEvents", event)
    with served.client(token=served.admin_token()) as control_plane:
        answer = control_plane.post("/events", json=event)
        assert answer.status_code == 200
        conforms(spec, "EventsResult", answer.json()["data"])
        assert answer.json() == {"data": [{"customer": {**acme, "enabled": True, "traits": {}}, "amberflo": "off"}]}
        usage = {"detail-type": "ingestUsage", "detail": {"tenantId": "acme", "meterApiName": "x", "meterValue": 1}}
        assert control_plane.post("/events", json=[event, usage]).status_code == 400
    tenant_token = served.pool.issue_id_token(user="alice", tenant_id="acme")
    for tenant in (served.client(key=served.acme_key), served.client(token=tenant_token)):
        with tenant:
            assert tenant.post("/customers", json=acme).status_code == 403
            assert tenant.post("/events", json=event).status_code == 403
    assert httpx.post(served.url + "/customers", json=acme).status_code == 401
