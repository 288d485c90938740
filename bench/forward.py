"""Forwarding throughput: meterlake's Forwarder against Amberflo's Python SDK, side by side, with and without faults.

Both senders push the same Amberflo records (from :func:`meterlake.meters.meter_records` over generated events, with
deterministic uniqueIds) to the same local Amberflo (:class:`LocalAmberflo`), reset before every run so each one
starts from an empty store and the same seeded fault draws.

- meterlake: :class:`Forwarder` with the project's :class:`AmberfloSettings` (100 records per batch, gzip) and
  ``concurrency`` :data:`CONCURRENCY`; the clock covers encoding every batch and sending it until answered.
- SDK: ``metering.create_ingest_client(api_key=...)`` (a ``ThreadedProducer``: 2 consumer threads, 100 records per
  batch, 6 retries with 2-80 s backoff, records dropped when the retries end), ``IngestSession.root_url`` pointed at
  the local server; every record is enqueued with ``send`` and the clock stops when ``flush()`` returns (every
  record consumed: sent or dropped). Its consumer threads are joined off the clock.

The local Amberflo runs in a child process, so the server's work does not share the senders' GIL (as the real
Amberflo would not). Loss is what the SERVER did not store: expected uniqueIds minus ``accepted_unique_ids()``.
Throughput is records DELIVERED (stored by the server) per second, the only records that bill; the records handed
to each sender per second ("offered") are printed beside it. The SDK drops what its 100,000-record queue cannot hold:
handed 200,000 records at once, it delivers about half of them.

Scenarios: no faults (200,000 records a run, so a run lasts seconds); 20% transient faults (429 with Retry-After,
500, 503, connection reset; no "slow" faults, which the SDK, having no timeouts, would just wait out); and, for
information, every answer 25 ms late, as a remote Amberflo's round trip. Without latency both senders share this
machine's two cores with the local server, whose one event-loop thread spends ~0.3 ms of CPU per 100-record request,
so the figures measure the senders' client CPU per batch: meterlake ~0.4 ms (encoding included), the SDK ~1.8 ms.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import random
import statistics
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from meterlake.amberflo.forwarder import DeadLetter, EncodedBatch, Forwarder, GaveUp, SendOutcome, Sent, encode_batch
from meterlake.amberflo.server import FaultKind, FaultPlan, LocalAmberflo, ServerStats
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.meters import DEFAULT_METERS, meter_records

TARGET_SPEEDUP = 3.0
#: Records per run in a quick run (a full run's are per scenario, see SCENARIOS).
QUICK_RECORDS = 10_000
#: Repetitions of each scenario in a quick run (a full run's are per scenario, see SCENARIOS).
QUICK_REPEATS = 2
#: Requests meterlake keeps in flight: the config's default.
CONCURRENCY = AmberfloSettings().concurrency
API_KEY = "bench-forward-key"
#: Transient faults only: no "slow" fault, which the SDK (no timeouts) would simply wait out.
FAULT_KINDS: tuple[FaultKind, ...] = ("429", "500", "503", "reset")
FAULTS = FaultPlan(transient_rate=0.2, kinds=FAULT_KINDS, retry_after_s=1, seed=11)
NO_FAULTS = FaultPlan(seed=11)
#: Every request answered 25 ms late (and stored): the round trip to a remote Amberflo, which the local one lacks.
LATENCY = FaultPlan(transient_rate=1.0, kinds=("slow",), slow_s=0.025, slow_then_ingest=True, seed=11)
_SDK_LOGGERS = ("metering", "backoff")


# -- records --------------------------------------------------------------------------------------------------------


def build_records(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` Amberflo records of the default meters over generated events (deterministic uniqueIds)."""
    rng = random.Random(seed)
    events = count // 2 + count // 10 + 16  # two meters; ~5% of events (status >= 500) make no record
    paths = ["/random/strings", "/random/numbers", "/random/uuids", "/health"]
    start_us = 1_764_000_000_000_000
    table = pa.table(
        {
            "tenant_id": pa.array([f"tenant-{rng.randrange(50):03d}" for _ in range(events)], pa.string()),
            "request_id": pa.array([str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(events)]),
            "request_time": pa.array([start_us + i * 37_000 for i in range(events)], pa.timestamp("us", tz="UTC")),
            "status": pa.array([rng.choice([200] * 18 + [404, 500]) for _ in range(events)], pa.int32()),
            "response_length": pa.array([rng.randrange(20, 4000) for _ in range(events)], pa.int64()),
            "resource_path": pa.array([rng.choice(paths) for _ in range(events)], pa.string()),
            "http_method": pa.array([rng.choice(["GET"] * 8 + ["POST", "OPTIONS"]) for _ in range(events)]),
        }
    )
    records = list(meter_records(table, DEFAULT_METERS).records())
    if len(records) < count:
        raise RuntimeError(f"generated {len(records)} records, wanted {count}")
    return records[:count]


