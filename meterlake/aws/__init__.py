"""meterlake's AWS clients: usage SQL on Athena, Cognito ID tokens for the load test.

The functions here take boto3 clients as arguments (the CLI builds them), so tests hand them moto-backed clients.
This package imports no boto3 at module level: the CLI catches :class:`AwsError` without paying for botocore.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Where a region is looked up when no option gives one, in this order (the AWS CLI's own variables).
REGION_ENV_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")


class AwsError(Exception):
    """Base of every failure on meterlake's AWS path; the message is one line naming the problem."""


class MissingRegionError(AwsError):
    """No AWS region was given and none is set in the environment or the profile."""

    def __init__(self, option: str) -> None:
        self.option = option
        super().__init__(
            f"no AWS region: give {option}, set {' or '.join(REGION_ENV_VARS)}, or set region in the profile "
            "(aws configure)"
        )


class AwsClientSetupError(AwsError):
    """boto3 cannot build a client from the local AWS settings (unknown profile, malformed region, bad config file)."""

    def __init__(self, service: str, detail: str) -> None:
        self.service = service
        self.detail = detail
        super().__init__(f"cannot set up the {service} client: {detail}")


@dataclass(frozen=True, slots=True)
class ResolvedRegion:
    """A region and where it came from, for the line that tells the user which one a command used."""

    name: str
    #: e.g. ``--region``, ``$AWS_REGION``, ``profile dev (~/.aws/config)``.
    source: str


def resolve_region(
    region: str | None,
    *,
    option: str,
    profile_region: str | None = None,
    profile_source: str = "the profile",
    environ: Mapping[str, str] | None = None,
) -> ResolvedRegion:
    """The region to use, in the AWS CLI's order: the option, ``$AWS_REGION``, ``$AWS_DEFAULT_REGION``, then the
    profile's ``region`` in the config file (``profile_region``, as botocore read it).

    ``option`` is the command-line option that sets it, named in the error.

    Raises:
        MissingRegionError: none of them is set.
    """
    if region:
        return ResolvedRegion(region, option)
    env = os.environ if environ is None else environ
    for name in REGION_ENV_VARS:
        if env.get(name):
            return ResolvedRegion(env[name], f"${name}")
    if profile_region:
        return ResolvedRegion(profile_region, profile_source)
    raise MissingRegionError(option)


@dataclass(frozen=True, slots=True)
class AwsSession:
    """A boto3 session for one command: the profile, credentials and region the AWS CLI would use."""

    session: Any
    region: ResolvedRegion
    #: The profile in use (``--profile``, else ``$AWS_PROFILE``); None: the default credential chain.
    profile: str | None

    def client(self, service: str) -> Any:
        """A client of ``service`` in :attr:`region`.

        Raises:
            AwsClientSetupError: boto3 cannot build it from the local AWS settings.
        """
        from botocore.exceptions import BotoCoreError  # type: ignore[import-untyped]

        try:
            return self.session.client(service, region_name=self.region.name)
        except BotoCoreError as exc:
            raise AwsClientSetupError(service, str(exc)) from exc

    def describe(self) -> str:
        """One line for the user: which region (and where from) and which profile a command works with."""
        who = f"profile {self.profile}" if self.profile else "the default credentials"
        return f"AWS region {self.region.name} (from {self.region.source}), {who}"


def aws_session(*, profile: str | None, region: str | None, option: str, service: str = "aws") -> AwsSession:
    """Resolve profile, credentials and region as boto3 and the AWS CLI do: ``--profile`` else ``$AWS_PROFILE``
    (else the default chain), the region from :func:`resolve_region` with the profile's config file last.

    Raises:
        AwsClientSetupError: the profile is unknown or the config file cannot be read.
        MissingRegionError: no region anywhere.
    """
    import boto3  # type: ignore[import-untyped]
    from botocore.exceptions import BotoCoreError

    try:
        session = boto3.Session(profile_name=profile)
        profile_region = session.region_name
    except BotoCoreError as exc:
        raise AwsClientSetupError(service, str(exc)) from exc
    profile_name = profile or os.environ.get("AWS_PROFILE") or None
    config_file = os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"
    resolved = resolve_region(
        region,
        option=option,
        profile_region=profile_region,
        profile_source=f"profile {profile_name or 'default'} in {config_file}",
    )
    return AwsSession(session=session, region=resolved, profile=profile_name)
