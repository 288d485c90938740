"""Lambda assets built at synth time without Docker: ``pip install --platform`` for the Lambda's platform plus a copy.

The Lambdas are plain Python whose compiled dependencies ship manylinux wheels, so pip can fetch the wheels of the
Lambda's platform and Python version on any machine. What pip installs is a bundle's lock file
(``cdk_stacks/lambda-requirements/<bundle>.txt``, written by ``make lock-lambdas``): exact versions and the sha256 of
each wheel, so an asset changes only when its lock does, never because PyPI published a release. The asset hash
covers the copied sources, the lock, the requirements and the target, so CDK skips bundling when none of them changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsii
from aws_cdk import AssetHashType, BundlingOptions, DockerImage, ILocalBundling
from aws_cdk import aws_lambda as lambda_

#: The repository root: the sources bundled into the Lambdas and pyproject.toml live here.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: The Lambda assets' lock files, one per bundle (``make lock-lambdas`` writes them).
LAMBDA_LOCK_DIR = PROJECT_ROOT / "cdk_stacks" / "lambda-requirements"
#: How a lock file names each target its hashes were resolved for: one such comment line per target.
LOCK_TARGET_COMMENT = "# target: "
#: Bump when the way bundles are built changes, so cached assets are rebuilt.
_BUNDLER_VERSION = "3"
_IGNORED_PARTS = frozenset({"__pycache__"})
#: Left out of every bundle: pip's console scripts, whose shebang names the synthesizing machine's Python (so two
#: machines would build different assets) and which Lambda never runs.
_ALWAYS_PRUNED = ("bin",)
#: Every file and directory of a bundle gets these modes and this mtime (1980-01-01, the earliest a zip can hold),
#: whatever the umask and clock of the synth: the asset's bytes, modes and times depend on its inputs only.
_FILE_MODE, _EXECUTABLE_MODE, _DIR_MODE = 0o644, 0o755, 0o755
_FIXED_MTIME = 315_532_800
#: Lambda's architectures (the config's names) and the machine names of their manylinux platform tags.
_MACHINES = {"arm64": "aarch64", "x86_64": "x86_64"}
LAMBDA_ARCHITECTURES = tuple(_MACHINES)
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class BundlingError(RuntimeError):
    """pip could not install a Lambda's requirements for its platform, or a source to copy is missing."""


@dataclass(frozen=True, slots=True)
class PythonTarget:
    """The platform and CPython version a bundle's compiled wheels are chosen for."""

    platform: str
    python_version: str
    #: Further platform tags pip may pick wheels for (e.g. ``manylinux_2_28_aarch64``: duckdb ships no older tag).
    extra_platforms: tuple[str, ...] = ()

    @classmethod
    def for_lambda(cls, *, architecture: str, python_version: str, glibc_2_28: bool = False) -> PythonTarget:
        """The manylinux target of a Lambda architecture (``arm64`` or ``x86_64``).

        ``glibc_2_28`` also accepts manylinux_2_28 wheels: the Python 3.12+ runtimes run Amazon Linux 2023 (glibc 2.34).
        """
        machine = _MACHINES[architecture]
        extra = (f"manylinux_2_28_{machine}",) if glibc_2_28 else ()
        return cls(platform=f"manylinux2014_{machine}", python_version=python_version, extra_platforms=extra)

    def describe(self) -> str:
        """``cp<version> <platform> [<extra platforms>]``, as a lock file names the targets it was resolved for."""
        return " ".join((f"cp{self.python_version}", self.platform, *self.extra_platforms))


