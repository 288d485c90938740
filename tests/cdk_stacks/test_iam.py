"""Every IAM policy in every template names exact resources and actions; "*" only where AWS allows nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aws_cdk.assertions import Template

#: Actions that support no resource-level permissions, so AWS only accepts Resource "*" for them.
UNSCOPABLE_ACTIONS: dict[str, str] = {
    "lakeformation:GetDataAccess": "Lake Formation vends data credentials per grant, not per IAM resource",
}


def _statements(templates: dict[str, Template]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, statement) for every statement of every AWS::IAM::Policy and every role inline policy."""
    for stack, template in templates.items():
        for logical_id, policy in template.find_resources("AWS::IAM::Policy").items():
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                yield f"{stack}/{logical_id}", statement
        for logical_id, role in template.find_resources("AWS::IAM::Role").items():
            for inline in role["Properties"].get("Policies", []):
                for statement in inline["PolicyDocument"]["Statement"]:
                    yield f"{stack}/{logical_id}/{inline['PolicyName']}", statement


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_there_are_policies_to_check(templates: dict[str, Template]) -> None:
    assert len(list(_statements(templates))) >= 10


def test_no_wildcard_resource_except_unscopable_actions(templates: dict[str, Template]) -> None:
    offenders = [
        (where, statement["Action"])
        for where, statement in _statements(templates)
        if "*" in _as_list(statement.get("Resource", []))
        and not set(_as_list(statement["Action"])) <= UNSCOPABLE_ACTIONS.keys()
    ]
    assert offenders == []


def test_no_wildcard_actions(templates: dict[str, Template]) -> None:
    offenders = [
        (where, action)
        for where, statement in _statements(templates)
        for action in _as_list(statement.get("Action", []))
        if action == "*" or action.endswith(":*") or "NotAction" in statement
    ]
    assert offenders == []


def test_no_managed_policies(templates: dict[str, Template]) -> None:
    roles = [role for template in templates.values() for role in template.find_resources("AWS::IAM::Role").values()]
    assert roles
    assert [role["Properties"].get("ManagedPolicyArns") for role in roles] == [None] * len(roles)
