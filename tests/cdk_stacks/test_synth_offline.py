"""A synth that cannot reach the package index fails in one line (issue 13, defect 3), not jsii's 60-line trace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cdk_stacks.bundling import PROJECT_ROOT


def test_a_synth_without_the_package_index_fails_in_one_line(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
    env |= {
        # Nothing but an index that refuses connections: no pip.conf, no local wheel directory.
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "CDK_OUTDIR": str(tmp_path / "cdk.out"),
        "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
    }
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "app.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: pip cannot reach the package index"), errors[0]
    assert "aws-lambda-powertools" in errors[0]
    # What else reaches stderr is CDK's one progress line per asset it started to bundle.
    assert all(line.startswith(("error:", "Bundling asset")) for line in result.stderr.splitlines()), result.stderr
