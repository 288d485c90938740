"""The local user pool: key persistence, JWKS, ID token claims, and every way a Cognito authorizer refuses a token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from meterlake.config import Config, parse_config
from meterlake.lake.home import DataDir
from meterlake.local import auth
from meterlake.local.auth import (
    IdTokenClaims,
    InvalidClaimError,
    InvalidToken,
    SigningKeyError,
    UserPool,
    for_config,
    signing_key_path,
)
from meterlake.records import NO_TENANT_PATTERN

ISSUER = "http://127.0.0.1:8850/local_pool"
CLIENT_ID = "meterlake-local-client"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> DataDir:
    """One data dir (so one RSA key generation) for the module."""
    return DataDir.resolve(tmp_path_factory.mktemp("home"))


@pytest.fixture
def pool(data_dir: DataDir) -> UserPool:
    return UserPool(data_dir=data_dir, issuer=ISSUER, client_id=CLIENT_ID, token_ttl_seconds=300)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def pool_key(data_dir: DataDir) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(signing_key_path(data_dir).read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def id_claims(**overrides: Any) -> dict[str, Any]:
    """Claims of a valid ID token, with ``overrides`` applied (a value of None removes the claim)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(uuid.uuid4()),
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "token_use": "id",
        "auth_time": now,
        "iat": now,
        "exp": now + 300,
        "cognito:username": "mallory",
        "custom:tenant_id": "tenant-x",
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def forge(data_dir: DataDir, pool: UserPool, *, key: rsa.RSAPrivateKey | None = None, **overrides: Any) -> str:
    """An RS256 token with the pool's kid, signed by ``key`` (default: the pool's own key)."""
    signer = key if key is not None else pool_key(data_dir)
    return jwt.encode(id_claims(**overrides), signer, algorithm="RS256", headers={"kid": pool.kid})


