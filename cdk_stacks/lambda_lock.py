"""The Lambda assets' lock files: every wheel an asset installs, pinned to one version and to its sha256.

``make lock-lambdas`` (``python -m cdk_stacks.lambda_lock``) resolves each bundle's requirements with pip for the
Lambda's Python and both architectures, within pyproject.toml's ranges (passed as constraints, so a dependency the
project also declares stays in its declared range), and writes ``cdk_stacks/lambda-requirements/<bundle>.txt``: a pip
requirements file, one ``name==version`` per package with the hashes of its wheel for each architecture. The bundler
installs it with ``--require-hashes`` (:class:`cdk_stacks.bundling.PythonBundle`), so an asset's content changes
only when its lock is rewritten and reviewed.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cdk_stacks.bundling import (
    LAMBDA_ARCHITECTURES,
    LOCK_TARGET_COMMENT,
    PROJECT_ROOT,
    PythonBundle,
    PythonTarget,
    canonical_name,
    project_dependencies,
)
from cdk_stacks.forwarding import forwarder_bundle, stager_bundle
from cdk_stacks.shared import LAMBDA_PYTHON_VERSION
from cdk_stacks.transform import transform_bundle

#: Each locked bundle and whether its stack accepts manylinux_2_28 wheels (``PythonTarget.for_lambda``'s
#: ``glibc_2_28``): the lock holds the hashes of the wheels pip picks for exactly that target, and the bundler
#: refuses a target the lock was not resolved for.
LOCKED_BUNDLES: Final[tuple[tuple[Callable[[PythonTarget], PythonBundle], bool], ...]] = (
    (transform_bundle, False),
    (forwarder_bundle, True),
    (stager_bundle, True),
)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_EXTRAS = re.compile(r"\[[^\]]*\]")
#: ``name (<2,>=1)`` as package metadata writes a requirement -> ``name<2,>=1`` as pip takes it.
_PAREN_SPEC = re.compile(r"^([A-Za-z0-9._-]+) \(([^)]*)\)")


class LockError(RuntimeError):
    """pip could not resolve a bundle for a target, or the architectures need different sets of wheels."""


@dataclass(frozen=True, slots=True)
class LockedWheel:
    """One package of a lock: its version and the sha256 of the wheel pip picked for each target."""

    name: str
    version: str
    hashes: tuple[str, ...]


def resolve(requirements: Sequence[str], target: PythonTarget, *, constraints: Path) -> dict[str, tuple[str, str]]:
    """What pip would install for ``requirements`` on ``target``: (version, wheel sha256) by canonical name.

    Raises:
        LockError: pip failed (its last lines are in the message) or did not report a wheel's sha256.
    """
    platforms = (arg for platform in (target.platform, *target.extra_platforms) for arg in ("--platform", platform))
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--disable-pip-version-check",
        "--report",
        "-",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        *platforms,
        "--python-version",
        target.python_version,
        "--constraint",
        str(constraints),
        *requirements,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise LockError(f"pip could not resolve {list(requirements)} for {target.describe()}: {tail}")
    resolved: dict[str, tuple[str, str]] = {}
    for item in json.loads(result.stdout)["install"]:
        name = canonical_name(item["metadata"]["name"])
        sha256 = item["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
        if not sha256:
            raise LockError(f"pip reported no sha256 for {name} ({item['download_info'].get('url')})")
        resolved[name] = (item["metadata"]["version"], sha256)
    return resolved


def merge(by_target: Mapping[PythonTarget, Mapping[str, tuple[str, str]]]) -> list[LockedWheel]:
    """One locked wheel per package, with every target's hash, sorted by name.

    Raises:
        LockError: the targets resolved different packages or versions (one lock serves every architecture).
    """
    versions = {
        target: {name: version for name, (version, _) in resolved.items()} for target, resolved in by_target.items()
    }
    first_target, first = next(iter(versions.items()))
    for target, other in versions.items():
        if other != first:
            differences = sorted(
                f"{name}: {first.get(name, 'absent')} for {first_target.describe()}, {other.get(name, 'absent')} "
                f"for {target.describe()}"
                for name in first.keys() | other.keys()
                if first.get(name) != other.get(name)
            )
            raise LockError(
                "the architectures resolve differently; constrain in pyproject.toml: " + "; ".join(differences)
            )
    return [
        LockedWheel(
            name=name, version=version, hashes=tuple(sorted({resolved[name][1] for resolved in by_target.values()}))
        )
        for name, version in sorted(first.items())
    ]


def render_lock(
    *, title: str, requirements: Sequence[str], targets: Sequence[PythonTarget], wheels: Sequence[LockedWheel]
) -> str:
    """The lock file's text: a header naming its requirements and targets, then one hashed pin per package."""
    lines = [
        f"# {title}: locked by `make lock-lambdas` (python -m cdk_stacks.lambda_lock); do not edit by hand.",
        "# Resolved from these requirements within pyproject.toml's ranges:",
        *(f"#   {requirement}" for requirement in requirements),
        *(f"{LOCK_TARGET_COMMENT}{target.describe()}" for target in targets),
    ]
    for wheel in wheels:
        options = [f"{wheel.name}=={wheel.version}", *(f"    --hash=sha256:{digest}" for digest in wheel.hashes)]
        lines.append(" \\\n".join(options))
    return "\n".join(lines) + "\n"


