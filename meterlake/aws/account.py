"""The AWS account and region a command works in, resolved as the AWS CLI resolves them, with its clients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from meterlake.aws import AwsError
from meterlake.aws.stacks import CDK_QUALIFIER


@dataclass(frozen=True, slots=True)
class Account:
    """The caller's account and region, and boto3 clients for them (one per service, made on first use)."""

    account_id: str
    region: str
    client: Callable[[str], Any]

    @property
    def cdk_execution_role(self) -> str:
        """The role CloudFormation deploys with after ``cdk bootstrap``: the one Lake Formation must trust."""
        return f"arn:aws:iam::{self.account_id}:role/cdk-{CDK_QUALIFIER}-cfn-exec-role-{self.account_id}-{self.region}"


class AccountUnreachableError(AwsError):
    """No region, no credentials, or an unusable profile: nothing can be done in the account."""


def connect(*, profile: str | None, region: str | None) -> Account:
    """The account and region the AWS CLI would use (``--profile``/``AWS_PROFILE``, the config files, the
    environment), as boto3 resolves them.

    Raises:
        AccountUnreachableError: no region is configured, no credentials are found, or the profile is unknown.
    """
    import boto3  # type: ignore[import-untyped]
    from botocore.exceptions import BotoCoreError

    try:
        session = boto3.Session(profile_name=profile, region_name=region)
    except BotoCoreError as exc:
        raise AccountUnreachableError(str(exc)) from None
    if not session.region_name:
        raise AccountUnreachableError("no AWS region: give --region, set AWS_REGION, or set one in the profile")
    try:
        identity = session.client("sts").get_caller_identity()
    except (BotoCoreError, ClientError) as exc:
        raise AccountUnreachableError(f"cannot identify the caller: {exc}") from None
    clients: dict[str, Any] = {}

    def client(service: str) -> Any:
        if service not in clients:
            clients[service] = session.client(service)
        return clients[service]

    return Account(account_id=identity["Account"], region=session.region_name, client=client)
