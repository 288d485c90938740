"""The service's ASGI adapter: the operations of :mod:`meterlake.service.openapi` over HTTP, in both dialects.

``POST /ingest`` is a raw ASGI endpoint (the hot route, spared Starlette's per-request objects); every other route
is Starlette's. Every route but ``/openapi.json`` authenticates the caller first (401 without a good credential). A
Bearer caller gets the toolkit plug-in's shapes (``{"data": ...}``, 201 on create), an X-API-KEY caller Amberflo's.
Errors are ``{"message": ..., "statusCode": ...}`` (plus ``errors`` listing bad records) with a 4xx, or 503 when the
records could not be made durable; nothing is changed by a refused request. Blocking work (SQLite, DuckDB) runs in
Starlette's thread pool, so queries never hold up ingest.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal
from urllib.parse import parse_qs

import msgspec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from meterlake.amberflo.api import RequestError, inflate
from meterlake.service.auth import Authenticator, Principal
from meterlake.service.events import decode_ingest_body, onboarding_customers, toolkit_records
from meterlake.service.ingest import IngestOutcome, NotDurableError
from meterlake.service.openapi import OPERATIONS, Operation, openapi_document
from meterlake.service.operations import MeteringService

logger = logging.getLogger(__name__)

Dialect = Literal["toolkit", "amberflo"]
_JSON: Final = "application/json"
_TEXT_PLAIN: Final = b"text/plain; charset=utf-8"
_Endpoint = Callable[[Request], Awaitable[Response]]
_Handler = Callable[[Request, Principal, Dialect], Awaitable[Response]]


def _json(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type=_JSON)


def _error(exc: RequestError) -> Response:
    return _json({"message": exc.message, "statusCode": exc.status, **exc.extra}, exc.status)


def _not_durable(exc: NotDurableError) -> Response:
    return _json({"message": f"Service Unavailable: the records could not be stored ({exc})", "statusCode": 503}, 503)


def _shaped(dialect: Dialect, body: object, operation: Operation) -> Response:
    if dialect == "toolkit":
        return _json({"data": body}, operation.toolkit_status)
    return _json(body)


def _ingest_answer(dialect: Dialect, outcome: IngestOutcome, partial: bool) -> Response:
    result = {"ingested": outcome.ingested, "rejected": [error.to_api() for error in outcome.rejected]}
    if dialect == "toolkit":
        return _json({"data": result})
    if partial:
        return _json(result)
    return Response(f"{outcome.ingested} records were ingested", media_type="text/plain")


def _dialect(authorization: str | None) -> Dialect:
    return "toolkit" if authorization is not None else "amberflo"


def _flag(values: list[str] | None, name: str) -> bool:
    if not values:
        return False
    value = values[-1].lower()
    if value not in ("true", "false", "1", "0", ""):
        raise RequestError(f"{name} must be true or false, got {values[-1]!r}")
    return value in ("true", "1", "")


class _IngestEndpoint:
    """``POST /ingest`` as a raw ASGI app."""

    def __init__(self, service: MeteringService, authenticator: Authenticator, max_body_bytes: int) -> None:
        self._service = service
        self._authenticator = authenticator
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = api_key = content_encoding = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                api_key = value.decode("latin-1")
            elif name == b"content-encoding":
                content_encoding = value.decode("latin-1")
        dialect = _dialect(authorization)
        try:
            principal = self._authenticator.authenticate(authorization, api_key)
            body = await _read_body(receive, self._max_body_bytes)
            partial = _flag(parse_qs(scope.get("query_string", b"").decode("latin-1")).get("partial"), "partial")
            items = decode_ingest_body(_inflate(body, content_encoding))
            outcome = await self._service.ingest(principal, items, source="ingest", partial=partial)
            if dialect == "amberflo" and not partial:
                # The hot answer, sent without a Response object.
                text = f"{outcome.ingested} records were ingested".encode()
                headers = [(b"content-length", str(len(text)).encode()), (b"content-type", _TEXT_PLAIN)]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": text})
                return
            response = _ingest_answer(dialect, outcome, partial)
        except RequestError as exc:
            response = _error(exc)
        except NotDurableError as exc:
            response = _not_durable(exc)
        await response(scope, receive, send)


def _inflate(body: bytes, content_encoding: str | None) -> bytes:
    """:func:`~meterlake.amberflo.api.inflate`, with the common case (one gzip member) in one zlib call, as the
    local Amberflo's ``/ingest`` does it; anything else (several members, damage, other encodings) goes the long way.

    Raises:
        RequestError: not valid gzip; 415 for another Content-Encoding.
    """
    if content_encoding == "gzip":
        inflater = zlib.decompressobj(wbits=31)  # gzip framing only; checks the CRC and length
        try:
            inflated = inflater.decompress(body)
        except zlib.error:
            pass
        else:
            if inflater.eof and not inflater.unused_data:
                return inflated
    return inflate(body, content_encoding)


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError("body: the client went away", status=400)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body: larger than {limit} bytes", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _json_body(request: Request, limit: int) -> object:
    body = await _read_body(request.receive, limit)
    if not body.strip():
        raise RequestError("body: a JSON body is required")
    try:
        return msgspec.json.decode(inflate(body, request.headers.get("content-encoding")))
    except msgspec.DecodeError as exc:
        raise RequestError(f"body is not JSON: {exc}") from None


def create_app(service: MeteringService, authenticator: Authenticator, *, max_body_bytes: int) -> ASGIApp:
    """The ASGI app of ``service``; callers are authenticated by ``authenticator``."""

    async def body(request: Request) -> object:
        return await _json_body(request, max_body_bytes)

    def query_params(request: Request) -> dict[str, list[str]]:
        return parse_qs(request.url.query, keep_blank_values=True)

    async def ingest_events(request: Request, principal: Principal, dialect: Dialect) -> Response:
        partial = _flag(query_params(request).get("partial"), "partial")
        document = await body(request)
        customers = onboarding_customers(document)
        if customers is not None:
            onboarded = [await run_in_threadpool(service.onboard_customer, principal, c) for c in customers]
            return _shaped(dialect, onboarded, by_id["ingestUsageEvents"])
        items = toolkit_records(document, received_ms=int(time.time() * 1000))
        outcome = await service.ingest(principal, items, source="event", partial=partial)
        return _ingest_answer(dialect, outcome, partial)

    def sync(operation_id: str, call: Callable[[Request, Principal, Any], Any]) -> _Handler:
        operation = by_id[operation_id]

        async def handle(request: Request, principal: Principal, dialect: Dialect) -> Response:
            payload = await body(request) if operation.request is not None else None
            result = await run_in_threadpool(call, request, principal, payload)
            return _shaped(dialect, result, operation)

        return handle

    by_id = {operation.operation_id: operation for operation in OPERATIONS}
    path = "meterId"

    handlers: dict[str, _Handler] = {
        "ingestUsageEvents": ingest_events,
        "onboardCustomer": sync("onboardCustomer", lambda r, p, b: service.onboard_customer(p, b)),
        "createMeter": sync("createMeter", lambda r, p, b: service.create_meter(p, b).to_api()),
        "listMeters": sync("listMeters", lambda r, p, b: [m.to_api() for m in service.list_meters(p)]),
        "updateMeter": sync("updateMeter", lambda r, p, b: service.update_meter(p, None, b).to_api()),
        "getMeter": sync("getMeter", lambda r, p, b: service.get_meter(p, r.path_params[path]).to_api()),
        "updateMeterById": sync(
            "updateMeterById", lambda r, p, b: service.update_meter(p, r.path_params[path], b).to_api()
        ),
        "deleteMeter": sync("deleteMeter", lambda r, p, b: service.delete_meter(p, r.path_params[path]).to_api()),
        "queryUsage": sync("queryUsage", lambda r, p, b: service.usage(p, service.parse_query(b), zero_fill=True)),
        "queryUsageSparse": sync(
            "queryUsageSparse", lambda r, p, b: service.usage(p, service.parse_query(b), zero_fill=False)
        ),
        "queryUsageBatch": sync("queryUsageBatch", lambda r, p, b: _batch(service, p, b)),
        "queryAllUsage": sync("queryAllUsage", lambda r, p, b: service.usage_of_all_meters(p, query_params(r))),
        "fetchUsage": sync(
            "fetchUsage", lambda r, p, b: service.usage_of_meter_id(p, r.path_params[path], query_params(r))
        ),
        "cancelUsage": sync("cancelUsage", lambda r, p, b: service.create_rule(p, b).to_api()),
        "createFilteringRule": sync("createFilteringRule", lambda r, p, b: service.create_rule(p, b).to_api()),
        "listFilteringRules": sync("listFilteringRules", lambda r, p, b: _rules(service, p, query_params(r))),
        "removeFilteringRule": sync(
            "removeFilteringRule", lambda r, p, b: service.remove_rule(p, r.path_params["ruleId"]).to_api()
        ),
    }

    def guarded(handler: _Handler) -> _Endpoint:
        async def endpoint(request: Request) -> Response:
            authorization = request.headers.get("authorization")
            try:
                principal = authenticator.authenticate(authorization, request.headers.get("x-api-key"))
                return await handler(request, principal, _dialect(authorization))
            except RequestError as exc:
                return _error(exc)
            except NotDurableError as exc:
                return _not_durable(exc)

        return endpoint

    async def openapi(request: Request) -> Response:
        return _json(openapi_document(str(request.base_url).rstrip("/")))

    ingest = _IngestEndpoint(service, authenticator, max_body_bytes)
    routes: list[Route] = []
    for operation in OPERATIONS:
        if operation.operation_id == "ingestMeterEvents":
            routes.append(Route(operation.path, ingest, methods=[operation.method]))
            continue
        if operation.operation_id == "getOpenApi":
            routes.append(Route(operation.path, openapi, methods=[operation.method]))
            continue
        handler = handlers.pop(operation.operation_id)
        routes.append(Route(operation.path, guarded(handler), methods=[operation.method]))
    if handlers:
        raise RuntimeError(f"handlers for operations the API does not define: {sorted(handlers)}")
    rest = Starlette(routes=routes)
    return _ServiceApp(ingest, rest)


def _batch(service: MeteringService, principal: Principal, body: object) -> list[dict[str, Any]]:
    if not isinstance(body, list):
        raise RequestError(f"a usage batch must be a JSON array of queries, got {type(body).__name__}")
    reports = []
    for index, item in enumerate(body):
        try:
            query = service.parse_query(item)
        except RequestError as exc:
            raise RequestError(f"query {index}: {exc.message}", status=exc.status) from None
        reports.append(service.usage(principal, query, zero_fill=True))
    return reports


def _rules(service: MeteringService, principal: Principal, params: Mapping[str, list[str]]) -> list[dict[str, object]]:
    names = params.get("meterApiName")
    rules = service.list_rules(
        principal,
        meter_api_name=names[-1] if names else None,
        include_removed=_flag(params.get("includeRemoved"), "includeRemoved"),
    )
    return [rule.to_api() for rule in rules]


class _ServiceApp:
    """Sends ``POST /ingest`` straight to its raw endpoint and everything else (lifespan too) to Starlette."""

    def __init__(self, ingest: ASGIApp, rest: ASGIApp) -> None:
        self._ingest = ingest
        self._rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ("/ingest", "/ingest/"):
            await self._ingest(scope, receive, send)
        else:
            await self._rest(scope, receive, send)
