"""The service's API, defined once: every operation (method, path, operationId, who may call it, its shapes).

The ASGI app routes exactly these operations (it refuses to start with one unhandled), and ``GET /openapi.json``
(:func:`openapi_document`) describes them. Two dialects share the paths; the caller's credential picks the answer's
shape: a Bearer token (the SaaS Builder Toolkit's control plane) gets the toolkit plug-in's ``{"data": ...}`` wrapping
and 201 on create; an X-API-KEY (Amberflo's clients) gets Amberflo's own bodies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from meterlake.amberflo.api import (
    ALL_AGGREGATIONS,
    FILTER_OUT_RULE_TYPE,
    LOCKING_STATUSES,
    METER_TYPES,
    TIME_GROUPING_INTERVALS,
    IngestRecord,
)

Method = Literal["GET", "POST", "PUT", "DELETE"]
#: Who may call an operation: admins only, admins and tenants (for their own customerId), or anyone.
Access = Literal["admin", "tenant", "public"]


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of the API."""

    method: Method
    path: str
    operation_id: str
    summary: str
    access: Access
    request: str | None = None
    response: str | None = None
    #: The status of success in the toolkit dialect (the Amberflo dialect answers 200).
    toolkit_status: int = 200


OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation("POST", "/ingest", "ingestMeterEvents", "Ingest usage records (one, an array or NDJSON; gzip or plain)",
              "tenant", "IngestBody", "IngestResult"),
    Operation("POST", "/events", "ingestUsageEvents", "Ingest the toolkit's ingestUsage events as EventBridge delivers "
              "them (or a PutEvents request); its onboardingRequest events onboard the tenants (admins only: see "
              "onboardCustomer)", "tenant", "ToolkitEvents", "EventsResult"),
    Operation("POST", "/customers", "onboardCustomer", "Onboard a tenant as a customer: with forwarding to Amberflo "
              "on, its Amberflo customer is created, or updated if it exists", "admin", "CustomerInput",
              "OnboardedCustomer"),
    Operation("POST", "/meters", "createMeter", "Create an event meter", "admin", "MeterInput", "Meter", 201),
    Operation("GET", "/meters", "listMeters", "List every meter (event meters and the config's request meters)",
              "admin", None, "MeterList"),
    Operation("PUT", "/meters", "updateMeter", "Update an event meter (Amberflo: its id in the body)", "admin",
              "MeterInput", "Meter"),
    Operation("GET", "/meters/{meterId}", "getMeter", "Get a meter", "admin", None, "Meter"),
    Operation("PUT", "/meters/{meterId}", "updateMeterById", "Update an event meter (the toolkit's route)", "admin",
              "MeterInput", "Meter"),
    Operation("DELETE", "/meters/{meterId}", "deleteMeter", "Delete an event meter (its events stay in the lake)",
              "admin", None, "Meter"),
    Operation("POST", "/usage", "queryUsage", "Usage of one meter, zero-filled", "tenant", "UsageQuery", "UsageReport"),
    Operation("POST", "/usage/sparse", "queryUsageSparse", "Usage of one meter, buckets with events only", "tenant",
              "UsageQuery", "UsageReport"),
    Operation("POST", "/usage/batch", "queryUsageBatch", "Several usage queries in one request", "tenant",
              "UsageQueryList", "UsageReportList"),
    Operation("GET", "/usage/all", "queryAllUsage", "SUM usage of every meter", "tenant", None, "UsageReportList"),
    Operation("GET", "/usage/{meterId}", "fetchUsage", "Usage of a meter by id (the toolkit's route; default: the "
              "last 24 h by DAY)", "tenant", None, "UsageReport"),
    Operation("DELETE", "/usage", "cancelUsage", "Cancel usage with a filtering rule (the toolkit's route)", "admin",
              "CancellationRuleInput", "CancellationRule"),
    Operation("POST", "/ingest-snapshot/custom-filtering-rules", "createFilteringRule",
              "Create or replace a cancellation rule", "admin", "CancellationRuleInput", "CancellationRule"),
    Operation("GET", "/ingest-snapshot/custom-filtering-rules", "listFilteringRules",
              "List cancellation rules (?meterApiName=, ?includeRemoved=true)", "admin", None, "CancellationRuleList"),
    Operation("DELETE", "/ingest-snapshot/custom-filtering-rules/{ruleId}", "removeFilteringRule",
              "Remove a cancellation rule: its events count again", "admin", None, "CancellationRule"),
    Operation("GET", "/openapi.json", "getOpenApi", "This document", "public", None, None),
)  # fmt: skip

