"""The local API gateway over real HTTP on loopback: routing, the Cognito authorizer, one access-log line a request."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import socket
import string
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from meterlake.config import Config, parse_config
from meterlake.lake.home import DataDir
from meterlake.local.gateway import (
    AccessLogDeliveryError,
    AccessLogNotDurableError,
    AccessLogStats,
    AccessLogWriter,
    GatewayError,
    GatewayServer,
    create_gateway_app,
)
from meterlake.local.stream import RecordTooLargeError
from meterlake.records import ACCESS_LOG_FIELDS, MISSING
from tests.meterlake.local.test_auth import bad_tokens, forge

FIELD_NAMES = [f.name for f in ACCESS_LOG_FIELDS]
CONFIG = Config()
STAGE = CONFIG.meterlake.api_stage


class CollectingSink:
    """An in-memory delivery stream; ``fail_next`` makes that many calls raise first."""

    def __init__(self, fail_next: int = 0) -> None:
        self.lines: list[bytes] = []
        self.batches: list[int] = []
        self.fail_next = fail_next
        self._lock = threading.Lock()

    def put_records(self, lines: Sequence[bytes]) -> None:
        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise OSError("disk full")
            self.lines.extend(lines)
            self.batches.append(len(lines))

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(line) for line in self.lines]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> DataDir:
    """One data dir, so one RSA key generation, for the module."""
    return DataDir.resolve(tmp_path_factory.mktemp("home"))


@pytest.fixture
def sink() -> CollectingSink:
    return CollectingSink()


@pytest.fixture
def gateway(data_dir: DataDir, sink: CollectingSink) -> Iterator[GatewayServer]:
    with GatewayServer(config=CONFIG, data_dir=data_dir, access_log=sink, port=0) as server:
        yield server


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.invoke_url, timeout=10) as http:
        yield http


def logged(gateway: GatewayServer, sink: CollectingSink) -> list[dict[str, Any]]:
    gateway.drain(5)
    return sink.records()


def test_authorized_request_is_served_and_logged_with_its_claims(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink
) -> None:
    token = gateway.user_pool.issue_id_token(user="alice", tenant_id="acme")
    before_ms = time.time_ns() // 1_000_000
    response = client.get(
        "/random/strings", params={"len": 7, "num": 3, "chars": "digits"}, headers={"Authorization": token}
    )
    after_ms = time.time_ns() // 1_000_000
    assert response.status_code == 200
    strings = response.json()
    assert len(strings) == 3
    assert all(len(s) == 7 and set(s) <= set(string.digits) for s in strings)
    (record,) = logged(gateway, sink)
    assert record["request_id"] == response.headers["x-amzn-RequestId"]
    assert before_ms <= int(record["request_time"]) <= after_ms
    assert int(record["response_latency_ms"]) >= int(record["integration_latency_ms"]) >= 0
    assert {
        k: v
        for k, v in record.items()
        if k not in ("request_id", "request_time", "response_latency_ms", "integration_latency_ms")
    } == {
        "api_id": "local",
        "stage": STAGE,
        "tenant_id": "acme",
        "user": "alice",
        "client_id": CONFIG.meterlake.local.client_id,
        "ip": "127.0.0.1",
        "user_agent": client.headers["user-agent"],
        "http_method": "GET",
        "resource_path": "/random/strings",
        "path": f"/{STAGE}/random/strings",
        "status": "200",
        "protocol": "HTTP/1.1",
        "response_length": str(len(response.content)),
    }


def test_bearer_form_is_accepted_and_a_tenantless_token_is_served(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink
) -> None:
    with_tenant = gateway.user_pool.issue_id_token(user="alice", tenant_id="acme")
    without_tenant = gateway.user_pool.issue_id_token(user="bob", tenant_id=None)
    assert client.get("/random/strings", headers={"Authorization": f"Bearer {with_tenant}"}).status_code == 200
    assert client.get("/random/strings", headers={"Authorization": without_tenant}).status_code == 200
    first, second = logged(gateway, sink)
    assert (first["tenant_id"], first["user"]) == ("acme", "alice")
    assert (second["tenant_id"], second["user"], second["status"]) == (MISSING, "bob", "200")


def test_every_bad_token_is_a_bare_401_logged_without_claims(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink, data_dir: DataDir
) -> None:
    headers: list[dict[str, str]] = [{}, {"Authorization": ""}, {"Authorization": "Bearer"}]
    headers += [{"Authorization": token} for token in bad_tokens(data_dir, gateway.user_pool).values()]
    for header in headers:
        response = client.get("/random/strings", headers=header)
        assert (response.status_code, response.json()) == (401, {"message": "Unauthorized"}), header
    records = logged(gateway, sink)
    assert len(records) == len(headers)
    for record in records:
        assert record["status"] == "401"
        assert record["resource_path"] == "/random/strings"
        assert (
            record["tenant_id"] == record["user"] == record["client_id"] == record["integration_latency_ms"] == MISSING
        )


@pytest.mark.parametrize(
    ("params", "count", "length", "alphabet"),
    [
        ({}, 1, 1, string.ascii_letters),
        ({"len": "50", "num": "0"}, 1, 20, string.ascii_letters),
        ({"len": "-3", "num": "1000", "chars": "uppercase"}, 100, 1, string.ascii_uppercase),
        ({"len": "20", "num": "+4", "chars": "lowercase"}, 4, 20, string.ascii_lowercase),
        ({"len": "9" * 5000, "num": "-" + "9" * 5000}, 1, 20, string.ascii_letters),
        ({"len": "0007", "num": "0100", "chars": "digits"}, 100, 7, string.digits),
    ],
)
def test_parameters_default_and_clamp_like_the_sample(
    gateway: GatewayServer, client: httpx.Client, params: dict[str, str], count: int, length: int, alphabet: str
) -> None:
    token = gateway.user_pool.issue_id_token(user="alice", tenant_id="acme")
    strings = client.get("/random/strings", params=params, headers={"Authorization": token}).json()
    assert len(strings) == count
    assert all(len(s) == length and set(s) <= set(alphabet) for s in strings)


@pytest.mark.parametrize(
    ("params", "named"),
    [({"chars": "symbols"}, "chars"), ({"num": "abc"}, "num"), ({"len": "1.5"}, "len"), ({"len": ""}, "len")],
)
def test_bad_parameters_are_400_naming_the_parameter(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink, params: dict[str, str], named: str
) -> None:
    token = gateway.user_pool.issue_id_token(user="alice", tenant_id="acme")
    response = client.get("/random/strings", params=params, headers={"Authorization": token})
    assert response.status_code == 400
    assert response.json()["message"].startswith(f"{named} must be")
    (record,) = logged(gateway, sink)
    assert (record["status"], record["tenant_id"]) == ("400", "acme")
    assert record["integration_latency_ms"] != MISSING


MISSING_TOKEN_BODY = b'{"message":"Missing Authentication Token"}'


def incomplete_signature_body(authorization: str) -> dict[str, str]:
    """API Gateway's body for a route it does not have, reached with an ``Authorization`` header (quoted hashed)."""
    digest = base64.b64encode(hashlib.sha256(authorization.encode()).digest()).decode()
    return {
        "message": "Invalid key=value pair (missing equal-sign) in Authorization header "
        f"(hashed with SHA-256 and encoded with Base64): '{digest}'."
    }