# -- the local Amberflo, in a child process --------------------------------------------------------------------------


def _serve(conn: multiprocessing.connection.Connection, api_key: str) -> None:
    """Child process: serve a LocalAmberflo and answer commands from the parent until told to close."""
    with LocalAmberflo(api_key=api_key) as server:
        conn.send(server.url)
        while True:
            command, argument = conn.recv()
            if command == "reset":
                server.faults = argument
                server.reset()
                conn.send(None)
            elif command == "accepted":
                conn.send(server.accepted_unique_ids())
            elif command == "stats":
                conn.send(server.stats())
            else:
                conn.send(None)
                return


class ServerProcess:
    """A :class:`LocalAmberflo` in a spawned child process, driven over a pipe."""

    def __init__(self, api_key: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, api_key), name="local-amberflo", daemon=True)
        self._process.start()
        child.close()
        self.url: str = self._conn.recv()

    def _call(self, command: str, argument: object = None) -> Any:
        self._conn.send((command, argument))
        return self._conn.recv()

    def reset(self, plan: FaultPlan) -> None:
        """Forget every event and counter and restart the fault draws under ``plan``."""
        self._call("reset", plan)

    def accepted_unique_ids(self) -> set[str]:
        """The uniqueIds the server stored."""
        ids: set[str] = self._call("accepted")
        return ids

    def stats(self) -> ServerStats:
        """The server's counters."""
        stats: ServerStats = self._call("stats")
        return stats

    def close(self) -> None:
        """Stop the server and its process."""
        with contextlib.suppress(OSError, EOFError):
            self._call("close")
        self._process.join(15)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# -- the two senders -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """One sender's run: how long it took and what the server ended up storing."""

    sender: str
    seconds: float
    records: int
    lost: int
    #: The sender's own count of records it sent, or dropped / left unsent.
    reported_sent: int
    reported_dropped: int
    requests: int
    faults: int

    @property
    def rate(self) -> float:
        """Records delivered (stored by the server) per second: what reaches Amberflo is what counts."""
        return (self.records - self.lost) / self.seconds

    @property
    def offered_rate(self) -> float:
        """Records handed to the sender per second, delivered or not."""
        return self.records / self.seconds


def _batches(records: Sequence[dict[str, Any]], size: int) -> Iterator[tuple[int, EncodedBatch]]:
    for start in range(0, len(records), size):
        yield start, encode_batch(records[start : start + size])


def run_meterlake(server: ServerProcess, records: Sequence[dict[str, Any]], plan: FaultPlan) -> RunResult:
    """Send ``records`` with meterlake's Forwarder (encoding included) and count what the server stored."""
    server.reset(plan)
    settings = AmberfloSettings(base_url=server.url, concurrency=CONCURRENCY)
    sent = unsent = 0

    def on_outcome(_key: int, batch: EncodedBatch, outcome: SendOutcome) -> None:
        nonlocal sent, unsent
        if isinstance(outcome, Sent):
            sent += batch.records
        elif isinstance(outcome, DeadLetter | GaveUp):
            unsent += batch.records

    started = time.perf_counter()
    with Forwarder(settings, rng=random.Random(5)) as forwarder:
        forwarder.forward(_batches(records, settings.batch_size), on_outcome, api_key=API_KEY)
    seconds = time.perf_counter() - started
    return _result("meterlake", server, records, seconds, sent, unsent)