@dataclass(frozen=True, slots=True)
class PythonBundle:
    """A Lambda asset: sources copied to paths inside the bundle, plus pip requirements installed for a target.

    Args:
        sources: (file or directory, its path inside the bundle), relative to ``root``.
        requirements: pip requirement specifiers, e.g. ``msgspec>=0.19,<0.23``: what the bundle needs, as
            pyproject.toml's ranges. Installed (with their dependencies, resolved now) only if there is no ``lock``.
        target: the platform/Python the wheels are chosen for.
        root: where ``sources`` are read from.
        prune: glob patterns (relative to the bundle) of installed files and directories to leave out, to keep
            a bundle under Lambda's 250 MB: packages the runtime provides, parts of a wheel nothing imports.
        lock: a pip requirements file pinning ``requirements`` and every dependency to one version and the sha256
            of its wheels for each target it names; installed instead of ``requirements``, hashes checked.
    """

    sources: tuple[tuple[str, str], ...]
    requirements: tuple[str, ...]
    target: PythonTarget
    root: Path = PROJECT_ROOT
    prune: tuple[str, ...] = ()
    lock: Path | None = None

    def asset_hash(self) -> str:
        """A digest of everything the bundle is built from: source files, requirements, lock, target, bundler."""
        digest = hashlib.sha256()
        parts = (_BUNDLER_VERSION, *self.requirements, self.target.platform, self.target.python_version)
        for part in (*parts, *self.target.extra_platforms, *(f"prune:{pattern}" for pattern in self.prune)):
            digest.update(part.encode() + b"\0")
        if self.lock is not None:
            digest.update(b"lock\0" + _lock_text(self.lock).encode() + b"\0")
        for source, destination in self._files():
            digest.update(destination.encode() + b"\0")
            digest.update(source.read_bytes() + b"\0")
        return digest.hexdigest()

    def build(self, output_dir: Path) -> None:
        """Install the lock (else the requirements) into ``output_dir`` for the target, then copy the sources there.

        Raises:
            BundlingError: the lock is missing or was not resolved for the target, pip failed (its last lines are
                in the message), or a source is missing.
        """
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.lock is not None:
            self._check_lock_target(self.lock)
            # pip checks each wheel against the lock's hashes, and that every dependency is in the lock.
            self._pip_install(output_dir, "--require-hashes", "--requirement", str(self.lock))
        elif self.requirements:
            self._pip_install(output_dir, *self.requirements)
        for pattern in (*self.prune, *_ALWAYS_PRUNED):
            for path in sorted(output_dir.glob(pattern)):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        for source, destination in self._files():
            path = output_dir / destination
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)
        _normalize(output_dir)

    def _check_lock_target(self, lock: Path) -> None:
        """The lock's hashes are those of the wheels pip picked for the targets it names: any other target fails."""
        if f"{LOCK_TARGET_COMMENT}{self.target.describe()}" not in _lock_text(lock).splitlines():
            raise BundlingError(
                f"{lock} was not resolved for {self.target.describe()} (see its '{LOCK_TARGET_COMMENT.strip()}' "
                "lines): run `make lock-lambdas`"
            )

    def _pip_install(self, output_dir: Path, *requirements: str) -> None:
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--only-binary=:all:",
            "--implementation",
            "cp",
            *(
                arg
                for platform in (self.target.platform, *self.target.extra_platforms)
                for arg in ("--platform", platform)
            ),
            "--python-version",
            self.target.python_version,
            "--target",
            str(output_dir),
            *requirements,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise BundlingError(_pip_failure(result.stderr, what=list(requirements), target=self.target.describe()))

    def _files(self) -> Iterator[tuple[Path, str]]:
        """Every file to copy, as (source file, path inside the bundle), in a stable order."""
        for source, destination in self.sources:
            path = self.root / source
            if path.is_file():
                yield path, destination
            elif path.is_dir():
                for file in sorted(path.rglob("*")):
                    relative = file.relative_to(path)
                    if file.is_file() and not _IGNORED_PARTS.intersection(relative.parts) and file.suffix != ".pyc":
                        yield file, f"{destination}/{relative.as_posix()}"
            else:
                raise BundlingError(f"{path}: no such file or directory to bundle")


#: What pip's log says when it could not reach the package index at all (no network, a proxy, a wrong index URL).
_UNREACHABLE_INDEX = re.compile(
    r"NewConnectionError|Connection refused|Temporary failure in name resolution|Name or service not known|"
    r"ConnectTimeoutError|Network is unreachable|ProxyError|SSLError"
)


