"""Cognito sign-in for the load test against a moto user pool: the ID token, its tenant, and each way it can fail."""

from __future__ import annotations

from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
from botocore.config import Config as BotocoreConfig  # type: ignore[import-untyped]

from meterlake.aws.cognito import CognitoAuthError, fetch_id_token, tenant_of
from tests.meterlake.aws.conftest import REGION, CognitoUser, verified_claims


def sign_in(user: CognitoUser, cognito: Any, *, username: str | None = None, password: str | None = None) -> str:
    return fetch_id_token(
        client_id=user.client_id,
        username=username or user.username,
        password=password or user.password,
        region=REGION,
        cognito_client=cognito,
    )


def test_id_token_is_signed_by_the_pool_and_carries_the_tenant(cognito_user: CognitoUser, cognito: Any) -> None:
    token = sign_in(cognito_user, cognito)

    claims = verified_claims(token, cognito_user)
    assert claims["token_use"] == "id"
    assert claims["cognito:username"] == "alice"
    assert claims["custom:tenant_id"] == "acme"
    assert tenant_of(token) == "acme"


def test_without_a_client_one_is_made_for_the_region(cognito_user: CognitoUser) -> None:
    token = fetch_id_token(
        client_id=cognito_user.client_id, username="alice", password=cognito_user.password, region=REGION
    )

    assert verified_claims(token, cognito_user)["custom:tenant_id"] == "acme"


def test_user_without_a_tenant_has_no_label(cognito_user: CognitoUser, cognito: Any) -> None:
    cognito.sign_up(ClientId=cognito_user.client_id, Username="bob", Password="An0ther-pass!")
    cognito.admin_confirm_sign_up(UserPoolId=cognito_user.user_pool_id, Username="bob")

    assert tenant_of(sign_in(cognito_user, cognito, username="bob", password="An0ther-pass!")) is None


def test_wrong_password_says_so(cognito_user: CognitoUser, cognito: Any) -> None:
    with pytest.raises(CognitoAuthError) as caught:
        sign_in(cognito_user, cognito, password="not-it")

    message = str(caught.value)
    assert message.startswith("Cognito sign-in of 'alice': NotAuthorizedException: Incorrect username or password.")
    assert "not-it" not in message
    assert caught.value.username == "alice"


def test_unknown_user_says_so(cognito_user: CognitoUser, cognito: Any) -> None:
    with pytest.raises(CognitoAuthError, match="'mallory': UserNotFoundException"):
        sign_in(cognito_user, cognito, username="mallory")


def test_unconfirmed_user_is_told_to_confirm(cognito_user: CognitoUser, cognito: Any) -> None:
    cognito.sign_up(ClientId=cognito_user.client_id, Username="carol", Password="Carol-pass-1!")

    with pytest.raises(CognitoAuthError, match=r"UserNotConfirmedException.*admin-confirm-sign-up"):
        sign_in(cognito_user, cognito, username="carol", password="Carol-pass-1!")


def test_new_password_challenge_says_what_to_do(cognito_user: CognitoUser, cognito: Any) -> None:
    cognito.admin_create_user(
        UserPoolId=cognito_user.user_pool_id,
        Username="dave",
        TemporaryPassword="Temp-pass-1!",
        MessageAction="SUPPRESS",
    )

    with pytest.raises(CognitoAuthError, match=r"NEW_PASSWORD_REQUIRED.*admin-set-user-password .* --permanent"):
        sign_in(cognito_user, cognito, username="dave", password="Temp-pass-1!")


def test_unknown_client_says_so(cognito_user: CognitoUser, cognito: Any) -> None:
    with pytest.raises(CognitoAuthError, match=r"ResourceNotFoundException.*no app client"):
        fetch_id_token(
            client_id="no-such-client", username="alice", password="x", region=REGION, cognito_client=cognito
        )


def test_unreachable_endpoint_is_one_line(aws_env: None) -> None:
    # Nothing listens on the discard port: the connection is refused at once (no moto here).
    client = boto3.client(
        "cognito-idp",
        region_name=REGION,
        endpoint_url="http://127.0.0.1:9",
        config=BotocoreConfig(retries={"total_max_attempts": 1}, connect_timeout=2),
    )

    with pytest.raises(CognitoAuthError, match=r"cannot reach Cognito in us-east-1 \(Could not connect") as caught:
        fetch_id_token(client_id="c", username="alice", password="x", region=REGION, cognito_client=client)

    assert "\n" not in str(caught.value)


def test_tenant_of_a_non_jwt_is_an_error() -> None:
    with pytest.raises(CognitoAuthError, match="Cognito ID token: not a JWT"):
        tenant_of("not-a-token")