_STRING_LIST: Final = {"type": "array", "items": {"type": "string"}}
_FILTER: Final = {"type": "object", "additionalProperties": _STRING_LIST, "description": "customerId or a dimension"}
_TIME_RANGE: Final = {
    "type": "object",
    "required": ["startTimeInSeconds"],
    "properties": {"startTimeInSeconds": {"type": "integer"}, "endTimeInSeconds": {"type": "integer"}},
}
_METER_PROPERTIES: Final = {
    "label": {"type": "string", "minLength": 1},
    "meterApiName": {"type": "string", "minLength": 1, "maxLength": 50, "pattern": "^[A-Za-z0-9_-]+$"},
    "meterType": {"type": "string", "enum": sorted(METER_TYPES)},
    "description": {"type": "string"},
    "dimensions": _STRING_LIST,
    "aggregationDimensions": _STRING_LIST,
    "lockingStatus": {"type": "string", "enum": sorted(LOCKING_STATUSES)},
}
_RULE_PROPERTIES: Final = {
    "id": {"type": "string", "minLength": 1, "maxLength": 128},
    "meterApiName": {"type": "string"},
    "type": {"type": "string", "enum": [FILTER_OUT_RULE_TYPE]},
    "ingestionTimeRange": {
        "type": "object",
        "required": ["startTimeInSeconds", "endTimeInSeconds"],
        "properties": {"startTimeInSeconds": {"type": "integer"}, "endTimeInSeconds": {"type": "integer"}},
    },
    "filter": _FILTER,
}
_CUSTOMER_PROPERTIES: Final = {
    "customerId": {"type": "string", "minLength": 1},
    "customerName": {"type": "string", "minLength": 1},
    "customerEmail": {"type": "string"},
    "enabled": {"type": "boolean"},
    "traits": {"type": "object", "additionalProperties": {"type": "string"}},
}
_USAGE_VALUE: Final = {
    "type": "object",
    "required": ["secondsSinceEpochUtc", "value", "percentageFromPrevious"],
    "properties": {
        "secondsSinceEpochUtc": {"type": "integer"},
        "value": {"type": "number"},
        "percentageFromPrevious": {"type": "number"},
    },
}


