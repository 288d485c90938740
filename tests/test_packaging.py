"""The built wheel, installed into a fresh venv outside the checkout, runs the local pipeline (issue 13).

One test, kept economical: the wheel is built without its dependencies, the venv installs them from pip's usual
sources (the machine's wheel cache when it has one), and the demo drives a few hundred requests, not thousands.
It proves what a checkout hides: the queries (sql/) and cdk.json are package data, the local path needs neither
the AWS SDK nor the CDK, and `meterlake demo` reconciles exactly from any directory.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that points Python at the checkout or the dev venv."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "METERLAKE_HOME", "METERLAKE_CONFIG")
    return {name: value for name, value in os.environ.items() if name not in drop} | extra


def _run(*command: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
    return result


def test_the_wheel_installed_elsewhere_runs_demo_query_and_up(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, PROJECT_ROOT, cwd=tmp_path)
    (wheel,) = dist.glob("meterlake-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "meterlake/sql/usage_per_tenant_day.sql" in names
    assert "cdk_stacks/cdk.json" in names
    assert "cdk_stacks/lambda-requirements/transform.txt" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, meterlake = env_dir / "bin" / "python", env_dir / "bin" / "meterlake"
    _run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, cwd=tmp_path)
    # The local path pulls neither the AWS SDK nor the CDK toolchain (extras [aws], [cdk]).
    absent = _run(
        python, "-c", "import importlib.util as u; print(u.find_spec('boto3'), u.find_spec('aws_cdk'))", cwd=tmp_path
    )
    assert absent.stdout.split() == ["None", "None"]

    work = tmp_path / "elsewhere"
    work.mkdir()
    assert _run(meterlake, "--version", cwd=work).stdout == f"meterlake {importlib.metadata.version('meterlake')}\n"
    _run(meterlake, "init", cwd=work)
    demo = _run(meterlake, "demo", "--requests", "300", "--concurrency", "8", cwd=work)
    reconciliation = demo.stdout.split("reconciliation", 1)[1]
    lines = [line for line in reconciliation.splitlines()[1:] if "answered" in line]
    assert len(lines) >= 4, demo.stdout  # three tenants and the requests without one
    assert all(line.rstrip().endswith("OK") for line in lines), demo.stdout
    assert "usage_per_tenant_day" in _run(meterlake, "query", "--list", cwd=work).stdout
    usage = _run(meterlake, "query", "usage_per_tenant_day", "--format", "csv", cwd=work).stdout
    assert usage.startswith("tenant_id,")
    assert "acme" in usage

    up = subprocess.Popen(
        [str(meterlake), "up", "--port", "0"], cwd=work, env=_clean_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert up.stdout is not None
        assert up.stdout.readline().startswith("RestApiEndpoint http://127.0.0.1:")
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0
    assert "stopped cleanly" in out
