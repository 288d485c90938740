"""Callers: API keys stored as digests, Cognito-style tokens, and what admins and tenants may do."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import jwt
import pytest

from meterlake.amberflo.api import RequestError, UsageQuery
from meterlake.config import Config
from meterlake.lake.home import DataDir
from meterlake.local.auth import for_config
from meterlake.service import auth
from meterlake.service.auth import (
    ApiKeys,
    Authenticator,
    JwtVerifier,
    Principal,
    require_admin,
    require_customer,
    scope_usage_query,
)
from meterlake.service.store import ServiceStore


@pytest.fixture
def keys(tmp_path: Path) -> ApiKeys:
    return ApiKeys(ServiceStore(tmp_path / "registry.db"))


def test_keys_are_stored_as_digests_and_verified(keys: ApiKeys, tmp_path: Path) -> None:
    admin, admin_key = keys.create(role="admin", label="ops")
    acme, acme_key = keys.create(role="tenant", customer_id="acme")
    assert keys.verify(admin_key) == Principal("admin", None, admin.key_id, "api_key")
    assert keys.verify(acme_key) == Principal("tenant", "acme", acme.key_id, "api_key")
    stored = sqlite3.connect(tmp_path / "registry.db").execute("SELECT * FROM api_keys").fetchall()
    secrets = [key.split("_", 2)[2] for key in (admin_key, acme_key)]
    assert not any(secret.encode() in repr(row).encode() for row in stored for secret in secrets)
    assert [info.key_id for info in keys.list_keys()] == [admin.key_id, acme.key_id]


def test_wrong_or_revoked_keys_are_401(keys: ApiKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    info, key = keys.create(role="tenant", customer_id="acme")
    for bad in ("", "nope", f"mlk_{info.key_id}_wrong", key + "x", "mlk__", key.replace(info.key_id, "0" * 12)):
        with pytest.raises(RequestError) as refused:
            keys.verify(bad)
        assert refused.value.status == 401
    assert keys.verify(key).customer_id == "acme"
    assert keys.revoke(info.key_id)
    assert not keys.revoke(info.key_id)
    with pytest.raises(RequestError, match="revoked"):
        keys.verify(key)


def test_a_revocation_from_another_process_holds_within_the_cache_time(keys: ApiKeys, tmp_path: Path) -> None:
    info, key = keys.create(role="admin")
    keys.verify(key)
    other = ApiKeys(ServiceStore(tmp_path / "registry.db"))  # as `meterlake keys revoke` does
    other.revoke(info.key_id)
    time.sleep(auth.KEY_CACHE_SECONDS + 0.05)
    with pytest.raises(RequestError, match="revoked"):
        keys.verify(key)


def test_key_roles_are_checked_when_made(keys: ApiKeys) -> None:
    with pytest.raises(ValueError, match="tenant key needs a customerId"):
        keys.create(role="tenant")
    with pytest.raises(ValueError, match="only a tenant key"):
        keys.create(role="admin", customer_id="acme")
    with pytest.raises(ValueError, match="blank"):
        keys.create(role="tenant", customer_id=" ")


def test_tokens_give_admins_tenants_and_users(tmp_path: Path) -> None:
    config = Config()
    pool = for_config(config, DataDir(tmp_path).ensure())
    verifier = JwtVerifier(
        jwks=pool.jwks(),
        issuer=pool.issuer,
        client_id=pool.client_id,
        admin_group="admins",
        tenant_claim=pool.tenant_claim,
    )
    admin = verifier.verify(pool.issue_access_token(user="ops", groups=["admins"]))
    assert (admin.kind, admin.name, admin.via) == ("admin", "ops", "jwt")
    assert verifier.verify(pool.issue_id_token(user="alice", tenant_id="acme")) == Principal(
        "tenant", "acme", "alice", "jwt"
    )
    assert verifier.verify(pool.issue_access_token(user="bob", groups=["readers"])).kind == "user"
    other = for_config(config, DataDir(tmp_path / "other").ensure())
    now = int(time.time())
    expired_claims = {
        "sub": "s",
        "iss": pool.issuer,
        "client_id": pool.client_id,
        "token_use": "access",
        "iat": now - 3600,
        "exp": now - 600,
        "username": "ops",
        "cognito:groups": ["admins"],
    }
    refusals = {
        "expired": jwt.encode(expired_claims, pool._private_key, algorithm="RS256", headers={"kid": pool.kid}),
        "another pool": other.issue_access_token(user="ops", groups=["admins"]),
        "another client": jwt.encode(
            {**expired_claims, "exp": now + 600, "client_id": "other"},
            pool._private_key,
            algorithm="RS256",
            headers={"kid": pool.kid},
        ),
        "a refresh token": jwt.encode(
            {**expired_claims, "exp": now + 600, "token_use": "refresh"},
            pool._private_key,
            algorithm="RS256",
            headers={"kid": pool.kid},
        ),
        "not a token": "abc",
        "HS256": jwt.encode({"token_use": "access"}, "s" * 32, algorithm="HS256"),
    }
    for what, token in refusals.items():
        with pytest.raises(RequestError) as refused:
            verifier.verify(token)
        assert refused.value.status == 401, what


def test_the_authenticator_takes_bearer_tokens_then_keys(keys: ApiKeys) -> None:
    _, key = keys.create(role="admin")
    authenticator = Authenticator(keys=keys, tokens=None)
    assert authenticator.authenticate(None, key).is_admin
    for authorization, api_key, message in (
        (None, None, "no credentials"),
        ("Basic abc", None, "Bearer"),
        ("Bearer token", key, "takes no tokens"),
    ):
        with pytest.raises(RequestError, match=message) as refused:
            authenticator.authenticate(authorization, api_key)
        assert refused.value.status == 401


def _query(**filters: frozenset[str]) -> UsageQuery:
    return UsageQuery("llm-tokens", None, "DAY", 0, 86400, ("customerId",), filters, None, False)


def test_what_admins_tenants_and_users_may_do() -> None:
    admin = Principal("admin", None, "k1", "api_key")
    acme = Principal("tenant", "acme", "k2", "api_key")
    user = Principal("user", None, "u", "jwt")
    require_admin(admin, "creating meters")
    require_customer(admin, ["anyone"])
    require_customer(acme, ["acme", "acme"])
    for principal, call in (
        (acme, lambda: require_admin(acme, "creating meters")),
        (acme, lambda: require_customer(acme, ["acme", "globex"])),
        (user, lambda: require_customer(user, [])),
        (acme, lambda: scope_usage_query(acme, _query(customerId=frozenset({"globex"})))),
    ):
        with pytest.raises(RequestError) as refused:
            call()
        assert refused.value.status == 403, principal
    assert scope_usage_query(admin, _query()) == _query()
    assert scope_usage_query(acme, _query()).filters == {"customerId": frozenset({"acme"})}
    assert scope_usage_query(acme, _query(customerId=frozenset({"acme"}))).filters == {
        "customerId": frozenset({"acme"})
    }
