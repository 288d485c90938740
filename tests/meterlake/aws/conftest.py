"""Fixtures for the AWS path: fake credentials, moto standing in for AWS, helpers that set up what AWS would hold."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import boto3  # type: ignore[import-untyped]
import jwt
import pytest
import requests
from moto import mock_aws

REGION = "us-east-1"
#: The lake bucket of the forwarding tests (checkpoint, dead letters).
LAKE_BUCKET = "meterlake-test-lake"
#: moto's endpoint for queueing the rows Athena's GetQueryResults returns (moto runs no SQL).
ATHENA_RESULTS_API = "http://motoapi.amazonaws.com/moto-api/static/athena/query-results"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and region in the environment, so nothing can reach a real account."""
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


@pytest.fixture
def moto(aws_env: None) -> Iterator[None]:
    """Every boto3 call in the test goes to moto's in-memory AWS."""
    with mock_aws():
        yield


@pytest.fixture
def aws(moto: None) -> Iterator[tuple[Any, Any]]:
    """S3 (with the lake bucket) and SQS clients; the forwarding Lambdas' cached settings and clients forgotten."""
    from meterlake.aws import forwarding, staging

    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=LAKE_BUCKET)
    forwarding.reset_caches()
    staging.reset_caches()
    yield s3, boto3.client("sqs", region_name=REGION)
    forwarding.reset_caches()
    staging.reset_caches()


@pytest.fixture
def athena(moto: None) -> Any:
    """An Athena client with a workgroup ``wg``."""
    client = boto3.client("athena", region_name=REGION)
    client.create_work_group(Name="wg", Configuration={})
    return client


def queue_athena_result(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str | None]]) -> None:
    """Queue one result for moto's next query: a header row of the column names, then ``rows`` (None = NULL)."""
    body: dict[str, Any] = {
        "region": REGION,
        "results": [
            {
                "rows": [_athena_row([name for name, _ in columns])] + [_athena_row(row) for row in rows],
                "column_info": [
                    {"Name": name, "Label": name, "Type": kind, "Nullable": "UNKNOWN"} for name, kind in columns
                ],
            }
        ],
    }
    response = requests.post(ATHENA_RESULTS_API, json=body, timeout=5)
    assert response.status_code == 201, response.text


def _athena_row(values: Sequence[str | None]) -> dict[str, Any]:
    return {"Data": [{} if value is None else {"VarCharValue": value} for value in values]}


@dataclass(frozen=True)
class CognitoUser:
    """A confirmed user of a moto user pool, signed up through an app client that allows USER_PASSWORD_AUTH."""

    user_pool_id: str
    client_id: str
    username: str
    password: str
    tenant_id: str


@pytest.fixture
def cognito(moto: None) -> Any:
    """A cognito-idp client."""
    return boto3.client("cognito-idp", region_name=REGION)


@pytest.fixture
def cognito_user(cognito: Any) -> CognitoUser:
    """User ``alice`` of tenant ``acme``: signed up, confirmed by an admin, custom:tenant_id set by an admin."""
    pool_id = cognito.create_user_pool(
        PoolName="meterlake-users",
        Schema=[{"Name": "tenant_id", "AttributeDataType": "String", "Mutable": True}],
    )["UserPool"]["Id"]
    client_id = cognito.create_user_pool_client(
        UserPoolId=pool_id,
        ClientName="load-test",
        ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
    )["UserPoolClient"]["ClientId"]
    user = CognitoUser(pool_id, client_id, username="alice", password="Corr3ct-horse!", tenant_id="acme")
    cognito.sign_up(ClientId=client_id, Username=user.username, Password=user.password)
    cognito.admin_confirm_sign_up(UserPoolId=pool_id, Username=user.username)
    cognito.admin_update_user_attributes(
        UserPoolId=pool_id,
        Username=user.username,
        UserAttributes=[{"Name": "custom:tenant_id", "Value": user.tenant_id}],
    )
    return user


def verified_claims(token: str, user: CognitoUser) -> dict[str, Any]:
    """The token's claims after checking its signature against the pool's JWKS, as the API's authorizer would."""
    issuer = f"https://cognito-idp.{REGION}.amazonaws.com/{user.user_pool_id}"
    jwks = requests.get(f"{issuer}/.well-known/jwks.json", timeout=5).json()
    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(token, key=key, algorithms=["RS256"], audience=user.client_id, issuer=issuer)
    return claims