def refused_by_api_gateway(record: dict[str, Any]) -> tuple[str, ...]:
    """What the access log says of a request API Gateway refused before any resource or authorizer."""
    keys = ("status", "resource_path", "tenant_id", "user", "client_id", "integration_latency_ms")
    return tuple(record[k] for k in keys)


REFUSED = ("403", MISSING, MISSING, MISSING, MISSING, MISSING)


def test_an_unknown_path_without_authorization_is_403_missing_authentication_token(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink
) -> None:
    responses = [
        client.get("/random/numbers"),
        client.get("/random/strings/extra", headers={"Authorization": ""}),
        client.get(f"http://127.0.0.1:{gateway.port}/{STAGE}"),
    ]
    for response in responses:
        assert (response.status_code, response.content) == (403, MISSING_TOKEN_BODY)
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
    records = logged(gateway, sink)
    assert [(r["http_method"], r["path"]) for r in records] == [
        ("GET", f"/{STAGE}/random/numbers"),
        ("GET", f"/{STAGE}/random/strings/extra"),
        ("GET", f"/{STAGE}"),
    ]
    assert [refused_by_api_gateway(r) for r in records] == [REFUSED] * 3
    assert [r["request_id"] for r in records] == [r.headers["x-amzn-RequestId"] for r in responses]


