"""Each tenant source, end to end on loopback: the caller's credentials -> the local gateway's authorizer -> the access
log rendered for that source -> the same transform -> the tenant and user in the Iceberg table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from meterlake.config import Config, parse_config
from meterlake.embedded.stack import LocalStack
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.local.auth import LocalApiKeys
from meterlake.records import API_KEY_HEADER

ROUTE = "/random/strings?len=4"


def _config(tenant_source: dict[str, Any]) -> Config:
    return parse_config({"meterlake": {"tenant_source": tenant_source}})


def _rows(config: Config, data_dir: DataDir) -> dict[str, tuple[Any, ...]]:
    """request_id -> (status, tenant_id, user, client_id) of every event in the table."""
    table = ensure_metering_table(open_catalog(data_dir), config)
    return {
        r["request_id"]: (r["status"], r["tenant_id"], r["user"], r["client_id"])
        for r in table.scan().to_arrow().to_pylist()
    }


def _send(stack: LocalStack, headers: dict[str, str]) -> tuple[str, int]:
    response = httpx.get(stack.gateway.invoke_url + ROUTE, headers=headers)
    return response.headers["x-amzn-requestid"], response.status_code


@pytest.mark.parametrize(
    ("tenant_source", "client_id"),
    [
        ({"kind": "cognito_claim"}, "meterlake-local-client"),
        ({"kind": "cognito_claim", "claim": "custom:org"}, "meterlake-local-client"),
        # A Lambda authorizer has no Cognito claims: the log's client_id ($context.authorizer.claims.aud) is none.
        ({"kind": "authorizer_context", "context_key": "org"}, None),
    ],
    ids=["cognito-default-claim", "cognito-custom-claim", "lambda-authorizer-context"],
)
def test_a_token_authorizer_source_carries_the_tenant_to_iceberg(
    tmp_path: Path, tenant_source: dict[str, Any], client_id: str | None
) -> None:
    config = _config(tenant_source)
    data_dir = DataDir.resolve(tmp_path)
    with LocalStack(config=config, data_dir=data_dir, port=0) as stack:
        pool = stack.gateway.user_pool
        bob = pool.issue_id_token(user="bob", tenant_id="globex")
        sent = {
            _send(stack, {"Authorization": pool.issue_id_token(user="alice", tenant_id="acme")}): ("acme", "alice"),
            _send(stack, {"Authorization": f"Bearer {bob}"}): ("globex", "bob"),
            _send(stack, {"Authorization": pool.issue_id_token(user="carol", tenant_id=None)}): (None, "carol"),
            _send(stack, {}): (None, None),
        }
        stack.settle()
    rows = _rows(config, data_dir)
    assert {request for request, _ in sent} == rows.keys()
    for (request_id, status), (tenant, user) in sent.items():
        authorized = user is not None
        assert status == (200 if authorized else 401)
        assert rows[request_id] == (status, tenant, user, client_id if authorized else None)


def test_the_api_key_source_bills_each_key_to_its_mapped_tenant_in_iceberg(tmp_path: Path) -> None:
    """The log carries the key's id; the same transform maps it to the tenant; the id stays as the user."""
    config = _config({"kind": "api_key", "tenants_by_api_key": {"k1acme0001": "acme", "k2globex02": "globex"}})
    data_dir = DataDir.resolve(tmp_path)
    with LocalStack(config=config, data_dir=data_dir, port=0) as stack:
        pool = stack.gateway.user_pool
        keys = LocalApiKeys.for_config(config, pool)
        sent = {
            _send(stack, {API_KEY_HEADER: keys.value("k1acme0001")}): (200, "acme", "k1acme0001"),
            _send(stack, {API_KEY_HEADER: keys.value("k2globex02")}): (200, "globex", "k2globex02"),
            _send(stack, {API_KEY_HEADER: keys.value("k3unknown3")}): (403, None, None),
            # A Cognito token is no API key: the stage requires a key.
            _send(stack, {"Authorization": pool.issue_id_token(user="alice", tenant_id="acme")}): (403, None, None),
        }
        stack.settle()
    rows = _rows(config, data_dir)
    assert {request for request, _ in sent} == rows.keys()
    for (request_id, status), (expected_status, tenant, user) in sent.items():
        assert status == expected_status
        assert rows[request_id] == (status, tenant, user, None)


def test_local_api_key_values_survive_a_restart_and_differ_per_key(tmp_path: Path) -> None:
    config = _config({"kind": "api_key", "tenants_by_api_key": {"k1": "acme"}})
    data_dir = DataDir.resolve(tmp_path)
    values = []
    for _ in range(2):
        with LocalStack(config=config, data_dir=data_dir, port=0) as stack:
            keys = LocalApiKeys.for_config(config, stack.gateway.user_pool)
            values.append((keys.value("k1"), keys.value("k2")))
            assert keys.key_id(keys.value("k1")) == "k1"
            assert keys.key_id(keys.value("k2")) is None
    assert values[0] == values[1]
    assert values[0][0] != values[0][1]
    assert len(values[0][0]) >= 20  # API Gateway's shortest key value
