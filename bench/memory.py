"""Peak memory of a process and its children, sampled from a process of its own.

Sampling in the measured process cost it: a sampler thread there took the interpreter lock from the threads being
timed (psutil parses /proc in Python), and ``meterlake serve`` driven by the benchmark's own event loop answered
~20-35% fewer records/s with it. This module imports nothing but psutil (and bench, which imports meterlake lazily),
so the sampler starts in a moment.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import psutil


def _children_bytes(children: list[psutil.Process]) -> int:
    """The children's USS: the memory only each maps (the pages they share with the process, the interpreter's and
    libraries', are the same files the process maps, counted once in its RSS)."""
    total = 0
    for child in children:
        try:
            total += child.memory_full_info().uss
        except psutil.Error:  # the child ended since it was listed
            continue
    return total


def _sample(pid: int, period: float, children_period: float) -> int:
    """Sample until a line (or EOF) arrives on stdin; the peak in bytes: the process's RSS every ``period`` seconds
    plus its children's USS, read every ``children_period`` seconds (reading it costs the kernel a walk of each
    child's pages)."""
    process = psutil.Process(pid)
    peak = children_bytes = 0
    read_at = -children_period
    try:
        while True:
            if time.monotonic() - read_at >= children_period:
                children_bytes = _children_bytes(process.children(recursive=True))
                read_at = time.monotonic()
            peak = max(peak, process.memory_info().rss + children_bytes)
            if select.select([sys.stdin], [], [], period)[0]:
                break
        peak = max(peak, process.memory_info().rss + _children_bytes(process.children(recursive=True)))
    except psutil.NoSuchProcess:  # it exited (its last samples were taken while it committed the rest)
        pass
    return peak


class PeakMemory:
    """Samples the memory of a process (this one by default) and its children from a sampling process and keeps the
    peak (see :func:`_sample`). Sampling ends at :meth:`stop` or when the process exits."""

    def __init__(self, pid: int | None = None, period: float = 0.05, children_period: float = 0.25) -> None:
        watched = os.getpid() if pid is None else pid
        self._sampler = subprocess.Popen(
            [sys.executable, "-m", "bench.memory", str(watched), str(period), str(children_period)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        out, _ = self._sampler.communicate("stop\n", timeout=60)
        return int(out)


if __name__ == "__main__":
    print(_sample(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])))
