"""A local stand-in for an Amazon Cognito user pool: it signs ID tokens and verifies them like a Cognito authorizer.

The RS256 signing key lives in the data dir (created on first use, mode 0600) so tokens survive a restart, and is
published as a JWKS document exactly where Cognito publishes it: ``<issuer>/.well-known/jwks.json``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from meterlake.config import Config
from meterlake.lake.home import DataDir
from meterlake.records import DEFAULT_TENANT_CLAIM, MISSING, NO_TENANT_PATTERN_PYTHON, TenantSourceKind

#: The only algorithm a Cognito user pool signs with, and the only one accepted here.
ALGORITHM = "RS256"
#: Where, under the issuer URL, the pool publishes its public keys.
JWKS_PATH = "/.well-known/jwks.json"
#: Name of the PEM file holding the pool's private key, under ``DataDir.keys``.
SIGNING_KEY_FILE = "user-pool-rs256.pem"
#: Clock skew tolerated on ``exp`` and ``iat``, in seconds.
LEEWAY_SECONDS = 5
#: How many verified tokens are remembered, as API Gateway caches a Cognito authorizer's result per token.
VERIFIED_TOKEN_CACHE_SIZE = 4096

_KEY_SIZE = 2048
_PUBLIC_EXPONENT = 65537
#: ``token_use`` of an ID token; a Cognito authorizer refuses access tokens.
_ID_TOKEN_USE = "id"  # noqa: S105 - a claim value, not a secret
_USER_CLAIM = "cognito:username"
_REQUIRED_CLAIMS = ["sub", "iss", "aud", "exp", "iat", "token_use", _USER_CLAIM]
#: Further claims the pool writes into every token it issues (or on request, ``email``).
_ISSUED_CLAIMS = ("auth_time", "email")
_NO_TENANT = re.compile(NO_TENANT_PATTERN_PYTHON)
#: Namespace of the ``sub`` uuid5s, so one user name always maps to the same subject.
_SUBJECT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:meterlake:local-user-pool:users")


class InvalidToken(Exception):  # noqa: N818 - the name the gateway and its callers agreed on
    """A token a Cognito authorizer would refuse; ``reason`` says why (for logs, never for the client)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidClaimError(ValueError):
    """A claim value the pool refuses to issue, because it would not reach the lake as itself.

    API Gateway writes ``-`` for a claim it has no value for, so a user named ``-`` reads as none downstream, and a
    tenant that is blank or ``-`` (``records.NO_TENANT_PATTERN``) is stored as no tenant and never billed; an empty
    value is no value either; and a string with a lone surrogate cannot be encoded as UTF-8 (RFC 7493, I-JSON,
    forbids it in JSON), so it can be neither logged nor verified.
    """

    def __init__(self, claim: str, value: str, problem: str) -> None:
        super().__init__(f"{claim} {value!r} {problem}")
        self.claim = claim
        self.value = value


class SigningKeyError(Exception):
    """The signing key file exists but cannot be used (unreadable, not an RSA PEM key, or readable by others)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass(frozen=True, slots=True)
class IdTokenClaims:
    """What the API needs from a verified ID token; ``tenant_id`` is None when the user has no tenant claim.

    ``claims`` holds every claim, as a Cognito authorizer hands them to ``$context.authorizer.claims``.
    """

    user: str
    tenant_id: str | None
    client_id: str
    sub: str
    claims: Mapping[str, Any] = field(default_factory=dict)


def signing_key_path(data_dir: DataDir) -> Path:
    """The PEM file holding the local pool's RSA private key."""
    return data_dir.keys / SIGNING_KEY_FILE


def issuer_url(*, host: str, port: int, user_pool_id: str) -> str:
    """The pool's issuer, shaped like Cognito's ``https://cognito-idp.<region>.amazonaws.com/<pool id>``."""
    authority = f"[{host}]" if ":" in host else host
    return f"http://{authority}:{port}/{user_pool_id}"


