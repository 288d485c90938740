"""The forwarder against the local Amberflo: gzip and key, retries of every transient fault, dead letters, bounds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpcore
import pytest

from meterlake.amberflo.forwarder import (
    BatchTooLargeError,
    DeadLetter,
    EncodedBatch,
    Forwarder,
    ForwarderClosedError,
    GaveUp,
    SendOutcome,
    Sent,
    encode_batch,
    environment_proxy,
    host_header,
    parse_retry_after,
)
from meterlake.amberflo.server import FaultKind, FaultPlan, LocalAmberflo
from meterlake.amberflo.settings import AmberfloSettings
from tests.meterlake.amberflo.conftest import API_KEY, quick_settings

T0 = 1_764_000_000_000


def records(start: int, count: int) -> list[dict[str, Any]]:
    """Amberflo records with uniqueIds ``api-calls:r<n>``."""
    return [
        {
            "customerId": f"t{n % 3}",
            "meterApiName": "api-calls",
            "meterValue": 1,
            "meterTimeInMillis": T0 + n,
            "uniqueId": f"api-calls:r{n}",
            "dimensions": {"resource_path": "/a"},
        }
        for n in range(start, start + count)
    ]


def clear_faults_after(server: LocalAmberflo, requests: int) -> threading.Thread:
    """Switch faults off once the server has seen ``requests`` ingest requests."""

    def watch() -> None:
        deadline = time.monotonic() + 10
        while server.stats().ingest_requests < requests and time.monotonic() < deadline:
            time.sleep(0.002)
        server.faults = FaultPlan()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_gzip_body_and_api_key_arrive(server: LocalAmberflo) -> None:
    batch = encode_batch(records(0, 100))
    assert batch.body[:2] == b"\x1f\x8b"
    with Forwarder(quick_settings(server)) as forwarder:
        assert forwarder.send_batch(batch, api_key=API_KEY) == Sent(attempts=1)
        refused = forwarder.send_batch(batch, api_key="wrong-key")
        stats = forwarder.stats()
    assert server.accepted_unique_ids() == {f"api-calls:r{n}" for n in range(100)}
    stored = server.records()[0]
    assert (stored.customer_id, stored.meter_time_in_millis, dict(stored.dimensions)) == (
        "t0",
        T0,
        {"resource_path": "/a"},
    )
    assert isinstance(refused, DeadLetter)
    assert refused.status == 401
    assert "Unauthorized" in refused.body
    assert (stats.sent_records, stats.dead_batches, stats.retries_total) == (100, 1, 0)


def test_429_retry_after_is_honoured(server: LocalAmberflo) -> None:
    server.faults = FaultPlan(transient_rate=1.0, kinds=("429",), retry_after_s=1)
    watcher = clear_faults_after(server, 1)
    with Forwarder(quick_settings(server)) as forwarder:
        started = time.monotonic()
        outcome = forwarder.send_batch(encode_batch(records(0, 5)), api_key=API_KEY)
        waited = time.monotonic() - started
        stats = forwarder.stats()
    watcher.join()
    assert outcome == Sent(attempts=2)
    # Backoff alone would be below max_backoff_s (0.05 s): the wait is Retry-After's second.
    assert 1.0 <= waited < 2.0
    assert stats.retries == {"http_429": 1}
    assert len(server.accepted_unique_ids()) == 5


@pytest.mark.parametrize("kind", ["500", "503", "slow", "reset"])
def test_transient_faults_are_retried_until_sent(server: LocalAmberflo, kind: FaultKind) -> None:
    server.faults = FaultPlan(transient_rate=1.0, kinds=(kind,), slow_s=1.0)
    watcher = clear_faults_after(server, 2)
    with Forwarder(quick_settings(server)) as forwarder:
        outcome = forwarder.send_batch(encode_batch(records(0, 10)), api_key=API_KEY)
        stats = forwarder.stats()
    watcher.join()
    # At least the two faulted attempts; the watcher clears the faults from another thread, so a fast retry can
    # still meet one more.
    assert isinstance(outcome, Sent)
    assert outcome.attempts >= 3
    cause = {"500": "http_500", "503": "http_503", "slow": "timeout", "reset": "network"}[kind]
    assert stats.retries == {cause: outcome.attempts - 1}
    assert server.accepted_unique_ids() == {f"api-calls:r{n}" for n in range(10)}
    # Slow and reset faults stored the records before failing: the retries were exact duplicates, dropped.
    assert len(server.records()) == 10


def test_permanent_400_dead_letters_only_that_batch(server: LocalAmberflo) -> None:
    server.faults = FaultPlan(reject_unique_ids=frozenset({"api-calls:r250"}))
    batches = [(i, encode_batch(records(i * 100, 100))) for i in range(5)]
    outcomes: dict[int, SendOutcome] = {}

    def on_outcome(key: int, batch: EncodedBatch, outcome: SendOutcome) -> None:
        outcomes[key] = outcome

    with Forwarder(quick_settings(server)) as forwarder:
        complete = forwarder.forward(batches, on_outcome, api_key=API_KEY)
        stats = forwarder.stats()
    assert complete
    dead = outcomes.pop(2)
    assert isinstance(dead, DeadLetter)
    assert dead.status == 400
    assert "api-calls:r250" in dead.body
    assert dead.attempts == 1
    assert all(isinstance(outcome, Sent) for outcome in outcomes.values())
    expected = {f"api-calls:r{n}" for n in range(500) if not 200 <= n < 300}
    assert server.accepted_unique_ids() == expected
    assert (stats.sent_batches, stats.dead_batches, stats.dead_records) == (4, 1, 100)


def test_timeouts_bound_a_batch_that_never_succeeds(server: LocalAmberflo) -> None:
    server.faults = FaultPlan(transient_rate=1.0, kinds=("slow",), slow_s=5.0, slow_then_ingest=False)
    settings = quick_settings(server, read_timeout_s=0.2, give_up_after_s=1.0)
    with Forwarder(settings) as forwarder:
        started = time.monotonic()
        outcome = forwarder.send_batch(encode_batch(records(0, 3)), api_key=API_KEY)
        elapsed = time.monotonic() - started
    assert isinstance(outcome, GaveUp)
    assert "ReadTimeout" in outcome.last_error
    assert outcome.attempts >= 3
    # At most the budget plus one read timeout and a backoff step.
    assert elapsed < settings.give_up_after_s + settings.read_timeout_s + settings.max_backoff_s + 0.5
    assert server.accepted_unique_ids() == set()


def test_forward_stops_starting_batches_after_giving_up_and_on_halt(server: LocalAmberflo) -> None:
    server.faults = FaultPlan(transient_rate=1.0, kinds=("503",))
    batches = [(i, encode_batch(records(i * 10, 10))) for i in range(20)]
    answered: list[int] = []
    settings = quick_settings(server, concurrency=2, give_up_after_s=0.3)
    with Forwarder(settings) as forwarder:
        complete = forwarder.forward(batches, lambda key, batch, outcome: answered.append(key), api_key=API_KEY)
        assert not complete
        assert len(answered) <= 2 * settings.concurrency

        halt = threading.Event()
        threading.Timer(0.3, halt.set).start()
        started = time.monotonic()
        outcomes: list[SendOutcome] = []
        slow = quick_settings(server, concurrency=2, give_up_after_s=600)
        with Forwarder(slow) as patient:
            complete = patient.forward(batches, lambda k, b, o: outcomes.append(o), api_key=API_KEY, halt=halt)
        assert not complete
        assert time.monotonic() - started < 2.0
        assert outcomes
        assert all(isinstance(o, GaveUp) and "halted" in o.last_error for o in outcomes)


def test_an_error_in_on_outcome_stops_the_run_and_is_raised_after_the_batches_in_flight(
    server: LocalAmberflo,
) -> None:
    batches = [(i, encode_batch(records(i, 1))) for i in range(500)]
    pulled: list[int] = []

    def source() -> Iterator[tuple[int, EncodedBatch]]:
        for key, batch in batches:
            pulled.append(key)
            yield key, batch

    def full_store(_key: int, _batch: EncodedBatch, _outcome: SendOutcome) -> None:
        raise RuntimeError("the outbox is full")

    with Forwarder(quick_settings(server, concurrency=3)) as forwarder:
        with pytest.raises(RuntimeError, match="the outbox is full"):
            forwarder.forward(source(), full_store, api_key=API_KEY)
        stopped_at = len(pulled)
        time.sleep(0.2)
        assert len(pulled) == stopped_at < len(batches)
        # Every batch pulled was answered before forward() returned, and the forwarder still works afterwards.
        assert len(server.accepted_unique_ids()) == stopped_at
        answered: list[int] = []
        assert forwarder.forward(batches[:4], lambda key, _b, _o: answered.append(key), api_key=API_KEY)
        assert sorted(answered) == [0, 1, 2, 3]


def test_an_error_from_the_batches_is_raised_by_forward(server: LocalAmberflo) -> None:
    def broken() -> Iterator[tuple[int, EncodedBatch]]:
        yield 0, encode_batch(records(0, 5))
        raise ValueError("record 5 is not JSON")

    with Forwarder(quick_settings(server, concurrency=2)) as forwarder, pytest.raises(ValueError, match="not JSON"):
        forwarder.forward(broken(), lambda *_: None, api_key=API_KEY)
    assert len(server.accepted_unique_ids()) == 5


def test_a_stopped_run_ends_the_retries_in_flight_instead_of_spending_their_budget(server: LocalAmberflo) -> None:
    # Seed 27 at 90%: of the first 40 requests only the second is answered 200, so without the stop the three other
    # batches in flight would retry for tens of seconds.
    server.faults = FaultPlan(transient_rate=0.9, kinds=("503",), seed=27)
    batches = [(i, encode_batch(records(i * 10, 10))) for i in range(40)]

    def fail_on_first(_key: int, _batch: EncodedBatch, _outcome: SendOutcome) -> None:
        raise RuntimeError("cannot record the answer")

    settings = quick_settings(server, concurrency=4, give_up_after_s=600, min_backoff_s=0.5, max_backoff_s=1.0)
    with Forwarder(settings) as forwarder:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="cannot record"):
            forwarder.forward(batches, fail_on_first, api_key=API_KEY)
        assert time.monotonic() - started < 3.0
    assert server.stats().ingest_requests < 12


def test_a_closed_forwarder_refuses_work_and_closes_once() -> None:
    forwarder = Forwarder(AmberfloSettings(base_url="http://127.0.0.1:9"))
    forwarder.close()
    forwarder.close()
    with pytest.raises(ForwarderClosedError):
        forwarder.forward([(0, encode_batch(records(0, 1)))], lambda *_: None, api_key=API_KEY)
    with pytest.raises(ForwarderClosedError):
        forwarder.send_batch(encode_batch(records(0, 1)), api_key=API_KEY)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://app.amberflo.io/ingest", b"app.amberflo.io"),
        ("https://app.amberflo.io:443/ingest", b"app.amberflo.io"),
        ("http://127.0.0.1:8851/ingest", b"127.0.0.1:8851"),
        ("http://[::1]:8851/ingest", b"[::1]:8851"),
        ("http://[::1]/ingest", b"[::1]"),
    ],
)
def test_host_header_brackets_ipv6_and_omits_default_ports(url: str, expected: bytes) -> None:
    assert host_header(httpcore.URL(url)) == expected


def test_batches_above_100_records_are_refused() -> None:
    with pytest.raises(BatchTooLargeError, match="at most 100 records, got 101"):
        encode_batch(records(0, 101))
    assert encode_batch(records(0, 100)).decode() == records(0, 100)


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = parse_retry_after(format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True))
    assert later is not None
    assert 28 <= later <= 30
    assert parse_retry_after(format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)) == 0.0


def test_environment_proxy_follows_proxy_and_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert environment_proxy("https://app.amberflo.io/ingest") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert environment_proxy("https://app.amberflo.io/ingest") == "http://proxy.internal:3128"
    assert environment_proxy("http://app.amberflo.io/ingest") is None
    monkeypatch.setenv("NO_PROXY", "app.amberflo.io")
    assert environment_proxy("https://app.amberflo.io/ingest") is None
