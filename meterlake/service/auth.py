"""Who may call the metering service, and what each caller may do.

Two kinds of caller, as users of the SaaS Builder Toolkit and of Amberflo expect:

* ``Authorization: Bearer <JWT>``: a Cognito-style token (an access token, as the toolkit's control plane sends, or
  an ID token), RS256-signed by the user pool's key, checked for issuer, client, lifetime and use. A member of the
  admin group (``cognito:groups``) is an admin; a token carrying the tenant claim is that tenant.
* ``X-API-KEY: <key>``: an admin key, or a tenant-scoped key bound to one customerId. Keys are created and revoked
  with the CLI (``meterlake keys``) and stored as SHA-256 digests of their random secrets: the database never holds
  a usable key.

An admin may do everything. A tenant may only ingest records of its own customerId and read its own usage; anything
else is 403. No credential, or a bad one, is 401.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jwt

from meterlake.amberflo.api import CUSTOMER_KEY, RequestError, UsageQuery
from meterlake.service.store import ServiceStore

KEY_PREFIX = "mlk"
#: How long a verified key is trusted before it is looked up again: a revocation takes effect within this.
KEY_CACHE_SECONDS = 1.0
LEEWAY_SECONDS = 5
_ALGORITHM = "RS256"
_KEY_ID_BYTES = 6
_SECRET_BYTES = 32
_TOKEN_USES = frozenset({"access", "id"})

Role = Literal["admin", "tenant"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: an admin, a tenant (``customer_id``), or a user with neither right."""

    kind: Literal["admin", "tenant", "user"]
    customer_id: str | None
    #: The key id or the token's user, for logs.
    name: str
    via: Literal["api_key", "jwt"]

    @property
    def is_admin(self) -> bool:
        """True for an admin."""
        return self.kind == "admin"


def forbidden(message: str) -> RequestError:
    """A 403 naming what was refused."""
    return RequestError(message, status=403)


def unauthorized(message: str) -> RequestError:
    """A 401: no credential, or one that is not valid."""
    return RequestError(message, status=401)


def require_admin(principal: Principal, action: str) -> None:
    """Only an admin may ``action``.

    Raises:
        RequestError: (403) the caller is not an admin.
    """
    if not principal.is_admin:
        raise forbidden(f"{action} needs an admin key or a token of the admin group; this caller is {_who(principal)}")


def require_customer(principal: Principal, customer_ids: Iterable[str]) -> None:
    """A tenant may only act on its own customerId.

    Raises:
        RequestError: (403) a tenant names another customer, or the caller is neither admin nor tenant.
    """
    if principal.is_admin:
        return
    if principal.kind != "tenant":
        raise forbidden(f"{_who(principal)} may not ingest or read usage")
    others = sorted({customer for customer in customer_ids if customer != principal.customer_id})
    if others:
        raise forbidden(f"{_who(principal)} may only use its own customerId, not {others[:5]}")


def scope_usage_query(principal: Principal, query: UsageQuery) -> UsageQuery:
    """The query a caller may run: an admin's as it is; a tenant's narrowed to its own customerId.

    Raises:
        RequestError: (403) a tenant filters on other customers, or the caller may not read usage.
    """
    if principal.is_admin:
        return query
    require_customer(principal, query.filters.get(CUSTOMER_KEY, ()))
    assert principal.customer_id is not None  # a tenant has one
    filters = {**query.filters, CUSTOMER_KEY: frozenset({principal.customer_id})}
    return UsageQuery(
        query.meter_api_name,
        query.aggregation,
        query.interval,
        query.start_s,
        query.end_s,
        query.group_by,
        filters,
        query.take_limit,
        query.take_ascending,
    )


def _who(principal: Principal) -> str:
    if principal.kind == "tenant":
        return f"tenant {principal.customer_id!r}"
    return "an admin" if principal.is_admin else f"{principal.name!r} (neither admin nor tenant)"


# -- API keys -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """A stored key, without its secret."""

    key_id: str
    role: Role
    customer_id: str | None
    label: str
    created_ms: int
    revoked_ms: int | None


