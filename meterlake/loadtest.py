"""Load test for the metered API: the local gateway or a real API Gateway stage with Cognito ID tokens.

Successor of the AWS sample's tests/run_test.py: it sends ``GET <invoke-url>/random/strings`` with random
``len``/``num``/``chars`` parameters, the token raw in ``Authorization``, and keeps that script's flags' meaning.
It adds concurrency, several tenants, a share of unauthenticated and not-found requests, and a report (rps,
latency percentiles, status counts, answered requests per tenant) that the demo reconciles against the lake.
A not-found request is answered 403, not 404: API Gateway (and the local gateway) answer every route or method
the API does not have with 403 Missing Authentication Token, or an IncompleteSignature 403 when a token is sent.
"""

from __future__ import annotations

import asyncio
import random
import shlex
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import httpx

from meterlake.records import API_KEY_HEADER

ROUTE = "/random/strings"
#: Answers below this status (with a tenant) are billable: the usage queries' and the shipped api-calls meter's rule.
BILLABLE_BELOW_STATUS = 500
NOT_FOUND_ROUTE = "/random/nothing-here"
#: Statuses from here on are failures: the client's (4xx) or the server's (5xx).
_FIRST_ERROR_STATUS = 400
_UNAUTHORIZED = 401
_CHARS = ("", "lowercase", "uppercase", "letters", "digits")


class LoadTestError(Exception):
    """The load test cannot run: a bad URL, no token, or the API cannot be reached at all."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sends a request: a tenant label (None = unauthenticated), the ID token and/or the API key to send."""

    tenant_id: str | None
    token: str | None
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        """The request headers carrying the caller's credentials: the token raw in Authorization, the key in
        x-api-key (what a Cognito or Lambda authorizer and an API-key-requiring method read)."""
        headers = {}
        if self.token:
            headers["Authorization"] = self.token
        if self.api_key:
            headers[API_KEY_HEADER] = self.api_key
        return headers


@dataclass(frozen=True, slots=True)
class LoadTestPlan:
    """What to send. ``total`` requests, or for ``duration_s`` seconds when ``total`` is None."""

    invoke_url: str
    callers: tuple[Caller, ...]
    total: int | None = 10
    duration_s: float | None = None
    concurrency: int = 8
    unauthenticated_share: float = 0.0
    not_found_share: float = 0.0
    timeout_s: float = 10.0
    seed: int | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.invoke_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LoadTestError(f"invoke URL {self.invoke_url!r} is not an http(s) URL")
        if self.total is None and self.duration_s is None:
            raise LoadTestError("give a request count or a duration")
        if self.total is not None and self.total < 1:
            raise LoadTestError(f"request count must be at least 1, got {self.total}")
        if self.concurrency < 1:
            raise LoadTestError(f"concurrency must be at least 1, got {self.concurrency}")
        for name, share in (("unauthenticated", self.unauthenticated_share), ("not-found", self.not_found_share)):
            if not 0.0 <= share <= 1.0:
                raise LoadTestError(f"{name} share must be between 0 and 1, got {share}")
        if not self.callers:
            raise LoadTestError("no callers: give at least one token (or tenant)")


@dataclass(slots=True)
class LoadTestReport:
    """What the API answered. Only answered requests (any HTTP status) count; transport failures are listed apart."""

    duration_s: float = 0.0
    status_counts: Counter[int] = field(default_factory=Counter)
    answered_by_tenant: Counter[str | None] = field(default_factory=Counter)
    #: Of those, the billable ones (status < 500, with a tenant: the usage queries' and the meters' rule).
    billable_by_tenant: Counter[str | None] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    transport_errors: Counter[str] = field(default_factory=Counter)
    request_ids: list[str] = field(default_factory=list)
    #: The run was cut short (Ctrl-C): the report covers what was answered until then.
    interrupted: bool = False

    @property
    def answered(self) -> int:
        """Requests that got an HTTP response."""
        return sum(self.status_counts.values())

    @property
    def requests_per_s(self) -> float:
        """Answered requests per second over the whole run."""
        return self.answered / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def succeeded(self) -> int:
        """Requests answered with a success (status below 400)."""
        return sum(n for status, n in self.status_counts.items() if status < _FIRST_ERROR_STATUS)

    def failure(self) -> str | None:
        """Why the run as a whole failed: every request that was sent failed; None when any succeeded.

        A run of only 401s is the classic symptom of a token for another gateway (issuer) or an expired one.
        """
        sent = self.answered + sum(self.transport_errors.values())
        if sent == 0 or self.succeeded:
            return None
        statuses = ", ".join(f"{code} x{n}" for code, n in sorted(self.status_counts.items())) or "no answer"
        hint = ""
        if self.status_counts.get(_UNAUTHORIZED):
            hint = (
                "; a 401 means the authorizer refused the token (expired, or issued for another gateway: the local "
                "gateway's log says why)"
            )
        return f"none of the {sent} requests succeeded ({statuses}){hint}"

    def latency_percentile(self, q: float) -> float:
        """Nearest-rank latency percentile in ms (0 when nothing was answered)."""
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
        return ordered[rank]