def run_sdk(server: ServerProcess, records: Sequence[dict[str, Any]], plan: FaultPlan) -> RunResult:
    """Send ``records`` with Amberflo's SDK (its threaded ingest client, defaults) and count what the server stored."""
    import metering  # type: ignore[import-untyped]
    from metering.session.ingest_session import IngestSession  # type: ignore[import-untyped]

    server.reset(plan)
    dropped = 0
    lock = threading.Lock()

    def on_error(_error: BaseException, batch: list[Any]) -> None:
        nonlocal dropped
        with lock:
            dropped += len(batch)

    original_root: str = IngestSession.root_url
    IngestSession.root_url = server.url
    try:
        started = time.perf_counter()
        client: Any = metering.create_ingest_client(api_key=API_KEY, on_error=on_error)
        refused = sum(1 for record in records if not client.send(record))
        client.flush()
        seconds = time.perf_counter() - started
        client.join()
    finally:
        IngestSession.root_url = original_root
    lost_locally = dropped + refused
    return _result("sdk", server, records, seconds, len(records) - lost_locally, lost_locally)


def _result(
    sender: str, server: ServerProcess, records: Sequence[dict[str, Any]], seconds: float, sent: int, unsent: int
) -> RunResult:
    expected = {record["uniqueId"] for record in records}
    accepted = server.accepted_unique_ids()
    stats = server.stats()
    return RunResult(
        sender=sender,
        seconds=seconds,
        records=len(records),
        lost=len(expected - accepted),
        reported_sent=sent,
        reported_dropped=unsent,
        requests=stats.ingest_requests,
        faults=sum(stats.faults_injected.values()),
    )