def for_config(config: Config, data_dir: DataDir, *, port: int | None = None) -> UserPool:
    """Build the user pool described by ``config.meterlake.local``; ``port`` overrides the configured one.

    Raises:
        SigningKeyError: the existing key file cannot be used.
    """
    local = config.meterlake.local
    source = config.meterlake.tenant_source
    return UserPool(
        data_dir=data_dir,
        issuer=issuer_url(host=local.host, port=local.port if port is None else port, user_pool_id=local.user_pool_id),
        client_id=local.client_id,
        token_ttl_seconds=local.token_ttl_seconds,
        tenant_claim=source.claim if source.kind == TenantSourceKind.COGNITO_CLAIM.value else DEFAULT_TENANT_CLAIM,
    )


class UserPool:
    """Issues RS256 ID tokens carrying Cognito's claims and verifies them as a Cognito user-pool authorizer does."""

    def __init__(
        self,
        *,
        data_dir: DataDir,
        issuer: str,
        client_id: str,
        token_ttl_seconds: int,
        tenant_claim: str = DEFAULT_TENANT_CLAIM,
    ) -> None:
        """Load the signing key from the data dir (created on first use); tokens carry the tenant as ``tenant_claim``.

        Raises:
            SigningKeyError: the existing key file cannot be used.
            ValueError: ``token_ttl_seconds`` is not positive.
        """
        if token_ttl_seconds < 1:
            raise ValueError(f"token_ttl_seconds must be at least 1, got {token_ttl_seconds}")
        if tenant_claim in _REQUIRED_CLAIMS or tenant_claim in _ISSUED_CLAIMS:
            raise ValueError(f"tenant claim {tenant_claim!r} is one the pool sets itself")
        self.issuer = issuer
        self.client_id = client_id
        self.token_ttl_seconds = token_ttl_seconds
        self.tenant_claim = tenant_claim
        self._private_key = _load_or_create_key(signing_key_path(data_dir))
        # Verifying with the key object (not PEM text) spares PyJWT a parse per request.
        self._public_key = self._private_key.public_key()
        self._public_jwk = _public_jwk(self._public_key)
        self.kid = _jwk_thumbprint(self._public_jwk)
        # token -> (claims, exp): an RS256 check costs ~0.1 ms, a lookup ~1 µs; expiry is still checked per call.
        self._verified: dict[str, tuple[IdTokenClaims, int]] = {}
        self._verified_lock = threading.Lock()

    @property
    def jwks_url(self) -> str:
        """Where the pool's JWKS document is served."""
        return self.issuer + JWKS_PATH

    def jwks(self) -> dict[str, Any]:
        """The JWKS document listing the pool's one public signing key."""
        return {"keys": [{**self._public_jwk, "kid": self.kid, "use": "sig", "alg": ALGORITHM}]}

    def derive_secret(self, purpose: str) -> bytes:
        """A secret for ``purpose`` only this pool's key holder can compute (e.g. the local API keys' values)."""
        der = self._private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return hmac.new(der, purpose.encode(), hashlib.sha256).digest()

    def issue_id_token(
        self, *, user: str, tenant_id: str | None, ttl_seconds: int | None = None, email: str | None = None
    ) -> str:
        """Sign an ID token for ``user``, as Cognito's InitiateAuth would return it.

        A user name must be non-empty and not ``-`` (what the access log writes for "no value"), a tenant id must not
        be blank or ``-`` (no tenant to the transform and the meters), and both must be valid Unicode; see
        :class:`InvalidClaimError`.

        Raises:
            InvalidClaimError: ``user`` or ``tenant_id`` breaks that rule.
            ValueError: ``ttl_seconds`` is not positive.
        """
        _check_claim_value(_USER_CLAIM, user)
        if tenant_id is not None:
            _check_claim_value(self.tenant_claim, tenant_id, tenant=True)
        ttl = self.token_ttl_seconds if ttl_seconds is None else ttl_seconds
        if ttl < 1:
            raise ValueError(f"ttl_seconds must be at least 1, got {ttl}")
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": str(uuid.uuid5(_SUBJECT_NAMESPACE, user)),
            "iss": self.issuer,
            "aud": self.client_id,
            "token_use": _ID_TOKEN_USE,
            "auth_time": now,
            "iat": now,
            "exp": now + ttl,
            _USER_CLAIM: user,
        }
        if tenant_id is not None:
            claims[self.tenant_claim] = tenant_id
        if email is not None:
            claims["email"] = email
        return jwt.encode(claims, self._private_key, algorithm=ALGORITHM, headers={"kid": self.kid})

    def issue_access_token(
        self,
        *,
        user: str,
        groups: Iterable[str] = (),
        ttl_seconds: int | None = None,
        scope: str = "aws.cognito.signin.user.admin",
    ) -> str:
        """Sign an access token for ``user`` in ``groups`` (``cognito:groups``), as Cognito's InitiateAuth returns it
        beside the ID token: ``token_use`` access, the app client in ``client_id`` (no ``aud``). Control planes, such
        as the SaaS Builder Toolkit's, authorize callers with it.

        Raises:
            InvalidClaimError: ``user`` is empty, ``-`` or not valid Unicode.
            ValueError: ``ttl_seconds`` is not positive.
        """
        _check_claim_value(_USER_CLAIM, user)
        ttl = self.token_ttl_seconds if ttl_seconds is None else ttl_seconds
        if ttl < 1:
            raise ValueError(f"ttl_seconds must be at least 1, got {ttl}")
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": str(uuid.uuid5(_SUBJECT_NAMESPACE, user)),
            "iss": self.issuer,
            "client_id": self.client_id,
            "token_use": "access",
            "scope": scope,
            "auth_time": now,
            "iat": now,
            "exp": now + ttl,
            "jti": str(uuid.uuid4()),
            "username": user,
        }
        group_list = list(groups)
        if group_list:
            claims["cognito:groups"] = group_list
        return jwt.encode(claims, self._private_key, algorithm=ALGORITHM, headers={"kid": self.kid})

    def verify_id_token(self, token: str) -> IdTokenClaims:
        """Check signature, algorithm, key id, lifetime, issuer, audience and token use; return the claims.

        A token that passed is remembered (up to ``VERIFIED_TOKEN_CACHE_SIZE`` of them) and then only its expiry
        is checked again: the same bytes carry the same signature and claims.

        Raises:
            InvalidToken: the token would be refused by a Cognito authorizer; ``reason`` says why.
        """
        with self._verified_lock:
            hit = self._verified.get(token)
        if hit is not None:
            if time.time() > hit[1] + LEEWAY_SECONDS:
                raise InvalidToken("ExpiredSignatureError: Signature has expired")
            return hit[0]
        verified, expires_at = self._verify(token)
        with self._verified_lock:
            if len(self._verified) >= VERIFIED_TOKEN_CACHE_SIZE:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = (verified, expires_at)
        return verified

    def _verify(self, token: str) -> tuple[IdTokenClaims, int]:
        """Fully verify ``token``; return its claims and ``exp``."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise InvalidToken(f"algorithm {alg!r} is not {ALGORITHM}")
        kid = header.get("kid")
        if kid != self.kid:
            raise InvalidToken(f"unknown key id {kid!r}")
        try:
            claims = jwt.decode(
                token,
                self._public_key,
                algorithms=[ALGORITHM],
                audience=self.client_id,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.InvalidIssuerError:
            # The usual cause locally: a token issued for another port than the gateway serving (the issuer names it).
            issued_by = jwt.decode(token, options={"verify_signature": False}).get("iss")
            raise InvalidToken(f"InvalidIssuerError: token issuer {issued_by!r} is not {self.issuer!r}") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"{type(exc).__name__}: {exc}") from None
        token_use = claims["token_use"]
        if token_use != _ID_TOKEN_USE:
            raise InvalidToken(f"token_use {token_use!r} is not {_ID_TOKEN_USE!r}")
        user = claims[_USER_CLAIM]
        tenant_id = claims.get(self.tenant_claim)
        sub = claims["sub"]
        if not isinstance(user, str) or not user:
            raise InvalidToken(f"{_USER_CLAIM} {user!r} is not a non-empty string")
        if tenant_id is not None and not isinstance(tenant_id, str):
            raise InvalidToken(f"{self.tenant_claim} {tenant_id!r} is not a string")
        for name, value in ((_USER_CLAIM, user), (self.tenant_claim, tenant_id)):
            # JSON can escape a lone surrogate ("\ud800"); no Cognito pool issues one, and it has no UTF-8 form.
            if value is not None and not _is_unicode(value):
                raise InvalidToken(f"{name} {value!r} is not valid Unicode (a lone surrogate)")
        if not isinstance(sub, str):
            raise InvalidToken(f"sub {sub!r} is not a string")
        verified = IdTokenClaims(user=user, tenant_id=tenant_id, client_id=self.client_id, sub=sub, claims=claims)
        return verified, int(claims["exp"])


def _check_claim_value(claim: str, value: str, *, tenant: bool = False) -> None:
    """Refuse a user or tenant value that would not reach the lake as itself (see InvalidClaimError)."""
    if not value:
        raise InvalidClaimError(claim, value, "is empty: the access log would record no value")
    if value == MISSING:
        raise InvalidClaimError(claim, value, "is what the access log writes for no value: it would never be billed")
    if tenant and _NO_TENANT.fullmatch(value):
        raise InvalidClaimError(claim, value, "is blank: the lake stores it as no tenant and never bills it")
    if not _is_unicode(value):
        raise InvalidClaimError(claim, value, "is not valid Unicode (a lone surrogate): it has no UTF-8 form")


def _is_unicode(value: str) -> bool:
    """Whether ``value`` is valid Unicode text, i.e. has a UTF-8 encoding (no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _load_or_create_key(path: Path) -> rsa.RSAPrivateKey:
    """Read the pool's key, or create it so that concurrent first starts still agree on one key."""
    try:
        return _load_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = rsa.generate_private_key(public_exponent=_PUBLIC_EXPONENT, key_size=_KEY_SIZE)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Write a private temp file, then link it into place: the key appears whole or not at all, and if another
    # process got there first, its key wins and ours is discarded.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink()
    return _load_key(path)


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    """Read and check the PEM key at ``path``; FileNotFoundError if there is none yet."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SigningKeyError(path, f"cannot read the signing key ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(path, f"the signing key is accessible to others (mode {stat.filemode(mode)}); chmod 600")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(path, f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < _KEY_SIZE:
        raise SigningKeyError(path, f"not an RSA key of at least {_KEY_SIZE} bits")
    return key


def _b64url_uint(value: int) -> str:
    """Base64url (unpadded) of an unsigned big-endian integer, as JWK's ``n`` and ``e`` are written."""
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _public_jwk(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """The RSA public key's required JWK members: ``kty``, ``n``, ``e``."""
    numbers = public_key.public_numbers()
    return {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}


def _jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 thumbprint: SHA-256 of the required members, sorted, without whitespace; base64url."""
    canonical = json.dumps({name: jwk[name] for name in ("e", "kty", "n")}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


#: What the local API keys' values derive from (with the user pool's key, so they survive a restart).
_API_KEY_PURPOSE = "meterlake local API keys v1"
#: Characters of a local API key's value; API Gateway's values are 20 to 128 characters.
_API_KEY_LENGTH = 40


class LocalApiKeys:
    """The local stand-in of API Gateway's API keys: one per configured key id, its value derived from a secret.

    API Gateway identifies a request's key by its value (``x-api-key``) and logs its id
    (``$context.identity.apiKeyId``); here the ids are the configured ``tenants_by_api_key`` keys.
    """

    def __init__(self, secret: bytes, key_ids: Iterable[str]) -> None:
        self._secret = secret
        self._ids_by_value = {self.value(key_id): key_id for key_id in key_ids}

    @classmethod
    def for_config(cls, config: Config, pool: UserPool) -> LocalApiKeys:
        """The keys of ``config``'s ``tenants_by_api_key``, their values derived from ``pool``'s key."""
        return cls(pool.derive_secret(_API_KEY_PURPOSE), config.meterlake.tenant_source.tenants_by_api_key)

    def value(self, key_id: str) -> str:
        """The value a caller sends in ``x-api-key`` for the key ``key_id``."""
        digest = hmac.new(self._secret, key_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii")[:_API_KEY_LENGTH]

    def key_id(self, value: str) -> str | None:
        """The id of the key whose value is ``value``; None for a value that is no key."""
        return self._ids_by_value.get(value)
