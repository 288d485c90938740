"""meterlake's AWS clients: usage SQL on Athena, Cognito ID tokens for the load test.

The functions here take boto3 clients as arguments (the CLI builds them), so tests hand them moto-backed clients.
This package imports no boto3 at module level: the CLI catches :class:`AwsError` without paying for botocore.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: Where a region is looked up when no option gives one, in this order (the AWS CLI's own variables).
REGION_ENV_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")


class AwsError(Exception):
    """Base of every failure on meterlake's AWS path; the message is one line naming the problem."""


class MissingRegionError(AwsError):
    """No AWS region was given and none is set in the environment."""

    def __init__(self, option: str) -> None:
        self.option = option
        super().__init__(f"no AWS region: give {option} or set {' or '.join(REGION_ENV_VARS)}")


class AwsClientSetupError(AwsError):
    """boto3 cannot build a client from the local AWS settings (unknown profile, malformed region, bad config file)."""

    def __init__(self, service: str, detail: str) -> None:
        self.service = service
        self.detail = detail
        super().__init__(f"cannot set up the {service} client: {detail}")


def resolve_region(region: str | None, *, option: str, environ: Mapping[str, str] | None = None) -> str:
    """The region to use: ``region`` if given, else ``$AWS_REGION``, else ``$AWS_DEFAULT_REGION``.

    ``option`` is the command-line option that sets it, named in the error.

    Raises:
        MissingRegionError: none of them is set.
    """
    if region:
        return region
    env = os.environ if environ is None else environ
    for name in REGION_ENV_VARS:
        if env.get(name):
            return env[name]
    raise MissingRegionError(option)
