"""Sign a load-test user in to an Amazon Cognito user pool and read the tenant its ID token carries.

The API's Cognito authorizer verifies the token; here it is only obtained (USER_PASSWORD_AUTH, the flow the AWS
sample's test user is set up for) and its ``custom:tenant_id`` claim read to label the load-test report.
"""

from __future__ import annotations

from typing import Any

import jwt
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from meterlake.aws import AwsError
from meterlake.records import DEFAULT_TENANT_CLAIM

#: The claim the API's access log attributes requests by.
TENANT_CLAIM = DEFAULT_TENANT_CLAIM

#: What to do when Cognito answers with a challenge instead of tokens, by challenge name.
_CHALLENGE_ADVICE = {
    "NEW_PASSWORD_REQUIRED": (
        "the user must set a new password first: "
        "aws cognito-idp admin-set-user-password --user-pool-id POOL --username USER --password NEW --permanent"
    ),
    "SOFTWARE_TOKEN_MFA": "the user has TOTP MFA; the load test needs a user without MFA",
    "SMS_MFA": "the user has SMS MFA; the load test needs a user without MFA",
    "EMAIL_OTP": "the user has email MFA; the load test needs a user without MFA",
    "MFA_SETUP": "the user pool requires MFA setup; the load test needs a user without MFA",
}

#: What to do about Cognito's error codes, beyond Cognito's own message.
_ERROR_ADVICE = {
    "NotAuthorizedException": "wrong password, disabled user, or a client that needs a secret",
    "UserNotFoundException": "no such user in the client's user pool",
    "UserNotConfirmedException": "confirm the user first (aws cognito-idp admin-confirm-sign-up)",
    "PasswordResetRequiredException": "the user must reset the password first",
    "ResourceNotFoundException": "no app client with this id in this region",
    "InvalidParameterException": "is ALLOW_USER_PASSWORD_AUTH enabled on the app client?",
}


class CognitoAuthError(AwsError):
    """Cognito did not issue an ID token for this user; the message says why and, where it can, what to do."""

    def __init__(self, problem: str, *, username: str | None) -> None:
        self.username = username
        self.problem = problem
        subject = f"Cognito sign-in of {username!r}" if username is not None else "Cognito ID token"
        super().__init__(f"{subject}: {problem}")


def fetch_id_token(
    *, client_id: str, username: str, password: str, region: str, cognito_client: Any | None = None
) -> str:
    """Sign ``username`` in with USER_PASSWORD_AUTH on app client ``client_id`` and return the ID token.

    ``cognito_client`` is a boto3 ``cognito-idp`` client; without one, a client for ``region`` is created.

    Raises:
        CognitoAuthError: wrong credentials, unknown user or client, a challenge (new password, MFA) instead of
            tokens, or Cognito could not be reached.
    """
    if cognito_client is None:
        import boto3  # type: ignore[import-untyped]

        cognito_client = boto3.client("cognito-idp", region_name=region)
    try:
        response = cognito_client.initiate_auth(
            ClientId=client_id,
            AuthFlow="USER_PASSWORD_AUTH",
            AuthParameters={"USERNAME": username, "PASSWORD": password},
        )
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "error"))
        advice = _ERROR_ADVICE.get(code)
        detail = f"{code}: {error.get('Message', exc)}" + (f" ({advice})" if advice else "")
        raise CognitoAuthError(detail, username=username) from exc
    except BotoCoreError as exc:
        raise CognitoAuthError(f"cannot reach Cognito in {region} ({exc})", username=username) from exc
    challenge = response.get("ChallengeName")
    if challenge:
        advice = _CHALLENGE_ADVICE.get(challenge, "complete it outside meterlake, then retry")
        raise CognitoAuthError(f"Cognito asks for {challenge} instead of issuing tokens: {advice}", username=username)
    token = response.get("AuthenticationResult", {}).get("IdToken")
    if not token:
        raise CognitoAuthError("Cognito's answer carries no IdToken", username=username)
    return str(token)


def tenant_of(id_token: str) -> str | None:
    """The ``custom:tenant_id`` claim of an ID token, or None; the signature is NOT checked (labelling only).

    Raises:
        CognitoAuthError: the token is not a JWT.
    """
    try:
        claims = jwt.decode(id_token, options={"verify_signature": False})
    except jwt.DecodeError as exc:
        raise CognitoAuthError(f"not a JWT ({exc})", username=None) from None
    tenant = claims.get(TENANT_CLAIM)
    return tenant if isinstance(tenant, str) and tenant else None
