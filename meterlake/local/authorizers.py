"""Local stand-ins of API Gateway's authorizers, one per tenant source: each yields the ``$context`` variables it fills.

The gateway fills the access log's tenant and user fields by looking up the variables the configured
:class:`~meterlake.records.TenantSource` names in what the authorizer yielded, so a source naming a variable its
authorizer does not fill logs no tenant here as it would on AWS:

- a Cognito user-pool authorizer fills ``context.authorizer.claims['<claim>']`` (and ``.claims.<claim>``) with each
  claim of the ID token in ``Authorization``;
- a Lambda TOKEN authorizer, standing in for one that checks a JWT from the team's identity provider (here the local
  pool's), returns ``principalId`` (the user name) and one context key holding the tenant;
- API keys: ``x-api-key`` must be one of the stage's keys, whose id fills ``context.identity.apiKeyId``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Protocol

from meterlake.config import Config
from meterlake.local.auth import IdTokenClaims, InvalidToken, LocalApiKeys, UserPool
from meterlake.records import API_KEY_HEADER, TenantSourceKind

logger = logging.getLogger(__name__)

#: A claim name API Gateway's dot notation (``claims.<name>``) can spell; others need ``claims['<name>']``.
_DOTTED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Refused(Exception):  # noqa: N818 - an answer, not an error of the gateway
    """The authorizer turned the request away: API Gateway's answer, and why (for the server log only)."""

    def __init__(self, *, status: int, message: str, error_type: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.reason = reason


#: API Gateway's answer when a Cognito or Lambda TOKEN authorizer finds no token, or refuses it: status, message,
#: and the error type it names in ``x-amzn-ErrorType``.
UNAUTHORIZED = (401, "Unauthorized", "UnauthorizedException")
#: API Gateway's answer to a method that requires an API key, without a valid one.
FORBIDDEN = (403, "Forbidden", "ForbiddenException")


class Authorizer(Protocol):
    """Decides whether a request reaches the integration, and what it contributes to ``$context``."""

    def authorize(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The ``$context`` variables (without ``$``) this authorizer fills for a request with these headers.

        Raises:
            Refused: the request is turned away.
        """
        ...


def _bearer_token(header: str | None) -> str | None:
    """The token from ``Authorization``: raw (as Cognito authorizers take it) or ``Bearer <token>``."""
    if header is None:
        return None
    value = header.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value or None


def _refused(answer: tuple[int, str, str], reason: str) -> Refused:
    status, message, error_type = answer
    return Refused(status=status, message=message, error_type=error_type, reason=reason)


def _verified_token(pool: UserPool, headers: Mapping[str, str]) -> IdTokenClaims:
    """The pool's verified ID token from ``Authorization``; API Gateway's 401 when it is missing or refused."""
    token = _bearer_token(headers.get("authorization"))
    if token is None:
        raise _refused(UNAUTHORIZED, "no Authorization header")
    try:
        return pool.verify_id_token(token)
    except InvalidToken as exc:
        raise _refused(UNAUTHORIZED, exc.reason) from None


class CognitoAuthorizer:
    """A Cognito user-pool authorizer: a valid ID token in ``Authorization`` (raw or ``Bearer``), or 401."""

    def __init__(self, pool: UserPool) -> None:
        self._pool = pool

    def authorize(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """Every string claim of the verified token, under both of API Gateway's spellings."""
        verified = _verified_token(self._pool, headers)
        variables: dict[str, str] = {}
        for name, value in verified.claims.items():
            if not isinstance(value, str | int):
                continue
            variables[f"context.authorizer.claims['{name}']"] = str(value)
            if _DOTTED_NAME.match(name):
                variables[f"context.authorizer.claims.{name}"] = str(value)
        return variables


class LambdaTokenAuthorizer:
    """A Lambda TOKEN authorizer that checks the pool's ID tokens and returns the tenant in its context.

    Its answer, as such a function returns it: ``principalId`` the user name, ``context`` ``{<key>: tenant}`` (the
    key absent for a user with no tenant). A missing or refused token is API Gateway's 401.
    """

    def __init__(self, pool: UserPool, context_key: str) -> None:
        self._pool = pool
        self._context_key = context_key

    def authorize(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """``principalId`` and the context key, as ``$context.authorizer.<name>``."""
        verified = _verified_token(self._pool, headers)
        context = {} if verified.tenant_id is None else {self._context_key: verified.tenant_id}
        return {"context.authorizer.principalId": verified.user} | {
            f"context.authorizer.{key}": value for key, value in context.items()
        }


class ApiKeyAuthorizer:
    """A stage whose methods require an API key: ``x-api-key`` must be one of its keys, or 403 Forbidden."""

    def __init__(self, keys: LocalApiKeys) -> None:
        self._keys = keys

    def authorize(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The key's id, as ``$context.identity.apiKeyId``."""
        value = headers.get(API_KEY_HEADER)
        if not value:
            raise _refused(FORBIDDEN, f"no {API_KEY_HEADER} header")
        key_id = self._keys.key_id(value)
        if key_id is None:
            raise _refused(FORBIDDEN, f"{API_KEY_HEADER} is not a key of this stage")
        return {"context.identity.apiKeyId": key_id}


def authorizer_for(config: Config, pool: UserPool) -> Authorizer:
    """The authorizer of the configured tenant source (``meterlake.tenant_source.kind``)."""
    source = config.meterlake.tenant_source
    kind = TenantSourceKind(source.kind)
    if kind is TenantSourceKind.AUTHORIZER_CONTEXT:
        return LambdaTokenAuthorizer(pool, source.context_key)
    if kind is TenantSourceKind.API_KEY:
        return ApiKeyAuthorizer(LocalApiKeys.for_config(config, pool))
    return CognitoAuthorizer(pool)
