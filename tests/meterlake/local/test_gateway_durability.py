"""Answered == metered through the real local pipeline: hostile requests and SIGKILL lose no answered request.

Both tests count what the client fully received (a response with its ``x-amzn-RequestId``) against what Iceberg
committed, never what the gateway says it acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from meterlake.config import Config
from meterlake.embedded.stack import LocalStack
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.local.auth import for_config
from tests.conftest import FaultReport

CONFIG = Config()


def _committed_request_ids(data_dir: DataDir) -> list[str]:
    table = ensure_metering_table(open_catalog(data_dir), CONFIG)
    ids: list[str] = table.scan(selected_fields=("request_id",)).to_arrow().column("request_id").to_pylist()
    return ids


def test_a_5_mb_header_request_does_not_stop_metering_the_300_after_it(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    """Issue 10 item 1: the hostile request is refused (431) and logged; every later request is metered."""
    data_dir = DataDir.resolve(tmp_path)
    with LocalStack(config=CONFIG, data_dir=data_dir, port=0) as stack:
        url = f"{stack.gateway.invoke_url}/random/strings"
        token = stack.gateway.user_pool.issue_id_token(user="alice", tenant_id="acme")
        with httpx.Client(timeout=30) as client:
            hostile = client.get(url, headers={"User-Agent": "u" * 5_000_000})
            answered = [client.get(url, headers={"Authorization": token}) for _ in range(300)]
        settled = stack.settle()
    answered_ids = [r.headers["x-amzn-RequestId"] for r in [hostile, *answered]]
    committed = _committed_request_ids(data_dir)
    fault_report(
        "5 MB header, then 300 requests (gateway)",
        answered=len(answered_ids),
        committed=len(set(committed)),
        lost=len(set(answered_ids) - set(committed)),
        duplicated=len(committed) - len(set(committed)),
    )
    assert hostile.status_code == 431
    assert [r.status_code for r in answered] == [200] * 300
    rows = ensure_metering_table(open_catalog(data_dir), CONFIG).scan().to_arrow().to_pylist()
    by_id = {row["request_id"]: row for row in rows}
    assert {r.headers["x-amzn-RequestId"] for r in answered} <= by_id.keys()
    assert Counter(row["tenant_id"] for row in rows) == Counter({"acme": 300, None: 1})
    refused = by_id[hostile.headers["x-amzn-RequestId"]]
    assert (refused["status"], refused["tenant_id"]) == (431, None)
    assert settled.flush.ok_written == 301


# -- SIGKILL of `meterlake up` under load --------------------------------------------------------------------------


def _start_up(home: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-c", "from meterlake.cli import main; main()", "--home", str(home), "up", "--port", "0"],
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline().split()
    assert first[:1] == ["RestApiEndpoint"], first
    return process, first[1]


async def _load_until_killed(
    url: str, token: str, process: subprocess.Popen[str], *, kill_after_s: float, concurrency: int = 16
) -> list[str]:
    """Request until the server dies; return the request ids of the responses the client received whole."""
    answered: list[str] = []
    started = time.monotonic()

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                try:
                    response = await http.get(url, headers={"Authorization": token})
                except httpx.TransportError:
                    return  # the server is gone
                assert response.status_code == 200, response.text
                answered.append(response.headers["x-amzn-RequestId"])

    async def killer() -> None:
        while time.monotonic() - started < kill_after_s or len(answered) < 50:
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGKILL)

    await asyncio.gather(killer(), *(worker() for _ in range(concurrency)))
    return answered


@pytest.mark.slow
def test_sigkill_under_load_loses_no_answered_request_and_repeats_none(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    """Issue 10 item 4: every response a client received whole is committed after `meterlake flush`, once."""
    home = tmp_path / "home"
    home.mkdir()
    data_dir = DataDir.resolve(home)
    answered: list[str] = []
    for run in range(3):
        process, invoke_url = _start_up(home)
        try:
            port = int(invoke_url.rsplit(":", 1)[1].split("/", 1)[0])
            token = for_config(CONFIG, data_dir, port=port).issue_id_token(user="load", tenant_id="t-kill")
            answered += asyncio.run(
                _load_until_killed(f"{invoke_url}/random/strings", token, process, kill_after_s=0.4 + 0.3 * run)
            )
        finally:
            process.kill()
            process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
        flushed = subprocess.run(
            [sys.executable, "-c", "from meterlake.cli import main; main()", "--home", str(home), "flush"],
            cwd=home,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert flushed.returncode == 0, flushed.stderr
    committed = _committed_request_ids(data_dir)
    duplicated = [request_id for request_id, n in Counter(committed).items() if n > 1]
    missing = set(answered) - set(committed)
    fault_report(
        "SIGKILL of up under load, 3 times (gateway)",
        answered=len(answered),
        committed=len(set(committed)),
        lost=len(missing),
        duplicated=len(committed) - len(set(committed)),
    )
    assert len(answered) == len(set(answered)) > 150
    assert (len(missing), len(duplicated)) == (0, 0), f"{len(answered)} answered: missing {sorted(missing)[:5]}"


# -- a full disk under the gateway ---------------------------------------------------------------------------------

#: Serves the API over the real delivery stream, makes 5 requests, fills the disk (RLIMIT_FSIZE at the spool
#: segment's size, SIGXFSZ ignored: appends fail with EFBIG as on a full disk), makes 5 more, frees it, makes 5
#: more, and closes the stream (which commits). Prints every answer and the writer's counts.
_FULL_DISK_SCRIPT = """
import json, logging, resource, signal, sys
from pathlib import Path
import httpx
from meterlake.config import Config
from meterlake.local.gateway import GatewayServer
from meterlake.lake.home import DataDir
from meterlake.local.stream import DeliveryStream

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
data_dir = DataDir.resolve(Path(sys.argv[1]))
stream = DeliveryStream(config=Config(), data_dir=data_dir)
answers = []
with GatewayServer(config=Config(), data_dir=data_dir, access_log=stream, port=0) as gateway:
    token = gateway.user_pool.issue_id_token(user="user", tenant_id="acme")
    def call(phase):
        answer = httpx.get(gateway.invoke_url + "/random/strings", headers={"Authorization": token}, timeout=10)
        answers.append({"phase": phase, "status": answer.status_code, "request_id": answer.headers["x-amzn-RequestId"]})
    for _ in range(5):
        call("before")
    segment = max(data_dir.spool.glob("*.seg"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size, hard))
    for _ in range(5):
        call("disk full")
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    for _ in range(5):
        call("space back")
    gateway.drain(10)
    stats = gateway.access_log_stats()