def random_query_params(rng: random.Random) -> dict[str, int | str]:
    """Random ``chars``/``len``/``num`` parameters, as the sample's gen_params() draws them."""
    params: dict[str, int | str] = {}
    chars = rng.choice(_CHARS)
    length = rng.randint(0, 20)
    num = rng.randint(0, 5)
    if chars:
        params["chars"] = chars
    if length:
        params["len"] = length
    if num:
        params["num"] = num
    return params


def invoke_url_from_parts(*, rest_api_id: str | None, region: str, stage: str) -> str:
    """Build ``https://<rest-api-id>.execute-api.<region>.amazonaws.com/<stage>`` as run_test.py does."""
    if not rest_api_id:
        raise LoadTestError("give --apigw-invoke-url, or --rest-api-id (with --region and --stage)")
    return f"https://{rest_api_id}.execute-api.{region}.amazonaws.com/{stage}"


def dry_run_commands(plan: LoadTestPlan, count: int) -> list[str]:
    """The curl commands the plan would send (the sample's --dry-run output), without sending anything."""
    rng = random.Random(plan.seed)
    commands = []
    for _ in range(count):
        url, caller = _next_request(plan, rng)
        headers = "".join(f" --header {shlex.quote(f'{name}: {value}')}" for name, value in caller.headers().items())
        commands.append(f"curl -XGET {shlex.quote(url)}{headers}")
    return commands


def _next_request(plan: LoadTestPlan, rng: random.Random) -> tuple[str, Caller]:
    base = plan.invoke_url.rstrip("/")
    route = NOT_FOUND_ROUTE if rng.random() < plan.not_found_share else ROUTE
    if rng.random() < plan.unauthenticated_share:
        caller = Caller(tenant_id=None, token=None)
    else:
        caller = rng.choice(plan.callers)
    query = urlencode(random_query_params(rng))
    return (f"{base}{route}?{query}" if query else f"{base}{route}"), caller


def _attributed_tenant(url: str, caller: Caller, status: int) -> str | None:
    """The tenant the access log will carry: none unless the authorizer ran on a real route and accepted the token.

    API Gateway does not run the authorizer for a route that does not exist, so those requests have no claims even
    with a valid token; it answers them 403 (the route is checked too, for a stage whose gateway responses say 404).
    """
    if status in (401, 403) or urlsplit(url).path.endswith(NOT_FOUND_ROUTE):
        return None
    return caller.tenant_id