def test_a_method_the_resource_does_not_have_is_403_with_no_resource_path(
    client: httpx.Client, gateway: GatewayServer, sink: CollectingSink
) -> None:
    for method in ("POST", "PUT", "DELETE", "HEAD"):
        response = client.request(method, "/random/strings")
        assert response.status_code == 403, method
        assert response.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
        assert "allow" not in response.headers
        if method != "HEAD":
            assert response.content == MISSING_TOKEN_BODY
    records = logged(gateway, sink)
    assert [(r["http_method"], r["path"]) for r in records] == [
        (method, f"/{STAGE}/random/strings") for method in ("POST", "PUT", "DELETE", "HEAD")
    ]
    assert [refused_by_api_gateway(r) for r in records] == [REFUSED] * 4


def test_a_missing_route_with_a_token_is_403_incomplete_signature_and_never_attributed(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink
) -> None:
    token = gateway.user_pool.issue_id_token(user="alice", tenant_id="acme")
    sent = [
        ("GET", "/random/numbers", token),
        ("GET", "/random/numbers", f"Bearer {token}"),
        ("POST", "/random/strings", token),
        ("GET", "/random/numbers", "not a token"),
    ]
    for method, path, authorization in sent:
        response = client.request(method, path, headers={"Authorization": authorization})
        assert response.status_code == 403
        assert response.json() == incomplete_signature_body(authorization)
        assert response.headers["x-amzn-ErrorType"] == "IncompleteSignatureException"
        assert token not in response.text
    assert incomplete_signature_body(token) != incomplete_signature_body(f"Bearer {token}")
    records = logged(gateway, sink)
    assert [(r["http_method"], r["path"]) for r in records] == [(m, f"/{STAGE}{p}") for m, p, _ in sent]
    assert [refused_by_api_gateway(r) for r in records] == [REFUSED] * len(sent)


