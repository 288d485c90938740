"""What every test package shares: the fault-injection report printed at the end of `make test`.

Each fault test (tests/meterlake/local/test_stream_faults.py, test_gateway_durability.py, amberflo/test_outbox.py,
...) records what it measured with the ``fault_report`` fixture; the session ends with one table of every fault:
requests (or records) answered, events committed, lost and duplicated. A row with any loss fails its own test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

_FAULTS = pytest.StashKey[list["FaultRow"]]()


@dataclass(frozen=True, slots=True)
class FaultRow:
    """One fault and what the pipeline did under it."""

    fault: str
    answered: int
    committed: int
    lost: int
    duplicated: int


FaultReport = Callable[..., None]


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> FaultReport:
    """``fault_report(fault, answered=, committed=, lost=, duplicated=)`` adds a row to the session's fault table."""
    rows = request.config.stash.setdefault(_FAULTS, [])

    def record(fault: str, *, answered: int, committed: int, lost: int, duplicated: int) -> None:
        rows.append(FaultRow(fault, answered, committed, lost, duplicated))

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print the fault table after the test summary (``make test`` shows it on every run)."""
    rows = config.stash.get(_FAULTS, [])
    if not rows:
        return
    width = max(len(row.fault) for row in rows)
    terminalreporter.section("fault injection: nothing answered may be lost or counted twice")
    terminalreporter.line(f"{'fault':<{width}}  {'answered':>9}  {'committed':>9}  {'lost':>5}  {'duplicated':>10}")
    for row in rows:
        terminalreporter.line(
            f"{row.fault:<{width}}  {row.answered:>9}  {row.committed:>9}  {row.lost:>5}  {row.duplicated:>10}"
        )
