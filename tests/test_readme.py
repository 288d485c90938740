"""README.md's local commands run as written (issue 13): each ``bash`` block above the AWS deployment section.

The blocks run as one bash script (``set -e``: the first command that exits non-zero fails the walk and is named)
in a temporary home and working directory, on a fresh data dir, with the checkout's cdk.context.json. The only
change to the text: the local gateway's port 8850 becomes a free one (and the metering service gets a free one too),
so the walk does not depend on those ports being free. A ``&`` command (``meterlake up``) runs in the background until
the block stops it; whatever is still running at the end is stopped and fails the walk.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Where the local part of the README ends: below it, commands need an AWS account.
AWS_HEADING = "\n## AWS deployment\n"
#: The local gateway's port as the README writes it (the config's default).
README_PORT = "8850"

pytestmark = pytest.mark.slow


def readme_local_bash_blocks() -> list[str]:
    """The ``bash`` fenced blocks of README.md above the AWS deployment section, in order."""
    text = PROJECT_ROOT.joinpath("README.md").read_text(encoding="utf-8")
    local, found, _ = text.partition(AWS_HEADING)
    assert found, f"README.md has no {AWS_HEADING.strip()!r} heading"
    return re.findall(r"^```bash\n(.*?)^```$", local, flags=re.DOTALL | re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_readmes_local_commands_run_as_written(tmp_path: Path) -> None:
    blocks = readme_local_bash_blocks()
    walked = "\n".join(blocks)
    # Not vacuous: the blocks cover running the stack, traffic, and queries.
    for command in ("meterlake up &", "meterlake token", "meterlake load-test", "meterlake query", "meterlake flush"):
        assert command in walked, f"README.md's local bash blocks no longer run {command!r}"

    gateway_port, service_port = _free_port(), _free_port()
    config = json.loads(PROJECT_ROOT.joinpath("cdk.context.json").read_text(encoding="utf-8"))
    config.setdefault("meterlake", {}).setdefault("local", {})["port"] = gateway_port
    config["meterlake"].setdefault("service", {})["port"] = service_port
    work = tmp_path / "work"
    work.mkdir()
    (work / "cdk.context.json").write_text(json.dumps(config), encoding="utf-8")
    script = "\n".join(
        [
            "set -euo pipefail",
            "trap 'echo \"README command failed (exit $?): $BASH_COMMAND\" >&2' ERR",
            walked.replace(README_PORT, str(gateway_port)),
            # Anything the blocks left running is a failure: they must stop what they start.
            'left=$(jobs -p); if [ -n "$left" ]; then kill $left; echo "left running: $left" >&2; exit 1; fi',
        ]
    )
    env = {
        # The venv's meterlake first, as after `make install` (. .venv/bin/activate).
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "METERLAKE_HOME": str(tmp_path / "home"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    walk = subprocess.Popen(
        ["bash", "-c", script],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = walk.communicate(timeout=170)
    finally:
        if walk.poll() is None:
            os.killpg(walk.pid, signal.SIGKILL)
            walk.communicate()
    assert walk.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err
    # The walk did what the README says: traffic from three tenants is in the day's usage.
    assert "stopped cleanly" in out
    assert re.search(r"^tenant-1,", out, flags=re.MULTILINE), out[-3000:]