def read_lock(path: Path) -> dict[str, str]:
    """A lock's pins: each package's version by its canonical name."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonical_name(match.group(1))] = match.group(2)
    return pins


def lock_bundle(make_bundle: Callable[[PythonTarget], PythonBundle], *, glibc_2_28: bool, constraints: Path) -> Path:
    """Resolve one bundle for every Lambda architecture and write its lock; returns the lock's path.

    Raises:
        LockError: the bundle has no lock path, or resolving failed.
    """
    targets = [
        PythonTarget.for_lambda(architecture=architecture, python_version=LAMBDA_PYTHON_VERSION, glibc_2_28=glibc_2_28)
        for architecture in LAMBDA_ARCHITECTURES
    ]
    bundle = make_bundle(targets[0])
    if bundle.lock is None:
        raise LockError(f"{make_bundle.__name__} names no lock file")
    wheels = merge({target: resolve(bundle.requirements, target, constraints=constraints) for target in targets})
    title = bundle.lock.stem.capitalize() + " Lambda asset"
    bundle.lock.parent.mkdir(parents=True, exist_ok=True)
    bundle.lock.write_text(render_lock(title=title, requirements=bundle.requirements, targets=targets, wheels=wheels))
    return bundle.lock


def runtime_constraints() -> list[str]:
    """What the Lambda runtime's own AWS SDK requires of packages a bundle may also ship (python-dateutil, urllib3,
    jmespath): a bundle's copy comes first on the runtime's path, so it must be one that botocore accepts.

    Read from the botocore installed with the project, which is within pyproject.toml's boto3 range.
    """
    requirements = importlib.metadata.requires("botocore") or []
    return [_PAREN_SPEC.sub(r"\1\2", requirement) for requirement in requirements if "extra ==" not in requirement]


def main() -> None:
    """Rewrite every Lambda asset's lock file (``make lock-lambdas``)."""
    architectures = ", ".join(LAMBDA_ARCHITECTURES)
    with tempfile.TemporaryDirectory() as scratch:
        # Constraints take no extras: pyiceberg[...] constrains pyiceberg's version only.
        constraints = Path(scratch) / "constraints.txt"
        lines = [_EXTRAS.sub("", spec) for spec in project_dependencies().values()] + runtime_constraints()
        constraints.write_text("\n".join(lines) + "\n")
        for make_bundle, glibc_2_28 in LOCKED_BUNDLES:
            path = lock_bundle(make_bundle, glibc_2_28=glibc_2_28, constraints=constraints)
            print(f"{path.relative_to(PROJECT_ROOT)}: {len(read_lock(path))} packages for {architectures}")


if __name__ == "__main__":
    main()
