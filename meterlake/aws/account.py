"""The AWS account and region a command works in, resolved as the AWS CLI resolves them, with its clients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from meterlake.aws import AwsClientSetupError, AwsError, MissingRegionError, aws_session
from meterlake.aws.stacks import CDK_QUALIFIER


@dataclass(frozen=True, slots=True)
class Account:
    """The caller's account and region, and boto3 clients for them (one per service, made on first use)."""

    account_id: str
    region: str
    client: Callable[[str], Any]
    #: Where the region came from (``--region``, ``$AWS_REGION``, a profile's config file), for the user.
    region_source: str = "--region"

    @property
    def cdk_execution_role(self) -> str:
        """The role CloudFormation deploys with after ``cdk bootstrap``: the one Lake Formation must trust."""
        return f"arn:aws:iam::{self.account_id}:role/cdk-{CDK_QUALIFIER}-cfn-exec-role-{self.account_id}-{self.region}"


class AccountUnreachableError(AwsError):
    """No region, no credentials, or an unusable profile: nothing can be done in the account."""


def connect(*, profile: str | None, region: str | None) -> Account:
    """The account and region the AWS CLI would use (``--profile``/``AWS_PROFILE``, ``$AWS_REGION``, the config
    files), as :func:`meterlake.aws.aws_session` resolves them.

    Raises:
        AccountUnreachableError: no region is configured, no credentials are found, or the profile is unknown.
    """
    from botocore.exceptions import BotoCoreError

    try:
        aws = aws_session(profile=profile, region=region, option="--region", service="sts")
    except AwsClientSetupError as exc:
        raise AccountUnreachableError(exc.detail) from None
    except MissingRegionError as exc:
        raise AccountUnreachableError(str(exc)) from None
    try:
        identity = aws.client("sts").get_caller_identity()
    except (BotoCoreError, ClientError, AwsClientSetupError) as exc:
        raise AccountUnreachableError(f"cannot identify the caller: {exc}") from None
    clients: dict[str, Any] = {}

    def client(service: str) -> Any:
        if service not in clients:
            clients[service] = aws.client(service)
        return clients[service]

    return Account(
        account_id=identity["Account"], region=aws.region.name, client=client, region_source=aws.region.source
    )
