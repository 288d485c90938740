"""Ctrl-C during `meterlake demo` (issue 13, defect 6): the run stops with a partial summary that reconciles exactly
(the requests in flight are waited for), never a traceback.

(`load-test` is covered against a running `up` in tests/meterlake/local/test_port_trap.py.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _spooled_bytes(home: Path) -> int:
    return sum(segment.stat().st_size for segment in (home / "spool").glob("*.seg"))


def test_ctrl_c_during_the_demo_prints_what_was_answered_and_reconciles_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    demo = subprocess.Popen(
        [sys.executable, "-c", "from meterlake.cli import main; main()", "demo", "--requests", "1000000"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "METERLAKE_HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Under way: the gateway's spool grows with the load test's access-log lines.
        deadline = time.monotonic() + 120
        while _spooled_bytes(home) < 4096:
            assert demo.poll() is None, demo.communicate()
            assert time.monotonic() < deadline, "the demo sent nothing"
            time.sleep(0.05)
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode != 0, out
    assert "Traceback" not in err, err
    # The load test's figures so far, then the demo commits, queries and reconciles what was answered.
    assert "interrupted: the figures above cover the requests answered before Ctrl-C" in out, out
    assert "interrupted: committing and reconciling the requests answered so far" in out
    assert "events committed to Iceberg" in out
    assert "Data kept in" in out
    # The requests in flight at Ctrl-C were answered and counted on both sides: every line reconciles exactly.
    lines = [line for line in out.split("\nreconciliation", 1)[1].splitlines()[1:] if "==" in line]
    assert len(lines) >= 4, out
    assert all(line.rstrip().endswith("OK") for line in lines), out