class ApiKeys:
    """The service's X-API-KEY keys, stored as digests in the service's database."""

    def __init__(self, store: ServiceStore) -> None:
        self._store = store
        self._verified: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def create(self, *, role: Role, customer_id: str | None = None, label: str = "") -> tuple[ApiKeyInfo, str]:
        """Make a key; returns its record and the key itself (shown once, never stored).

        Raises:
            ValueError: a tenant key without a customerId, or an admin key with one.
        """
        if (role == "tenant") != (customer_id is not None):
            raise ValueError("a tenant key needs a customerId, and only a tenant key has one")
        if customer_id is not None and not customer_id.strip():
            raise ValueError(f"customerId {customer_id!r} is blank")
        key_id = secrets.token_hex(_KEY_ID_BYTES)
        secret = secrets.token_urlsafe(_SECRET_BYTES)
        now = time.time_ns() // 1_000_000
        with self._store.transaction() as db:
            db.execute(
                "INSERT INTO api_keys (id, secret_sha256, role, customer_id, label, created_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, _digest(secret), role, customer_id, label, now),
            )
        info = ApiKeyInfo(key_id, role, customer_id, label, now, None)
        return info, f"{KEY_PREFIX}_{key_id}_{secret}"

    def list_keys(self) -> list[ApiKeyInfo]:
        """Every key ever made, oldest first (revoked ones say when)."""
        rows = self._store.query(
            "SELECT id, role, customer_id, label, created_ms, revoked_ms FROM api_keys ORDER BY rowid"
        )
        return [
            ApiKeyInfo(str(i), "admin" if r == "admin" else "tenant", c, str(lbl), int(made), rev)
            for i, r, c, lbl, made, rev in rows
        ]

    def revoke(self, key_id: str) -> bool:
        """Revoke a key (kept, marked revoked); False if there is no such active key."""
        now = time.time_ns() // 1_000_000
        with self._store.transaction() as db:
            changed = db.execute(
                "UPDATE api_keys SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL", (now, key_id)
            ).rowcount
        with self._lock:
            self._verified.clear()
        return bool(changed)

    def verify(self, presented: str) -> Principal:
        """The caller a key stands for.

        Raises:
            RequestError: (401) not a key of this service, or revoked.
        """
        now = time.monotonic()
        with self._lock:
            hit = self._verified.get(presented)
        if hit is not None and now - hit[1] < KEY_CACHE_SECONDS:
            return hit[0]
        prefix, _, rest = presented.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != KEY_PREFIX or not key_id or not secret:
            raise unauthorized("X-API-KEY is not a key of this service")
        rows = self._store.query(
            "SELECT secret_sha256, role, customer_id, revoked_ms FROM api_keys WHERE id = ?", (key_id,)
        )
        if not rows or not hmac.compare_digest(bytes(rows[0][0]), _digest(secret)):
            raise unauthorized("X-API-KEY is not a key of this service")
        _, role, customer_id, revoked_ms = rows[0]
        if revoked_ms is not None:
            raise unauthorized(f"X-API-KEY {key_id} was revoked")
        principal = Principal("admin" if role == "admin" else "tenant", customer_id, key_id, "api_key")
        with self._lock:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[presented] = (principal, now)
        return principal


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


# -- JWTs -----------------------------------------------------------------------------------------------------------


class JwtVerifier:
    """Checks Cognito-style RS256 tokens against a user pool's JWKS and reads the caller from them."""

    def __init__(
        self, *, jwks: Mapping[str, Any], issuer: str, client_id: str, admin_group: str, tenant_claim: str
    ) -> None:
        self._keys = {key["kid"]: jwt.PyJWK(key, algorithm=_ALGORITHM).key for key in jwks.get("keys", [])}
        self._issuer = issuer
        self._client_id = client_id
        self._admin_group = admin_group
        self._tenant_claim = tenant_claim

    def verify(self, token: str) -> Principal:
        """The caller a token stands for.

        Raises:
            RequestError: (401) the token is malformed, not signed by the pool, expired, for another issuer or
                client, or not an access or ID token.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise unauthorized(f"malformed token: {exc}") from None
        if header.get("alg") != _ALGORITHM:
            raise unauthorized(f"token algorithm {header.get('alg')!r} is not {_ALGORITHM}")
        key = self._keys.get(str(header.get("kid")))
        if key is None:
            raise unauthorized(f"token key id {header.get('kid')!r} is not the user pool's")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[_ALGORITHM],
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "token_use", "sub"], "verify_aud": False},
            )
        except jwt.PyJWTError as exc:
            raise unauthorized(f"token refused: {type(exc).__name__}: {exc}") from None
        use = claims.get("token_use")
        if use not in _TOKEN_USES:
            raise unauthorized(f"token_use {use!r} is neither access nor id")
        client = claims.get("client_id") if use == "access" else claims.get("aud")
        if client != self._client_id:
            raise unauthorized(f"token is for client {client!r}, not {self._client_id!r}")
        user = str(claims.get("username") or claims.get("cognito:username") or claims["sub"])
        groups = claims.get("cognito:groups") or []
        if isinstance(groups, list) and self._admin_group in groups:
            return Principal("admin", None, user, "jwt")
        tenant = claims.get(self._tenant_claim)
        if isinstance(tenant, str) and tenant.strip():
            return Principal("tenant", tenant, user, "jwt")
        return Principal("user", None, user, "jwt")


class Authenticator:
    """Reads the caller from a request's headers: a Bearer JWT, else an X-API-KEY."""

    def __init__(self, *, keys: ApiKeys, tokens: JwtVerifier | None) -> None:
        self._keys = keys
        self._tokens = tokens

    def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        """The caller.

        Raises:
            RequestError: (401) no credential, or a bad one.
        """
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise unauthorized("Authorization must be 'Bearer <token>'")
            if self._tokens is None:
                raise unauthorized("this service takes no tokens (no user pool configured); use X-API-KEY")
            return self._tokens.verify(token.strip())
        if api_key is not None:
            return self._keys.verify(api_key)
        raise unauthorized("no credentials: send Authorization: Bearer <token> or X-API-KEY: <key>")
