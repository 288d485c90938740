"""Lambda bundles built for this machine, run with nothing on sys.path but the bundle and what Lambda's runtime adds.

The same sources, pruning and locked versions as the Lambda's asset; only the wheels are this machine's (its platform
and Python), so the lock's pins are installed without its hashes, which are those of the Lambda's wheels.
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import boto3  # type: ignore[import-untyped]
import botocore  # type: ignore[import-untyped]
import dateutil  # type: ignore[import-untyped]
import jmespath  # type: ignore[import-untyped]
import s3transfer  # type: ignore[import-untyped]
import six  # type: ignore[import-untyped]
import urllib3

from cdk_stacks.bundling import PythonBundle, PythonTarget
from cdk_stacks.lambda_lock import read_lock

#: Modules whose presence after an import tells what a bundle's code path loaded.
HEAVY_MODULES = ("pyarrow", "pyiceberg", "duckdb", "sqlglot")


def this_machine() -> PythonTarget:
    """This machine's manylinux platform and Python: a bundle built for it can be imported here."""
    machine = platform.machine()
    return PythonTarget(
        platform=f"manylinux2014_{machine}",
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        extra_platforms=(f"manylinux_2_28_{machine}",),
    )


def build_for_this_machine(make_bundle: Callable[[PythonTarget], PythonBundle], directory: Path) -> Path:
    """Build a Lambda's bundle into ``directory`` for this machine, with its lock's versions (if it has a lock)."""
    bundle = make_bundle(this_machine())
    if bundle.lock is not None:
        pins = tuple(f"{name}=={version}" for name, version in read_lock(bundle.lock).items())
        bundle = dataclasses.replace(bundle, requirements=pins, lock=None)
    bundle.build(directory)
    return directory


def lambda_runtime(directory: Path) -> Path:
    """A directory of what Lambda's Python runtime adds to sys.path: the AWS SDK and its dependencies (links)."""
    directory.mkdir(parents=True, exist_ok=True)
    for module in (boto3, botocore, s3transfer, jmespath, dateutil, urllib3):
        source = Path(module.__file__ or "").parent
        (directory / source.name).symlink_to(source)
    six_file = Path(six.__file__ or "")
    (directory / six_file.name).symlink_to(six_file)
    return directory


def run_alone(script: str, *args: str, bundle_dir: Path, runtime_dir: Path) -> str:
    """Run ``script`` under ``python -I -S`` with only the bundle, then the runtime, on sys.path; its stdout.

    ``sys.argv[1:]`` are ``args``; the script's own failure (stderr's end) fails the caller's test.
    """
    prelude = f"import sys; sys.path[:0] = [{str(bundle_dir)!r}, {str(runtime_dir)!r}]\n"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + script, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