@contextlib.contextmanager
def _quiet_sdk() -> Iterator[None]:
    """Keep the SDK's per-failure error logs (one per faulted request) out of the report."""
    loggers = [logging.getLogger(name) for name in _SDK_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# -- the benchmark ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One server behaviour both senders meet: its figure prefix, fault plan, records and repetitions (full run)."""

    key: str
    title: str
    plan: FaultPlan
    repeats: int
    #: Records per run: enough that a run lasts seconds, not a fraction of one (start-up is then noise, not signal).
    records: int
    #: Whether its speedup is held to :data:`TARGET_SPEEDUP` (the latency scenario is for information).
    targeted: bool = True


SCENARIOS = (
    Scenario("", "no faults", NO_FAULTS, repeats=5, records=200_000),
    Scenario(
        "faults_",
        f"faults: {FAULTS.transient_rate:.0%} of requests ({', '.join(FAULTS.kinds)}, Retry-After "
        f"{FAULTS.retry_after_s} s)",
        FAULTS,
        repeats=2,
        records=50_000,
    ),
    Scenario(
        "latency_",
        f"latency: every answer {LATENCY.slow_s * 1e3:.0f} ms late, as a remote Amberflo (information, no target)",
        LATENCY,
        repeats=3,
        records=50_000,
        targeted=False,
    ),
)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _summary(label: str, runs: Sequence[RunResult]) -> str:
    rates = [run.rate for run in runs]
    return (
        f"  {label:<10} delivered best {max(rates):>9,.0f} rec/s, median {statistics.median(rates):>9,.0f} "
        f"(offered {statistics.median(run.offered_rate for run in runs):,.0f}/s; "
        f"{', '.join(f'{run.seconds:.2f}s' for run in runs)}); lost (worst run) {max(run.lost for run in runs):,}, "
        f"dropped by the sender {max(run.reported_dropped for run in runs):,}; "
        f"requests {statistics.median(run.requests for run in runs):,.0f}, "
        f"faults {statistics.median(run.faults for run in runs):,.0f}"
    )


def run(quick: bool = False) -> dict[str, object]:
    """Both senders, every scenario, interleaved; print and return records/s, speedups and loss."""
    counts = {s.key: QUICK_RECORDS if quick else s.records for s in SCENARIOS}
    records = build_records(max(counts.values()))
    results: dict[str, dict[str, list[RunResult]]] = {s.key: {"meterlake": [], "sdk": []} for s in SCENARIOS}
    print(
        f"forward: records of {len({r['meterApiName'] for r in records})} meters; meterlake Forwarder "
        f"concurrency {CONCURRENCY}, batch 100, gzip; SDK ThreadedProducer defaults (2 threads, batch 100, "
        f"6 retries); local Amberflo in a child process; runs alternate, order flipped each repetition"
    )
    with ServerProcess(API_KEY) as server, _quiet_sdk():
        for repeat in range(max(s.repeats for s in SCENARIOS)):
            for scenario in SCENARIOS:
                if repeat >= (QUICK_REPEATS if quick else scenario.repeats):
                    continue
                order = [run_meterlake, run_sdk] if repeat % 2 == 0 else [run_sdk, run_meterlake]
                for sender in order:
                    result = sender(server, records[: counts[scenario.key]], scenario.plan)
                    results[scenario.key][result.sender].append(result)
    figures: dict[str, object] = {"forward_concurrency": CONCURRENCY}
    speedups_met: list[bool] = []
    zero_loss: list[bool] = []
    for scenario in SCENARIOS:
        key = scenario.key
        ours, sdk = results[key]["meterlake"], results[key]["sdk"]
        ours_rates, sdk_rates = [r.rate for r in ours], [r.rate for r in sdk]
        speedup = max(ours_rates) / max(sdk_rates)
        median_speedup = statistics.median(ours_rates) / statistics.median(sdk_rates)
        ours_lost, sdk_lost = max(r.lost for r in ours), max(r.lost for r in sdk)
        print(f" {scenario.title}: {counts[key]:,} records a run")
        print(_summary("meterlake", ours))
        print(_summary("sdk", sdk))
        ok = speedup >= TARGET_SPEEDUP
        target = f"(target >= {TARGET_SPEEDUP}x)  {_verdict(ok)}" if scenario.targeted else "(no target)"
        print(f"  forward_{key}speedup  {speedup:.2f}x best, {median_speedup:.2f}x median  {target}")
        print(f"  forward_{key}meterlake_lost  {ours_lost}  (target 0)  {_verdict(ours_lost == 0)}")
        print(f"  forward_{key}sdk_lost  {sdk_lost}  (reported, no target)")
        if scenario.targeted:
            speedups_met.append(ok)
        zero_loss.append(ours_lost == 0)
        figures |= {
            f"forward_{key}records": counts[key],
            f"forward_{key}meterlake_records_per_s": round(max(ours_rates)),
            f"forward_{key}meterlake_records_per_s_median": round(statistics.median(ours_rates)),
            f"forward_{key}sdk_records_per_s": round(max(sdk_rates)),
            f"forward_{key}sdk_records_per_s_median": round(statistics.median(sdk_rates)),
            f"forward_{key}sdk_offered_records_per_s_median": round(statistics.median(r.offered_rate for r in sdk)),
            f"forward_{key}speedup": round(speedup, 2),
            f"forward_{key}speedup_median": round(median_speedup, 2),
            f"forward_{key}meterlake_lost": ours_lost,
            f"forward_{key}sdk_lost": sdk_lost,
        }
    figures["forward_speedup_met"] = all(speedups_met)
    figures["forward_zero_loss_met"] = all(zero_loss)
    return figures


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