async def _run(plan: LoadTestPlan, on_progress: Callable[[int], None] | None) -> LoadTestReport:
    rng = random.Random(plan.seed)
    report = LoadTestReport()
    deadline = time.monotonic() + plan.duration_s if plan.duration_s is not None else None
    remaining = [plan.total]
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(plan.timeout_s)

    def take() -> bool:
        if report.interrupted:
            return False
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if remaining[0] is not None:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
        return True

    async def worker(client: httpx.AsyncClient) -> None:
        while take():
            url, caller = _next_request(plan, rng)
            headers = caller.headers()
            started = time.perf_counter()
            try:
                response = await client.get(url, headers=headers)
            except httpx.TransportError as exc:
                report.transport_errors[type(exc).__name__] += 1
            else:
                report.latencies_ms.append((time.perf_counter() - started) * 1000)
                report.status_counts[response.status_code] += 1
                tenant = _attributed_tenant(url, caller, response.status_code)
                report.answered_by_tenant[tenant] += 1
                if tenant is not None and response.status_code < BILLABLE_BELOW_STATUS:
                    report.billable_by_tenant[tenant] += 1
                request_id = response.headers.get("x-amzn-requestid")
                if request_id:
                    report.request_ids.append(request_id)
            if on_progress is not None:
                on_progress(1)

    # Ctrl-C stops sending but lets the requests in flight be answered: the gateway answers (and logs) them anyway,
    # so a report without them would fall short of what the lake counts. A second Ctrl-C stops at once.
    loop, main = asyncio.get_running_loop(), asyncio.current_task()
    graceful = threading.current_thread() is threading.main_thread() and main is not None

    def on_ctrl_c() -> None:
        if report.interrupted and main is not None:
            main.cancel()
        report.interrupted = True

    previous = signal.getsignal(signal.SIGINT)
    if graceful:
        loop.add_signal_handler(signal.SIGINT, on_ctrl_c)
    # One client (one keep-alive connection) per worker: a single shared pool serializes on its own bookkeeping.
    clients = [httpx.AsyncClient(limits=limits, timeout=timeout) for _ in range(plan.concurrency)]
    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(client) for client in clients))
    except asyncio.CancelledError:
        # Cancelled (a second Ctrl-C): what was answered so far is still the caller's to report.
        report.interrupted = True
    finally:
        if graceful:
            # Back to what handled Ctrl-C before (asyncio.run's, then KeyboardInterrupt) for what runs after.
            loop.remove_signal_handler(signal.SIGINT)
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        await asyncio.gather(*(client.aclose() for client in clients))
    report.duration_s = time.perf_counter() - started
    if report.answered == 0 and report.transport_errors:
        kinds = ", ".join(f"{k} x{v}" for k, v in report.transport_errors.items())
        raise LoadTestError(f"{plan.invoke_url} could not be reached ({kinds})")
    return report


def run_load_test(plan: LoadTestPlan, *, on_progress: Callable[[int], None] | None = None) -> LoadTestReport:
    """Send the plan's requests with ``plan.concurrency`` connections and report what was answered.

    Ctrl-C (SIGINT, in the main thread) stops sending, waits for the requests in flight and returns the report so
    far, marked ``interrupted``; a second Ctrl-C stops without waiting.

    Raises:
        LoadTestError: nothing could be sent at all (every request failed at the transport level).
    """
    return asyncio.run(_run(plan, on_progress))


def summary_lines(report: LoadTestReport) -> Sequence[str]:
    """Human-readable summary: rps, latency percentiles, status counts, transport errors."""
    lines = [
        f"answered {report.answered} requests in {report.duration_s:.2f} s ({report.requests_per_s:,.0f} req/s)",
        "latency ms: " + ", ".join(f"p{int(q * 100)} {report.latency_percentile(q):.1f}" for q in (0.5, 0.95, 0.99)),
        "status: " + ", ".join(f"{code} x{n}" for code, n in sorted(report.status_counts.items())),
    ]
    if report.interrupted:
        lines.append("interrupted: the figures above cover the requests answered before Ctrl-C")
    if report.transport_errors:
        lines.append("not answered: " + ", ".join(f"{k} x{v}" for k, v in report.transport_errors.items()))
    return lines


def report_document(report: LoadTestReport) -> dict[str, object]:
    """The report as one JSON-ready document (``meterlake load-test --format json``): the summary's figures, and
    what was answered and billable per tenant (``null`` keys the requests without one)."""
    return {
        "answered": report.answered,
        "succeeded": report.succeeded,
        "duration_s": round(report.duration_s, 3),
        "requests_per_s": round(report.requests_per_s, 1),
        "latency_ms": {f"p{int(q * 100)}": round(report.latency_percentile(q), 2) for q in (0.5, 0.95, 0.99)},
        "status": {str(code): n for code, n in sorted(report.status_counts.items())},
        "not_answered": dict(report.transport_errors),
        "answered_by_tenant": {str(t) if t is not None else "null": n for t, n in report.answered_by_tenant.items()},
        "billable_by_tenant": {str(t) if t is not None else "null": n for t, n in report.billable_by_tenant.items()},
        "interrupted": report.interrupted,
    }