def _components() -> dict[str, Any]:
    (record_schema,), definitions = msgspec.json.schema_components(
        [IngestRecord], ref_template="#/components/schemas/{name}"
    )
    schemas: dict[str, Any] = dict(definitions)
    schemas.update(
        {
            "IngestBody": {
                "description": "One record, an array of records, or NDJSON (one record a line); gzip or plain",
                "oneOf": [record_schema, {"type": "array", "items": record_schema}],
            },
            "IngestResult": {
                "description": "Amberflo dialect: the text 'N records were ingested' (JSON with ?partial=true); "
                "toolkit dialect: {data: {ingested, rejected}}",
                "type": "object",
                "properties": {
                    "ingested": {"type": "integer"},
                    "rejected": {"type": "array", "items": {"$ref": "#/components/schemas/RecordError"}},
                },
            },
            "EventsResult": {
                "description": "ingestUsage events: IngestResult; onboardingRequest events: one OnboardedCustomer each",
                "anyOf": [
                    {"$ref": "#/components/schemas/IngestResult"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/OnboardedCustomer"}},
                ],
            },
            "CustomerInput": {
                "description": "Amberflo's customer",
                "type": "object",
                "required": ["customerId", "customerName"],
                "properties": _CUSTOMER_PROPERTIES,
                "additionalProperties": False,
            },
            "OnboardedCustomer": {
                "type": "object",
                "required": ["customer", "amberflo"],
                "properties": {
                    "customer": {
                        "type": "object",
                        "required": ["customerId", "customerName", "enabled", "traits"],
                        "properties": _CUSTOMER_PROPERTIES,
                    },
                    "amberflo": {
                        "type": "string",
                        "enum": ["created", "updated", "off"],
                        "description": "What was done in Amberflo (off: forwarding to Amberflo is off, nothing sent)",
                    },
                },
            },
            "RecordError": {
                "type": "object",
                "required": ["index", "field", "reason"],
                "properties": {"index": {"type": "integer"}, "field": {"type": "string"}, "reason": {"type": "string"}},
            },
            "ToolkitEvents": {
                "description": "An EventBridge event (detail-type ingestUsage, detail {tenantId, meterApiName, "
                "meterValue, ...dimensions}), a list of them, or a PutEvents request {Entries: [...]}. A dimension "
                'that is a number or a boolean is its JSON text (3 -> "3", true -> "true"); an object, array or null '
                "is refused. Without detail.meterTimeInMillis or time, an event counts at the time the service "
                "received it.",
                "oneOf": [
                    {"$ref": "#/components/schemas/ToolkitEvent"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/ToolkitEvent"}},
                    {"$ref": "#/components/schemas/OnboardingEvent"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/OnboardingEvent"}},
                    {"type": "object", "required": ["Entries"], "properties": {"Entries": {"type": "array"}}},
                ],
            },
            "OnboardingEvent": {
                "description": "The toolkit control plane's tenant onboarding (detail: the tenant's data)",
                "type": "object",
                "required": ["detail-type", "detail"],
                "properties": {
                    "detail-type": {"type": "string", "enum": ["onboardingRequest"]},
                    "detail": {
                        "type": "object",
                        "required": ["tenantId"],
                        "properties": {
                            "tenantId": {"type": "string"},
                            "tenantName": {"type": "string"},
                            "email": {"type": "string"},
                            "tier": {"type": "string"},
                        },
                    },
                },
            },
            "ToolkitEvent": {
                "type": "object",
                "required": ["detail-type", "detail"],
                "properties": {
                    "id": {"type": "string"},
                    "detail-type": {"type": "string", "enum": ["ingestUsage"]},
                    "time": {"type": "string", "format": "date-time"},
                    "detail": {
                        "type": "object",
                        "required": ["tenantId", "meterApiName", "meterValue"],
                        "properties": {
                            "tenantId": {"type": "string"},
                            "meterApiName": {"type": "string"},
                            "meterValue": {"type": "number"},
                            "meterTimeInMillis": {"type": "integer"},
                            "uniqueId": {"type": "string"},
                        },
                        "additionalProperties": {"type": "string"},
                    },
                },
            },
            "MeterInput": {
                "type": "object",
                "required": ["label", "meterApiName", "meterType"],
                "properties": {"id": {"type": "string"}, **_METER_PROPERTIES},
            },
            "Meter": {
                "type": "object",
                "required": ["id", *_METER_PROPERTIES, "createTime", "updateTime", "kind"],
                "properties": {
                    "id": {"type": "string"},
                    **_METER_PROPERTIES,
                    "createTime": {"type": "integer"},
                    "updateTime": {"type": "integer"},
                    "kind": {"type": "string", "enum": ["event", "request"]},
                },
            },
            "MeterList": {"type": "array", "items": {"$ref": "#/components/schemas/Meter"}},
            "UsageQuery": {
                "type": "object",
                "required": ["meterApiName", "timeGroupingInterval"],
                "description": "timeRange (or top-level startTimeInSeconds/endTimeInSeconds) is required; "
                "customerFilter is the workflow fixture's form of filter.customerId",
                "properties": {
                    "meterApiName": {"type": "string"},
                    "aggregation": {"type": "string", "enum": list(ALL_AGGREGATIONS)},
                    "timeGroupingInterval": {"type": "string", "enum": list(TIME_GROUPING_INTERVALS)},
                    "timeRange": _TIME_RANGE,
                    "startTimeInSeconds": {"type": "integer"},
                    "endTimeInSeconds": {"type": "integer"},
                    "groupBy": _STRING_LIST,
                    "filter": _FILTER,
                    "customerFilter": _STRING_LIST,
                    "take": {
                        "type": "object",
                        "required": ["limit"],
                        "properties": {"limit": {"type": "integer", "minimum": 1}, "isAscending": {"type": "boolean"}},
                    },
                },
            },
            "UsageQueryList": {"type": "array", "items": {"$ref": "#/components/schemas/UsageQuery"}},
            "UsageReport": {
                "type": "object",
                "required": ["metadata", "secondsSinceEpochIntervals", "clientMeters"],
                "properties": {
                    "metadata": {"type": "object"},
                    "secondsSinceEpochIntervals": {"type": "array", "items": {"type": "integer"}},
                    "clientMeters": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["groupValue", "values"],
                            "properties": {
                                "group": {"type": "object"},
                                "groupValue": {"type": "number"},
                                "values": {"type": "array", "items": _USAGE_VALUE},
                            },
                        },
                    },
                },
            },
            "UsageReportList": {"type": "array", "items": {"$ref": "#/components/schemas/UsageReport"}},
            "CancellationRuleInput": {
                "type": "object",
                "required": ["id", "meterApiName", "ingestionTimeRange"],
                "properties": _RULE_PROPERTIES,
            },
            "CancellationRule": {
                "type": "object",
                "required": ["id", "meterApiName", "type", "ingestionTimeRange", "filter", "createTime"],
                "properties": {
                    **_RULE_PROPERTIES,
                    "createTime": {"type": "integer"},
                    "removeTime": {"type": "integer"},
                },
            },
            "CancellationRuleList": {"type": "array", "items": {"$ref": "#/components/schemas/CancellationRule"}},
            "Error": {
                "type": "object",
                "required": ["message", "statusCode"],
                "properties": {
                    "message": {"type": "string"},
                    "statusCode": {"type": "integer"},
                    "errors": {"type": "array", "items": {"$ref": "#/components/schemas/RecordError"}},
                },
            },
        }
    )
    return schemas


def openapi_document(server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 description of every operation."""
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        entry: dict[str, Any] = {
            "operationId": operation.operation_id,
            "summary": operation.summary,
            "responses": {
                str(operation.toolkit_status): _response(operation),
                "default": {
                    "description": "A 4xx naming the field at fault, or 503 when the records could not be made durable",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            },
        }
        if operation.toolkit_status != 200:
            entry["responses"]["200"] = _response(operation)
        if operation.access == "public":
            entry["security"] = []
        else:
            entry["description"] = (
                "Admins only." if operation.access == "admin" else "Admins, and tenants for their own customerId."
            )
        parameters = [
            {"name": name.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
            for name in operation.path.split("/")
            if name.startswith("{")
        ]
        if operation.operation_id in ("ingestMeterEvents", "ingestUsageEvents"):
            parameters.append({"name": "partial", "in": "query", "schema": {"type": "boolean"}})
        if parameters:
            entry["parameters"] = parameters
        if operation.request is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{operation.request}"}}},
            }
        paths.setdefault(operation.path, {})[operation.method.lower()] = entry
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "meterlake metering service",
            "version": "1.0.0",
            "description": "Meters, usage events, usage queries and cancellation over the lake, in the SaaS Builder "
            "Toolkit plug-in's dialect (Bearer token) and Amberflo's own (X-API-KEY).",
        },
        "paths": paths,
        "components": {
            "schemas": _components(),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
            },
        },
        "security": [{"bearerAuth": []}, {"apiKey": []}],
    }
    if server_url is not None:
        document["servers"] = [{"url": server_url}]
    return document


def _response(operation: Operation) -> dict[str, Any]:
    if operation.response is None:
        return {"description": "OK"}
    return {
        "description": 'Amberflo dialect: the body; toolkit dialect: {"data": body}',
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{operation.response}"}}},
    }
