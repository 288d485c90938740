"""The forwarder against the local Amberflo: gzip and key, retries of every transient fault, refused records isolated,
a refused key, dead letters, bounds."""

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
    KeyRefused,
    RecordsRefused,
    SendOutcome,
    Sent,
    encode_batch,
    environment_proxy,
    host_header,
    parse_retry_after,
    split_refused,
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
        stats = forwarder.stats()
    assert server.accepted_unique_ids() == {f"api-calls:r{n}" for n in range(100)}
    stored = server.records()[0]
    assert (stored.customer_id, stored.meter_time_in_millis, dict(stored.dimensions)) == (
        "t0",
        T0,
        {"resource_path": "/a"},
    )
    assert (stats.sent_records, stats.dead_batches, stats.retries_total) == (100, 0, 0)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_stops_the_run_and_refuses_no_record(status: int) -> None:
    """401/403 say the key is wrong, not the records: nothing is dead, and no further batch is started."""
    batches = [(i, encode_batch(records(i * 10, 10))) for i in range(50)]
    outcomes: list[SendOutcome] = []
    with (
        LocalAmberflo(api_key="the-right-key", key_refusal_status=status) as server,  # type: ignore[arg-type]
        Forwarder(quick_settings(server, concurrency=2)) as forwarder,
    ):
        complete = forwarder.forward(batches, lambda _k, _b, outcome: outcomes.append(outcome), api_key=API_KEY)
        stats = forwarder.stats()
        unauthorized = server.stats().unauthorized_requests
    assert not complete
    assert outcomes
    assert all(isinstance(outcome, KeyRefused) and outcome.status == status for outcome in outcomes)
    assert len(outcomes) <= 2 * 2  # the batches in flight when the first refusal came back, no more
    assert unauthorized == len(outcomes)
    assert (stats.dead_batches, stats.dead_records, stats.key_refusals) == (0, 0, len(outcomes))


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


def test_a_record_refused_by_name_is_isolated_and_the_rest_of_its_batch_accepted(server: LocalAmberflo) -> None:
    server.faults = FaultPlan(reject_unique_ids=frozenset({"api-calls:r250"}))
    batches = [(i, encode_batch(records(i * 100, 100))) for i in range(5)]
    outcomes: dict[int, SendOutcome] = {}

    def on_outcome(key: int, batch: EncodedBatch, outcome: SendOutcome) -> None:
        outcomes[key] = outcome

    with Forwarder(quick_settings(server)) as forwarder:
        complete = forwarder.forward(batches, on_outcome, api_key=API_KEY)
        stats = forwarder.stats()
    assert complete
    split = outcomes.pop(2)
    assert isinstance(split, RecordsRefused)
    (refused,) = split.refused
    assert (refused.index, refused.record["uniqueId"], refused.status) == (50, "api-calls:r250", 400)
    assert "api-calls:r250" in refused.body
    # The answer names the record: the batch, the 99 others together, then the named one alone.
    assert split.attempts == 3
    assert all(isinstance(outcome, Sent) for outcome in outcomes.values())
    assert server.accepted_unique_ids() == {f"api-calls:r{n}" for n in range(500)} - {"api-calls:r250"}
    assert (stats.sent_records, stats.dead_batches, stats.dead_records, stats.split_batches) == (499, 0, 1, 1)


def test_one_invalid_record_per_batch_is_isolated_by_halving_when_the_answer_names_none(
    server: LocalAmberflo,
) -> None:
    """The local Amberflo refuses customerId "" as Amberflo does, naming the record's place, not its uniqueId."""
    bad_places = {0: [0], 1: [37], 2: [50], 3: [99], 4: [3, 96], 5: list(range(100))}
    batches = []
    for key, places in bad_places.items():
        batch = records(key * 100, 100)
        for place in places:
            batch[place]["customerId"] = ""
        batches.append((key, encode_batch(batch)))
    outcomes: dict[int, SendOutcome] = {}

    def on_outcome(key: int, batch: EncodedBatch, outcome: SendOutcome) -> None:
        outcomes[key] = outcome

    with Forwarder(quick_settings(server)) as forwarder:
        assert forwarder.forward(batches, on_outcome, api_key=API_KEY)
        stats = forwarder.stats()
    for key, places in bad_places.items():
        outcome = outcomes[key]
        assert isinstance(outcome, RecordsRefused)
        assert [item.index for item in outcome.refused] == places
        assert all(
            item.status == 400 and "customerId must be a non-empty string" in item.body for item in outcome.refused
        )
        assert all(item.record["uniqueId"] == f"api-calls:r{key * 100 + item.index}" for item in outcome.refused)
        if len(places) == 1:
            assert outcome.attempts <= 1 + 2 * 7  # one halving per level, down to one of 100
    good = {f"api-calls:r{key * 100 + n}" for key, places in bad_places.items() for n in range(100) if n not in places}
    assert server.accepted_unique_ids() == good
    dead = sum(len(places) for places in bad_places.values())
    assert (stats.sent_records, stats.dead_records, stats.split_batches) == (600 - dead, dead, 6)


def test_a_refusal_no_record_explains_dead_letters_the_batch_without_splitting_it(server: LocalAmberflo) -> None:
    settings = quick_settings(server, base_url=f"{server.url}/no-such-stage")  # a wrong URL: 404
    with Forwarder(settings) as forwarder:
        outcome = forwarder.send_batch(encode_batch(records(0, 100)), api_key=API_KEY)
        stats = forwarder.stats()
    assert isinstance(outcome, DeadLetter)
    assert (outcome.status, outcome.attempts) == (404, 1)
    assert (stats.requests, stats.dead_records, stats.split_batches) == (1, 100, 0)


def test_split_refused_tries_named_records_alone_and_halves_otherwise() -> None:
    batch = records(0, 8)
    everything = list(range(8))
    assert split_refused(everything, batch, "bad: api-calls:r5, api-calls:r2") == [[0, 1, 3, 4, 6, 7], [2], [5]]
    assert split_refused(everything, batch, "record 5: customerId must be a non-empty string") == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]
    # Naming every record says nothing: halve. A part of one record is never split (the caller stops there).
    named_all = " ".join(f"api-calls:r{n}" for n in range(8))
    assert split_refused(everything, batch, named_all) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_refused([4, 5, 6], batch, "api-calls:r6") == [[4, 5], [6]]


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