def _pip_failure(stderr: str, *, what: list[str], target: str) -> str:
    """One line saying why pip failed: the index unreachable (and how to point pip elsewhere), else pip's errors."""
    errors = [line.strip() for line in stderr.splitlines() if line.startswith("ERROR:")]
    detail = " | ".join(errors[-2:] or stderr.strip().splitlines()[-2:])
    if _UNREACHABLE_INDEX.search(stderr):
        return (
            f"pip cannot reach the package index to fetch the Lambda wheels for {target} ({detail}); synthesis "
            "installs each asset's locked wheels, so it needs PyPI, or PIP_INDEX_URL / PIP_FIND_LINKS offering them"
        )
    return f"pip could not install {what} for {target}: {detail}"


#: The bundling failures of this process, newest last: CDK reports a failed local bundling as a JavaScript error
#: wrapped in jsii's traceback, so app.py reads the cause from here to print it as one line.
BUNDLING_FAILURES: list[BundlingError] = []


def _normalize(output_dir: Path) -> None:
    """Give every file and directory under ``output_dir`` the fixed modes and mtime (see :data:`_FIXED_MTIME`).

    CDK zips an asset with each file's mode; pip and the copies above create them under the synth's umask, so two
    synths (two users, a CI runner) would zip different bytes. Files executable by their owner stay executable.
    """
    for path in sorted(output_dir.rglob("*"), reverse=True):  # children before their directory
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(_DIR_MODE)
        else:
            path.chmod(_EXECUTABLE_MODE if path.stat().st_mode & stat.S_IXUSR else _FILE_MODE)
        os.utime(path, (_FIXED_MTIME, _FIXED_MTIME), follow_symlinks=False)
    output_dir.chmod(_DIR_MODE)


def _lock_text(lock: Path) -> str:
    try:
        return lock.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundlingError(f"{lock}: no such lock file; `make lock-lambdas` writes it") from None


@jsii.implements(ILocalBundling)
class _LocalPythonBundling:
    """CDK's hook to bundle on this machine instead of in a Docker container."""

    def __init__(self, bundle: PythonBundle) -> None:
        self._bundle = bundle

    def try_bundle(self, output_dir: str, *, image: DockerImage, **_options: Any) -> bool:
        """Build the bundle into CDK's output directory; True tells CDK no Docker is needed."""
        try:
            self._bundle.build(Path(output_dir))
        except BundlingError as exc:
            BUNDLING_FAILURES.append(exc)
            raise
        return True


def lambda_code(bundle: PythonBundle) -> lambda_.Code:
    """The Lambda code asset of ``bundle``, bundled locally and hashed by its inputs (never needs Docker)."""
    first_source = bundle.root / bundle.sources[0][0]
    return lambda_.Code.from_asset(
        # CDK wants a directory to "bundle from"; the custom hash means it is not fingerprinted, nor copied.
        str(first_source if first_source.is_dir() else first_source.parent),
        asset_hash_type=AssetHashType.CUSTOM,
        asset_hash=bundle.asset_hash(),
        bundling=BundlingOptions(
            # Never pulled: the local bundler always succeeds, but CDK requires an image to fall back on.
            image=DockerImage.from_registry("unused"),
            local=_LocalPythonBundling(bundle),
        ),
    )


def project_requirements(names: Sequence[str], *, pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> tuple[str, ...]:
    """The specifiers of ``names`` exactly as pyproject.toml's ``[project].dependencies`` pin them.

    Raises:
        BundlingError: a name is not a dependency of the project.
    """
    by_name = project_dependencies(pyproject=pyproject)
    missing = [name for name in names if canonical_name(name) not in by_name]
    if missing:
        raise BundlingError(f"{pyproject}: not in [project].dependencies: {missing}")
    return tuple(by_name[canonical_name(name)] for name in names)


def project_dependencies(*, pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> dict[str, str]:
    """pyproject.toml's ``[project].dependencies``: each specifier by its package's canonical name.

    An installed wheel has no pyproject.toml: there the installed distribution's metadata says the same (its
    requirements without an extra).
    """
    if pyproject.is_file():
        dependencies: list[str] = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    else:
        requires = importlib.metadata.requires("meterlake") or []
        dependencies = [requirement for requirement in requires if "extra ==" not in requirement]
    by_name: dict[str, str] = {}
    for specifier in dependencies:
        match = _REQUIREMENT_NAME.match(specifier)
        if match:
            by_name[canonical_name(match.group(1))] = specifier
    return by_name


def canonical_name(name: str) -> str:
    """PEP 503 name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()