def test_no_token_is_written_to_the_access_log_or_the_server_log(
    gateway: GatewayServer,
    client: httpx.Client,
    sink: CollectingSink,
    data_dir: DataDir,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = gateway.user_pool.issue_id_token(user="alice", tenant_id="acme")
    expired = bad_tokens(data_dir, gateway.user_pool)["expired"]
    with caplog.at_level(logging.DEBUG):
        for method, path, authorization in [
            ("GET", "/random/strings", token),
            ("GET", "/random/numbers", token),
            ("POST", "/random/strings", f"Bearer {token}"),
            ("GET", "/random/strings", expired),
            ("GET", "/random/numbers", expired),
        ]:
            client.request(method, path, headers={"Authorization": authorization})
        records = logged(gateway, sink)
    assert [r["status"] for r in records] == ["200", "403", "403", "401", "403"]
    lines = b"".join(sink.lines)
    for secret in (token, expired):
        for part in secret.split("."):  # no piece of a JWT either: header, claims or signature
            assert part.encode() not in lines
            assert part not in caplog.text


def test_jwks_is_served_at_the_issuer_and_not_access_logged(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink
) -> None:
    assert gateway.issuer == f"http://127.0.0.1:{gateway.port}/{CONFIG.meterlake.local.user_pool_id}"
    assert gateway.invoke_url == f"http://127.0.0.1:{gateway.port}/{STAGE}"
    response = client.get(gateway.user_pool.jwks_url)
    assert response.status_code == 200
    assert response.json() == gateway.user_pool.jwks()
    assert logged(gateway, sink) == []


def test_lines_hold_exactly_the_record_fields_as_strings(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink
) -> None:
    token = gateway.user_pool.issue_id_token(user="alice", tenant_id=None)
    client.get("/random/strings", headers={"Authorization": token})
    client.get("/random/strings")
    client.get("/nowhere", headers={"User-Agent": ""})
    gateway.drain(5)
    assert len(sink.lines) == 3
    for line in sink.lines:
        record = json.loads(line)
        assert list(record) == FIELD_NAMES
        assert all(isinstance(value, str) and value for value in record.values())


def test_concurrent_requests_each_log_exactly_one_line(gateway: GatewayServer, sink: CollectingSink) -> None:
    tokens = [gateway.user_pool.issue_id_token(user=f"user{i}", tenant_id=f"t{i % 3}") for i in range(4)]
    targets = [("/random/strings", {"Authorization": tokens[i % 4]}) for i in range(240)]
    targets += [("/random/strings", {"Authorization": "bad"}) for _ in range(30)]
    targets += [("/missing", {}) for _ in range(30)]

    async def worker(jobs: list[tuple[str, dict[str, str]]], ids: list[str]) -> None:
        async with httpx.AsyncClient(base_url=gateway.invoke_url, timeout=10) as http:
            for path, headers in jobs:
                ids.append((await http.get(path, headers=headers)).headers["x-amzn-RequestId"])

    async def load() -> list[str]:
        ids: list[str] = []
        await asyncio.gather(*(worker(targets[i::16], ids) for i in range(16)))
        return ids

    response_ids = asyncio.run(load())
    records = logged(gateway, sink)
    assert len(records) == len(targets) == 300
    assert sorted(r["request_id"] for r in records) == sorted(response_ids)
    assert len(set(response_ids)) == 300
    statuses = [r["status"] for r in records]
    assert (statuses.count("200"), statuses.count("401"), statuses.count("403")) == (240, 30, 30)


def test_closing_the_server_delivers_every_line(data_dir: DataDir) -> None:
    sink = CollectingSink()
    with GatewayServer(config=CONFIG, data_dir=data_dir, access_log=sink, port=0) as server:
        for _ in range(5):
            httpx.get(server.invoke_url + "/nowhere")
    assert len(sink.lines) == 5
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.invoke_url + "/nowhere")