def hand_crafted(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{sign(signing_input.encode())}"


def bad_tokens(data_dir: DataDir, pool: UserPool) -> dict[str, str]:
    """Tokens a Cognito authorizer refuses, by why; shared with the gateway tests."""
    public_pem = (
        pool_key(data_dir)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    return {
        "garbage": "not-a-jwt",
        "expired": forge(data_dir, pool, iat=now - 600, exp=now - 60),
        "issued in the future": forge(data_dir, pool, iat=now + 600, exp=now + 900),
        "another key, same kid": forge(
            data_dir, pool, key=rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ),
        "wrong issuer": forge(data_dir, pool, iss="http://127.0.0.1:8850/other_pool"),
        "wrong audience": forge(data_dir, pool, aud="another-client"),
        "access token": forge(data_dir, pool, token_use="access"),
        "no token_use": forge(data_dir, pool, token_use=None),
        "no username": forge(data_dir, pool, **{"cognito:username": None}),
        "unknown kid": jwt.encode(id_claims(), pool_key(data_dir), algorithm="RS256", headers={"kid": "other"}),
        "alg none": hand_crafted({"alg": "none", "typ": "JWT", "kid": pool.kid}, id_claims(), lambda _: ""),
        "HS256 keyed with the public key": hand_crafted(
            {"alg": "HS256", "typ": "JWT", "kid": pool.kid},
            id_claims(),
            lambda data: b64url(hmac.new(public_pem, data, hashlib.sha256).digest()),
        ),
    }


def test_every_bad_token_is_refused_with_a_reason(data_dir: DataDir, pool: UserPool) -> None:
    expected_reason = {
        "garbage": "malformed",
        "expired": "expired",
        "issued in the future": "not yet valid",
        "another key, same kid": "Signature verification failed",
        "wrong issuer": "issuer",
        "wrong audience": "Audience",
        "access token": "'access'",
        "no token_use": "token_use",
        "no username": "cognito:username",
        "unknown kid": "'other'",
        "alg none": "'none'",
        "HS256 keyed with the public key": "'HS256'",
    }
    tokens = bad_tokens(data_dir, pool)
    assert tokens.keys() == expected_reason.keys()
    for case, token in tokens.items():
        with pytest.raises(InvalidToken) as refused:
            pool.verify_id_token(token)
        assert expected_reason[case] in refused.value.reason, case


def test_issued_token_carries_cognito_id_token_claims(pool: UserPool) -> None:
    token = pool.issue_id_token(user="alice", tenant_id="acme", ttl_seconds=120, email="alice@example.com")
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": pool.kid, "typ": "JWT"}
    signing_key = jwt.PyJWK.from_dict(pool.jwks()["keys"][0])
    claims = jwt.decode(token, signing_key, algorithms=["RS256"], audience=CLIENT_ID, issuer=ISSUER)
    assert claims["token_use"] == "id"
    assert claims["cognito:username"] == "alice"
    assert claims["custom:tenant_id"] == "acme"
    assert claims["email"] == "alice@example.com"
    assert claims["exp"] - claims["iat"] == 120
    assert claims["auth_time"] == claims["iat"]
    assert uuid.UUID(claims["sub"]).version == 5
    assert pool.verify_id_token(token) == IdTokenClaims(
        user="alice", tenant_id="acme", client_id=CLIENT_ID, sub=claims["sub"], claims=claims
    )


def test_sub_is_stable_per_user_and_tenant_claim_is_omitted_without_tenant(pool: UserPool) -> None:
    first = pool.verify_id_token(pool.issue_id_token(user="bob", tenant_id=None))
    again = pool.verify_id_token(pool.issue_id_token(user="bob", tenant_id="t", ttl_seconds=60))
    other = pool.verify_id_token(pool.issue_id_token(user="carol", tenant_id=None))
    assert first.tenant_id is None
    assert "custom:tenant_id" not in jwt.decode(
        pool.issue_id_token(user="bob", tenant_id=None), options={"verify_signature": False}
    )
    assert first.sub == again.sub != other.sub


def test_a_remembered_token_still_expires(pool: UserPool, monkeypatch: pytest.MonkeyPatch) -> None:
    token = pool.issue_id_token(user="dave", tenant_id="t", ttl_seconds=60)
    assert pool.verify_id_token(token).user == "dave"
    later = time.time() + 60 + auth.LEEWAY_SECONDS + 1
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(InvalidToken, match="expired"):
        pool.verify_id_token(token)


def test_jwks_kid_is_the_rfc7638_thumbprint() -> None:
    # The example of RFC 7638, section 3.1.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV"
        "4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdA"
        "ZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEg"
        "U8awapJzKnqDKgw",
        "e": "AQAB",
    }
    assert auth._jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_jwks_document_lists_the_signing_key(pool: UserPool, data_dir: DataDir) -> None:
    (key,) = pool.jwks()["keys"]
    assert key.keys() == {"kty", "kid", "use", "alg", "n", "e"}
    assert (key["kty"], key["use"], key["alg"], key["kid"]) == ("RSA", "sig", "RS256", pool.kid)
    numbers = pool_key(data_dir).public_key().public_numbers()
    assert jwt.PyJWK.from_dict(key).key.public_numbers() == numbers
    assert key["kid"] == auth._jwk_thumbprint(key)


def test_key_is_private_and_survives_a_restart(tmp_path: Path) -> None:
    home = DataDir.resolve(tmp_path)
    before = UserPool(data_dir=home, issuer=ISSUER, client_id=CLIENT_ID, token_ttl_seconds=60)
    token = before.issue_id_token(user="erin", tenant_id="t1")
    assert stat.S_IMODE(signing_key_path(home).stat().st_mode) == 0o600
    assert [p.name for p in home.keys.iterdir()] == [auth.SIGNING_KEY_FILE]
    after = UserPool(data_dir=home, issuer=ISSUER, client_id=CLIENT_ID, token_ttl_seconds=60)
    assert after.kid == before.kid
    assert after.verify_id_token(token).tenant_id == "t1"


def test_unusable_key_files_are_refused(tmp_path: Path) -> None:
    home = DataDir.resolve(tmp_path)
    UserPool(data_dir=home, issuer=ISSUER, client_id=CLIENT_ID, token_ttl_seconds=60)
    path = signing_key_path(home)
    path.chmod(0o644)
    with pytest.raises(SigningKeyError, match="accessible to others") as loose:
        UserPool(data_dir=home, issuer=ISSUER, client_id=CLIENT_ID, token_ttl_seconds=60)
    assert loose.value.path == path
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        UserPool(data_dir=home, issuer=ISSUER, client_id=CLIENT_ID, token_ttl_seconds=60)


def test_bad_arguments_are_refused(pool: UserPool, data_dir: DataDir) -> None:
    with pytest.raises(ValueError, match="ttl_seconds must be at least 1, got 0"):
        pool.issue_id_token(user="x", tenant_id=None, ttl_seconds=0)
    with pytest.raises(InvalidClaimError, match="cognito:username '' is empty"):
        pool.issue_id_token(user="", tenant_id=None)
    with pytest.raises(ValueError, match="token_ttl_seconds"):
        UserPool(data_dir=data_dir, issuer=ISSUER, client_id=CLIENT_ID, token_ttl_seconds=0)


def test_for_config_builds_the_issuer_from_the_local_settings(data_dir: DataDir) -> None:
    config = parse_config({"meterlake": {"local": {"port": 9001, "user_pool_id": "pool_7", "client_id": "app-7"}}})
    pool = for_config(config, data_dir)
    assert pool.issuer == "http://127.0.0.1:9001/pool_7"
    assert pool.jwks_url == "http://127.0.0.1:9001/pool_7/.well-known/jwks.json"
    assert pool.client_id == "app-7"
    assert for_config(Config(), data_dir, port=40123).issuer == "http://127.0.0.1:40123/local_pool"
    assert pool.verify_id_token(pool.issue_id_token(user="u", tenant_id=None)).client_id == "app-7"


@pytest.mark.parametrize(
    ("user", "tenant_id", "message"),
    [
        ("alice", "-", r"custom:tenant_id '-' is what the access log writes for no value: it would never be billed"),
        ("alice", "", r"custom:tenant_id '' is empty"),
        ("alice", "acme\ud800", r"custom:tenant_id 'acme\\ud800' is not valid Unicode \(a lone surrogate\)"),
        ("-", "acme", r"cognito:username '-' is what the access log writes for no value"),
        ("\udfff", None, r"cognito:username '\\udfff' is not valid Unicode"),
    ],
)
def test_values_the_access_log_cannot_carry_are_never_issued(
    pool: UserPool, user: str, tenant_id: str | None, message: str
) -> None:
    """A tenant '-' would be stored as no tenant and never billed; a lone surrogate cannot be logged at all."""
    with pytest.raises(InvalidClaimError, match=message) as refused:
        pool.issue_id_token(user=user, tenant_id=tenant_id)
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize("tenant_id", [" ", "\t", " - ", "\r\n-\f"])
def test_a_blank_tenant_is_never_issued(pool: UserPool, tenant_id: str) -> None:
    with pytest.raises(InvalidClaimError, match="is blank: the lake stores it as no tenant and never bills it"):
        pool.issue_id_token(user="alice", tenant_id=tenant_id)


@pytest.mark.parametrize("tenant_id", ["-acme", "a-b", "--", "- -", "\u2014", "ac me", "\U0001f600", "\v", "\u00a0"])
def test_tenant_ids_that_merely_look_odd_are_issued_and_verified(pool: UserPool, tenant_id: str) -> None:
    assert pool.verify_id_token(pool.issue_id_token(user="u", tenant_id=tenant_id)).tenant_id == tenant_id


def test_the_pool_refuses_exactly_the_tenants_the_lake_reads_as_no_tenant(pool: UserPool) -> None:
    """The rule is records.NO_TENANT_PATTERN matched as the transform and the meters match it (RE2, via pyarrow)."""
    candidates = ["-", " ", "\t", "\n", "\r", "\f", "\v", "\u00a0", "\u2003", " - ", "--", "- -", "-x", "x", " x "]
    lake_no_tenant = pc.match_substring_regex(pa.array(candidates), NO_TENANT_PATTERN).to_pylist()
    refused = []
    for tenant_id in candidates:
        try:
            pool.issue_id_token(user="u", tenant_id=tenant_id)
        except InvalidClaimError:
            refused.append(True)
        else:
            refused.append(False)
    assert refused == lake_no_tenant


@pytest.mark.parametrize("claim", ["custom:tenant_id", "cognito:username"])
def test_a_claim_with_a_lone_surrogate_is_refused_like_any_bad_token(
    data_dir: DataDir, pool: UserPool, claim: str
) -> None:
    """Signed by the pool's key, but JSON escapes a lone surrogate no Cognito pool would issue (no UTF-8 form)."""
    surrogate: dict[str, Any] = {claim: "t\ud800"}
    token = forge(data_dir, pool, **surrogate)
    with pytest.raises(InvalidToken, match=f"{claim} 't\\\\ud800' is not valid Unicode"):
        pool.verify_id_token(token)