stream.close()
print(json.dumps({"answers": answers, "delivered": stats.delivered, "not_durable": stats.not_durable}))
"""


def test_a_full_disk_answers_503_never_a_success_it_cannot_meter_and_recovers(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    """Issue 10 items 2 and 4: while the spool cannot grow, no request is answered with a success."""
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
        timeout=120,
        check=True,
    )
    outcome = json.loads(done.stdout.splitlines()[-1])
    answers = outcome["answers"]
    assert [(a["phase"], a["status"]) for a in answers] == [
        *[("before", 200)] * 5,
        *[("disk full", 503)] * 5,
        *[("space back", 200)] * 5,
    ]
    assert (outcome["delivered"], outcome["not_durable"]) == (15, 5)  # the 503s' own lines once space was back
    assert "access-log sink failed" in done.stderr
    assert "answering 503 until it accepts lines again" in done.stderr
    assert "5 answers so far were withheld (503)" in done.stderr
    rows = ensure_metering_table(open_catalog(DataDir.resolve(tmp_path)), CONFIG).scan().to_arrow().to_pylist()
    committed = Counter((row["request_id"], row["status"]) for row in rows)
    committed_ids = {request_id for request_id, _ in committed}
    fault_report(
        "full disk under the gateway (503 meanwhile)",
        answered=len(answers),
        committed=len(committed_ids),
        lost=len({a["request_id"] for a in answers} - committed_ids),
        duplicated=sum(committed.values()) - len(committed_ids),
    )
    assert committed == Counter((a["request_id"], a["status"]) for a in answers)