def test_a_port_in_use_is_a_clear_error(data_dir: DataDir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(GatewayError, match=f"port {port} on 127.0.0.1 is in use"):
            GatewayServer(config=CONFIG, data_dir=data_dir, access_log=CollectingSink(), port=port)


def test_the_configured_port_is_used_when_none_is_given(data_dir: DataDir) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = parse_config({"meterlake": {"local": {"port": port}}})
    with GatewayServer(config=config, data_dir=data_dir, access_log=CollectingSink()) as server:
        assert server.port == port
        assert server.user_pool.issuer.startswith(f"http://127.0.0.1:{port}/")


def test_an_exception_is_a_logged_500_even_midway_through_the_body(data_dir: DataDir, gateway: GatewayServer) -> None:
    """The response is held until its line is durable, so a failure midway is still a clean 500, not a torn body."""
    sink = CollectingSink()
    app = create_gateway_app(config=CONFIG, user_pool=gateway.user_pool, access_log=sink)

    async def broken(_: Request) -> Response:
        raise RuntimeError("integration bug")

    async def broken_midway(_: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"["
            raise RuntimeError("failed while streaming")

        return StreamingResponse(body())

    app.add_route(f"/{STAGE}/broken", broken)
    app.add_route(f"/{STAGE}/broken-midway", broken_midway)

    async def call() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            return [await http.get(f"/{STAGE}/broken"), await http.get(f"/{STAGE}/broken-midway")]

    responses = asyncio.run(call())
    for response in responses:
        assert (response.status_code, response.json()) == (500, {"message": "Internal server error"})
    app.access_log_writer.close(5)
    records = [json.loads(line) for line in sink.lines]
    assert [(r["status"], r["request_id"]) for r in records] == [
        ("500", response.headers["x-amzn-RequestId"]) for response in responses
    ]


def test_writer_retries_lines_nobody_waits_for_in_order_until_the_sink_takes_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = CollectingSink(fail_next=2)
    writer = AccessLogWriter(sink, max_batch=4)
    lines = [f"line {i}".encode() for i in range(10)]
    with caplog.at_level(logging.WARNING, logger="meterlake.local.gateway"):
        for i, line in enumerate(lines):
            writer.put(line, f"request-{i}")
        writer.drain(10)
    assert sink.lines == lines
    assert max(sink.batches) <= 4
    assert writer.stats() == AccessLogStats(delivered=10, refused=0, not_durable=0, dropped=0, pending=0)
    # One ERROR when the sink starts failing, one WARNING when it works again: not one per retry.
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert "access-log sink failed (disk full)" in caplog.records[0].getMessage()
    writer.close(5)
    with pytest.raises(RuntimeError, match="closed"):
        writer.put(b"late", "request-late")


def test_drain_reports_lines_a_broken_sink_still_holds() -> None:
    sink = CollectingSink(fail_next=10**9)
    writer = AccessLogWriter(sink)
    writer.put(b"one", "request-1")
    writer.put(b"two", "request-2")
    with pytest.raises(AccessLogDeliveryError, match=r"2 access-log lines not yet delivered.*disk full") as failed:
        writer.drain(0.3)
    assert failed.value.pending == 2
    assert isinstance(failed.value.last_error, OSError)
    sink.fail_next = 0
    writer.close(10)
    assert sink.lines == [b"one", b"two"]


def test_a_full_backlog_drops_its_oldest_lines_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """On a long outage, lines nobody waits for are bounded in memory, not kept without limit."""
    sink = CollectingSink(fail_next=10**9)
    writer = AccessLogWriter(sink, max_backlog=3)
    with caplog.at_level(logging.ERROR, logger="meterlake.local.gateway"):
        for i in range(5):
            writer.put(f"line {i}".encode(), f"request-{i}")
    sink.fail_next = 0
    writer.close(10)
    assert sink.lines == [b"line 2", b"line 3", b"line 4"]
    assert writer.stats() == AccessLogStats(delivered=3, refused=0, not_durable=0, dropped=2, pending=0)
    dropped = [r.getMessage() for r in caplog.records if "backlog full" in r.getMessage()]
    assert sorted(m.rsplit(" ", 1)[-1] for m in dropped) == ["request-0", "request-1"]


class RefusingSink(CollectingSink):
    """Refuses for good, as the delivery stream does, any batch holding a line with ``marker``."""

    def __init__(self, marker: bytes) -> None:
        super().__init__()
        self.marker = marker

    def put_records(self, lines: Sequence[bytes]) -> None:
        for index, line in enumerate(lines):
            if self.marker in line:
                raise RecordTooLargeError(index, len(line))
        super().put_records(lines)


def test_one_line_the_sink_refuses_for_good_is_set_aside_and_never_blocks_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 10 item 1 (a): the refused line used to be put back and retried forever, wedging every later line."""
    sink = RefusingSink(b"huge")
    writer = AccessLogWriter(sink, max_batch=8)
    lines = [b"huge line" if i == 3 else f"line {i}".encode() for i in range(20)]
    with caplog.at_level(logging.ERROR, logger="meterlake.local.gateway"):
        for i, line in enumerate(lines):
            writer.put(line, f"request-{i}")
        writer.drain(5)

        async def commit_huge() -> None:
            await writer.commit(b"another huge line", "request-huge")

        with pytest.raises(AccessLogNotDurableError, match="request-huge is not durable: record 0 of the batch"):
            asyncio.run(commit_huge())
        writer.put(b"after", "request-after")
        writer.close(5)
    assert sink.lines == [line for line in lines if line != b"huge line"] + [b"after"]
    assert writer.stats() == AccessLogStats(delivered=20, refused=2, not_durable=0, dropped=0, pending=0)
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refused) == 2
    assert "request-3 refused for good" in refused[0]
    assert "request-huge refused for good" in refused[1]


def test_a_path_outside_the_stage_is_403_forbidden_and_logged_by_no_stage(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink
) -> None:
    """The first path segment names the stage: one the API does not have is API Gateway's 403 Forbidden."""
    token = gateway.user_pool.issue_id_token(user="alice", tenant_id="acme")
    for path, headers in (("/other", {}), (f"/{STAGE}x/random/strings", {"Authorization": token}), ("/", {})):
        response = client.get(f"http://127.0.0.1:{gateway.port}{path}", headers=headers)
        assert (response.status_code, response.json()) == (403, {"message": "Forbidden"}), path
        assert response.headers["x-amzn-ErrorType"] == "ForbiddenException"
    assert client.get("/random/strings", headers={"Authorization": token}).status_code == 200
    assert [r["path"] for r in logged(gateway, sink)] == [f"/{STAGE}/random/strings"]


# -- API Gateway's request limits, and requests uvicorn used to refuse by itself ---------------------------------------


def raw_exchange(port: int, *chunks: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``chunks`` on a fresh connection (a pause between them) and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(0.05)
        received = b""
        while data := sock.recv(65536):
            received += data
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {name.decode().lower(): value.decode() for name, _, value in (h.partition(b": ") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def head(*, method: bytes = b"GET", target: bytes = f"/{STAGE}/random/strings".encode(), pad: int = 0) -> bytes:
    """A request head; its header lines add up to 37 + ``pad`` bytes as API Gateway counts them."""
    padding = b"X-Pad: " + b"p" * pad + b"\r\n" if pad else b""
    return method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + padding + b"\r\n"


HEADERS_TOO_LARGE = b'{"message":"HTTP header is larger than 10240 bytes."}'
TARGET_TOO_LONG = b'{"message":"Request URI too long"}'
BODY_TOO_LARGE = b'{"message":"Request Too Long"}'
BAD_REQUEST = b'{"message":"Bad Request"}'
UNAUTHORIZED = b'{"message":"Unauthorized"}'


def test_requests_over_api_gateway_limits_are_answered_as_api_gateway_does_and_logged(
    gateway: GatewayServer, sink: CollectingSink
) -> None:
    """Issue 10 item 1 (b): headers and URL up to 10240 bytes are served, one byte more is refused; body over 10 MB."""
    query = f"/{STAGE}/random/strings?pad=".encode()
    sent = [
        (head(pad=10_240 - 37), 401, UNAUTHORIZED),
        (head(pad=10_240 - 37 + 1), 431, HEADERS_TOO_LARGE),
        (head(target=query + b"a" * (10_240 - len(query))), 401, UNAUTHORIZED),
        (head(target=query + b"a" * (10_240 - len(query) + 1)), 414, TARGET_TOO_LONG),
        (head(target=query + b"a" * 100_000), 414, TARGET_TOO_LONG),
        (head(pad=5_000_000), 431, HEADERS_TOO_LARGE),
        (head().replace(b"\r\n\r\n", b"\r\nContent-Length: 10485761\r\n\r\n"), 413, BODY_TOO_LARGE),
    ]
    answers = [raw_exchange(gateway.port, request) for request, _, _ in sent]
    assert [(status, body) for status, _, body in answers] == [(status, body) for _, status, body in sent]
    for status, headers, _ in answers:
        assert headers["content-type"] == "application/json"
        if status == 401:  # the authorizer's gateway response
            assert headers["x-amzn-errortype"] == "UnauthorizedException"
        else:  # refused by API Gateway's front end, before any gateway response
            assert "x-amzn-errortype" not in headers
            assert headers["connection"] == "close"
    records = logged(gateway, sink)
    assert [(r["status"], r["request_id"]) for r in records] == [
        (str(status), headers["x-amzn-requestid"]) for status, headers, _ in answers
    ]
    assert all(len(line) < 2048 for line in sink.lines)  # no oversized value reaches the log
    assert {r["path"] for r in records} == {f"/{STAGE}/random/strings"}
    assert all(r["tenant_id"] == r["resource_path"] == MISSING for r in records if r["status"] != "401")


def test_an_oversized_request_with_a_valid_token_is_refused_without_running_the_authorizer(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink
) -> None:
    token = gateway.user_pool.issue_id_token(user="alice", tenant_id="acme")
    response = client.get("/random/strings", headers={"Authorization": token, "User-Agent": "u" * 5_000_000})
    assert (response.status_code, response.content) == (431, HEADERS_TOO_LARGE)
    assert client.get("/random/strings", headers={"Authorization": token}).status_code == 200
    refused, served = logged(gateway, sink)
    assert (refused["status"], refused["tenant_id"], refused["user_agent"]) == ("431", MISSING, MISSING)
    assert refused["request_id"] == response.headers["x-amzn-RequestId"]
    assert (served["status"], served["tenant_id"]) == ("200", "acme")


@pytest.mark.parametrize(
    ("chunks", "status", "body", "method", "path"),
    [
        ((head(method=b"FOO"),), 403, MISSING_TOKEN_BODY, "FOO", f"/{STAGE}/random/strings"),
        ((head(method=b"FOO")[:7], head(method=b"FOO")[7:]), 403, MISSING_TOKEN_BODY, "FOO", None),
        ((head().replace(b"Host: x", b"Host: x\r\nX-A: a\rb"),), 400, BAD_REQUEST, "GET", None),
        ((head().replace(b"Host: x", b"Host: x\r\nX-A: a\nb"),), 400, BAD_REQUEST, "GET", None),
        ((head().replace(b"Host: x", b"Host: x\r\nX-A: a\x00b"),), 400, BAD_REQUEST, "GET", None),
        ((head().replace(b"Host: x", b"Host: x\r\nX A: b"),), 400, BAD_REQUEST, "GET", None),
        (
            (head(target=f"/{STAGE}/random/str\xe9".encode("latin-1")),),
            400,
            BAD_REQUEST,
            "GET",
            f"/{STAGE}/random/str\xe9",
        ),
        ((head().replace(b"HTTP/1.1", b"HTTP/2.5"),), 400, BAD_REQUEST, "GET", None),
        ((head(method=b"G(T"),), 400, BAD_REQUEST, "G(T", None),
    ],
    ids=[
        "unknown method",
        "unknown method, head in two",
        "CR",
        "LF",
        "NUL",
        "bad header name",
        "raw non-ASCII",
        "HTTP/2.5",
        "not a token",
    ],
)
def test_requests_uvicorn_refused_by_itself_are_answered_as_api_gateway_and_logged(
    gateway: GatewayServer,
    sink: CollectingSink,
    chunks: tuple[bytes, ...],
    status: int,
    body: bytes,
    method: str,
    path: str | None,
) -> None:
    """Issue 10 item 10: uvicorn answered these with its own text/plain 400 and no access-log line."""
    answered_status, headers, answered_body = raw_exchange(gateway.port, *chunks)
    assert (answered_status, answered_body) == (status, body)
    (record,) = logged(gateway, sink)
    assert (record["status"], record["http_method"], record["request_id"]) == (
        str(status),
        method,
        headers["x-amzn-requestid"],
    )
    assert record["path"] == (path or f"/{STAGE}/random/strings")
    assert client_works(gateway)


def client_works(gateway: GatewayServer) -> bool:
    """The gateway still serves a plain request on a new connection."""
    return httpx.get(gateway.invoke_url + "/random/strings", timeout=10).status_code == 401


def test_a_trailing_slash_is_a_missing_resource_not_a_redirect_built_from_the_host_header(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink
) -> None:
    token = gateway.user_pool.issue_id_token(user="alice", tenant_id="acme")
    for headers in ({"Host": "evil.example"}, {"Host": "evil.example", "Authorization": token}):
        response = client.get("/random/strings/", headers=headers)
        assert response.status_code == 403
        assert "location" not in response.headers
    records = logged(gateway, sink)
    assert [refused_by_api_gateway(r) for r in records] == [REFUSED] * 2


def test_a_claim_with_a_lone_surrogate_is_a_whole_401_and_is_logged(
    gateway: GatewayServer, client: httpx.Client, sink: CollectingSink, data_dir: DataDir
) -> None:
    """Issue 10 item 10: the claim used to pass, then break the log line's UTF-8: a torn response and no line."""
    claims: dict[str, Any] = {
        "iss": gateway.issuer,
        "aud": CONFIG.meterlake.local.client_id,
        "custom:tenant_id": "acme\ud800",
    }
    token = forge(data_dir, gateway.user_pool, **claims)
    response = client.get("/random/strings", headers={"Authorization": token})
    assert (response.status_code, response.content) == (401, UNAUTHORIZED)
    (record,) = logged(gateway, sink)
    assert (record["status"], record["tenant_id"], record["request_id"]) == (
        "401",
        MISSING,
        response.headers["x-amzn-RequestId"],
    )


# -- durable before the answer -----------------------------------------------------------------------------------------


class GatedSink(CollectingSink):
    """Holds every put until ``gate`` is set; ``entered`` is set once a put started."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def put_records(self, lines: Sequence[bytes]) -> None:
        self.entered.set()
        self.gate.wait(10)
        super().put_records(lines)


def test_the_answer_leaves_only_once_its_line_is_durable(data_dir: DataDir) -> None:
    """Issue 10 item 4: the gateway used to answer first and hand the line to the stream ~20 ms later."""
    sink = GatedSink()
    with GatewayServer(config=CONFIG, data_dir=data_dir, access_log=sink, port=0) as server:
        answered: list[httpx.Response] = []
        caller = threading.Thread(target=lambda: answered.append(httpx.get(server.invoke_url + "/nowhere")))
        caller.start()
        assert sink.entered.wait(5)
        caller.join(0.5)
        assert caller.is_alive()  # the put has not returned: no answer yet
        assert not answered
        sink.gate.set()
        caller.join(5)
        [response] = answered
        assert response.status_code == 403
        assert [json.loads(line)["request_id"] for line in sink.lines] == [response.headers["x-amzn-RequestId"]]


class SlowSink(CollectingSink):
    """Takes 20 ms a put, like an fsync on a slow disk."""

    def put_records(self, lines: Sequence[bytes]) -> None:
        time.sleep(0.02)
        super().put_records(lines)


def test_concurrent_answers_share_one_put_a_group_commit(data_dir: DataDir) -> None:
    sink = SlowSink()
    with GatewayServer(config=CONFIG, data_dir=data_dir, access_log=sink, port=0) as server:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=server.invoke_url, timeout=10) as http:
                responses = await asyncio.gather(*(http.get("/random/strings") for _ in range(64)))
            return [r.status_code for r in responses]

        assert asyncio.run(burst()) == [401] * 64
    assert sum(sink.batches) == 64
    assert len(sink.batches) <= 16


def test_an_unusable_sink_answers_503_instead_of_the_success_and_recovers(
    data_dir: DataDir, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 item 4: an answer whose line cannot be made durable must not claim success."""
    sink = CollectingSink(fail_next=10**9)
    with (
        caplog.at_level(logging.WARNING, logger="meterlake.local.gateway"),
        GatewayServer(config=CONFIG, data_dir=data_dir, access_log=sink, port=0) as server,
        httpx.Client(base_url=server.invoke_url, timeout=10) as http,
    ):
        token = server.user_pool.issue_id_token(user="alice", tenant_id="acme")
        failed = [http.get("/random/strings", headers={"Authorization": token}) for _ in range(3)]
        for response in failed:
            assert (response.status_code, response.json()) == (503, {"message": "Service Unavailable"})
            assert response.headers["x-amzn-ErrorType"] == "ServiceUnavailableException"
        assert server.access_log_stats().not_durable == 3
        sink.fail_next = 0  # space is back
        served = http.get("/random/strings", headers={"Authorization": token})
        assert served.status_code == 200
        server.drain(10)
        stats = server.access_log_stats()
    records = sink.records()
    assert sorted((r["status"], r["request_id"]) for r in records) == sorted(
        (str(r.status_code), r.headers["x-amzn-RequestId"]) for r in [*failed, served]
    )
    assert all(r["tenant_id"] == "acme" for r in records)
    assert (stats.delivered, stats.not_durable, stats.pending) == (4, 3, 0)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == ["ERROR", "WARNING"]
    assert "answering 503 until it accepts lines again" in messages[0][1]
    assert "3 answers so far were withheld (503)" in messages[1][1]
