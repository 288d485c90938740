"""Test helpers: the real ``meterlake`` command line in a child process, optionally on a read-only data dir or under
a file-size limit (what a full disk looks like to the writer, without root or a small filesystem)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

#: Remount ``$0`` read-only in a private mount namespace, then run the command: nothing outside the child sees it.
_READ_ONLY_BIND = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def meterlake(
    *args: str,
    cwd: Path,
    home: Path | None = None,
    read_only: Path | None = None,
    file_size_limit: int | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``meterlake ARGS`` in ``cwd`` with ``$METERLAKE_HOME`` = ``home`` (default ``cwd/home``).

    ``read_only`` is a directory the child sees read-only (see :func:`read_only_prefix`); ``file_size_limit`` sets
    RLIMIT_FSIZE in the child with SIGXFSZ ignored, so a write past it fails with EFBIG instead of killing it.
    """
    command = [sys.executable, "-c", "from meterlake.cli import main; main()", *args]
    if read_only is not None:
        command = [*read_only_prefix(read_only), *command]
    preexec: Callable[[], None] | None = None
    if file_size_limit is not None:
        limit = file_size_limit

        def preexec() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
        env={
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "METERLAKE_HOME": str(home or cwd / "home"),
            "PYTHONDONTWRITEBYTECODE": "1",
        },
    )


def read_only_prefix(directory: Path) -> list[str]:
    """A command prefix that runs what follows with ``directory`` bind-mounted read-only over itself.

    A private mount namespace (``unshare``) works as root, where chmod would not stop writes, and for other users
    through a user namespace. Skips the test where neither is allowed.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    namespace = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    prefix = [unshare, *namespace, "--propagation", "private", "sh", "-c", _READ_ONLY_BIND, str(directory)]
    probe = subprocess.run([*prefix, "sh", "-c", f'! touch "{directory}/.probe" 2>/dev/null'], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount {directory} read-only here: {probe.stderr.decode().strip()}")
    return prefix


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Assert the command failed with exactly one ``error:`` line on stderr and no traceback; return that line."""
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]
