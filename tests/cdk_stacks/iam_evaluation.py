"""IAM policy evaluation for the synthesized templates: would AWS allow this call, and if not, why not.

moto does not enforce IAM, so a grant that is missing, names the wrong ARN or carries a condition the call cannot
satisfy passes every moto test and fails on the first live run. This module resolves a template's CloudFormation
expressions into the names a deployment would have (:class:`Deployment`) and evaluates identity and resource policies
the way IAM does for one account: an explicit Deny wins, then any Allow, else the call is implicitly denied. Every
resource of a call must be allowed (Glue checks the catalog, the database and the table of a GetTable). Condition
keys absent from a call fail a positive operator and satisfy a negated one, as in IAM; ``...IfExists`` operators
are satisfied by an absent key. Anything this evaluator does not model raises :class:`UnsupportedPolicyError`
rather than guessing.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

ACCOUNT: Final = "123456789012"
REGION: Final = "us-east-1"
PARTITION: Final = "aws"


class UnsupportedPolicyError(ValueError):
    """The policy or template uses a construct this evaluator does not model."""


@dataclass(frozen=True)
class AwsCall:
    """One authorization AWS makes: an action on each of ``resources``, with the condition keys the request carries.

    ``why`` says what the code did to cause it (shown when the call is denied).
    """

    action: str
    resources: tuple[str, ...]
    context: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    why: str = ""


@dataclass(frozen=True)
class Decision:
    """Whether a call is allowed, and the reason (the statement that decided, or what is missing)."""

    allowed: bool
    reason: str


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _matches(pattern: str, value: str, *, ignore_case: bool) -> bool:
    """IAM wildcard matching: ``*`` any run of characters (``/`` and ``:`` included), ``?`` one character."""
    if "${" in pattern:
        raise UnsupportedPolicyError(f"policy variables are not modelled: {pattern!r}")
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, value, flags=re.IGNORECASE if ignore_case else 0) is not None


_NEGATED: Final = frozenset(
    {"StringNotEquals", "StringNotEqualsIgnoreCase", "StringNotLike", "ArnNotEquals", "ArnNotLike"}
)


def _compare(operator: str, expected: str, actual: str) -> bool:
    if operator in ("StringEquals", "StringNotEquals", "ArnEquals", "ArnNotEquals"):
        return expected == actual
    if operator in ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"):
        return expected.lower() == actual.lower()
    if operator in ("StringLike", "StringNotLike", "ArnLike", "ArnNotLike"):
        return _matches(expected, actual, ignore_case=False)
    if operator == "Bool":
        return expected.lower() == actual.lower()
    raise UnsupportedPolicyError(f"condition operator {operator!r} is not modelled")


def _condition_holds(operator: str, key: str, expected: list[Any], context: Mapping[str, str | Sequence[str]]) -> bool:
    """One ``operator: {key: expected}`` entry against the call's context keys (names are case-insensitive)."""
    actual = next((value for name, value in context.items() if name.lower() == key.lower()), None)
    if operator == "Null":
        (wanted,) = expected
        return (actual is None) == (str(wanted).lower() == "true")
    if_exists = operator.endswith("IfExists")
    base = operator.removesuffix("IfExists")
    if base.startswith(("ForAnyValue:", "ForAllValues:")):
        raise UnsupportedPolicyError(f"set operators are not modelled: {operator!r}")
    negated = base in _NEGATED
    if actual is None:
        return if_exists or negated
    values = [actual] if isinstance(actual, str) else list(actual)
    hit = any(_compare(base, str(e), v) for e in expected for v in values)
    return not hit if negated else hit


def _conditions_hold(conditions: Mapping[str, Mapping[str, Any]], context: Mapping[str, str | Sequence[str]]) -> bool:
    return all(
        _condition_holds(operator, key, _as_list(expected), context)
        for operator, entries in conditions.items()
        for key, expected in entries.items()
    )


def _statement_applies(statement: Mapping[str, Any], action: str, resource: str, context: Mapping[str, Any]) -> bool:
    if "Action" in statement:
        if not any(_matches(a, action, ignore_case=True) for a in _as_list(statement["Action"])):
            return False
    elif any(_matches(a, action, ignore_case=True) for a in _as_list(statement["NotAction"])):
        return False
    if "Resource" in statement:
        if not any(_matches(r, resource, ignore_case=False) for r in _as_list(statement["Resource"])):
            return False
    elif "NotResource" in statement and any(
        _matches(r, resource, ignore_case=False) for r in _as_list(statement["NotResource"])
    ):
        return False
    return _conditions_hold(statement.get("Condition", {}), context)


@dataclass(frozen=True)
class Policy:
    """A policy document (its CloudFormation expressions already resolved) and where it came from."""

    name: str
    document: Mapping[str, Any]

    def statements(self) -> Iterator[Mapping[str, Any]]:
        """Each statement; a document with one statement may give it as an object."""
        yield from _as_list(self.document.get("Statement", []))


def evaluate(call: AwsCall, identity: Sequence[Policy], resource: Sequence[Policy] = ()) -> Decision:
    """IAM's decision for ``call`` made by a principal with ``identity`` policies on resources with ``resource``
    policies (same account: an Allow in either suffices, a Deny in either wins).

    Resource policies must already be narrowed to statements whose Principal is the caller.
    """
    for arn in call.resources:
        allow: str | None = None
        for policy in (*identity, *resource):
            for statement in policy.statements():
                if not _statement_applies(statement, call.action, arn, call.context):
                    continue
                where = f"{policy.name}/{statement.get('Sid', '?')}"
                if statement["Effect"] == "Deny":
                    return Decision(False, f"{call.action} on {arn}: explicitly denied by {where}")
                allow = allow or where
        if allow is None:
            return Decision(False, f"{call.action} on {arn} with {dict(call.context)}: no statement allows it")
    return Decision(True, "allowed")


def principal_matches(statement: Mapping[str, Any], *, service: str | None = None, arn: str | None = None) -> bool:
    """Whether a resource or trust policy statement names the service principal or the principal ARN."""
    principal = statement.get("Principal")
    if principal == "*" or principal == {"AWS": "*"}:
        return True
    if not isinstance(principal, Mapping):
        return False
    if service is not None and service in _as_list(principal.get("Service", [])):
        return True
    return arn is not None and any(_matches(p, arn, ignore_case=False) for p in _as_list(principal.get("AWS", [])))


# -- CloudFormation expressions -> the names a deployment would have ---------------------------------------------


def _name(stack: str, logical_id: str) -> str:
    """A deterministic physical name in CloudFormation's style (stack-logicalid), lower case, <= 63 characters."""
    return f"{stack}-{logical_id}".lower()[:63]


@dataclass
class Deployment:
    """Every stack of an app as deployed in one account and region: resolves Ref, Fn::GetAtt, Fn::Join, Fn::Select,
    Fn::Split, Fn::Sub (without variables map) and Fn::ImportValue to the physical names AWS would give.

    Physical names are the template's own where it sets one (BucketName, QueueName, LogGroupName, ...), else
    ``<stack>-<logicalid>``, the shape CloudFormation generates.
    """

    templates: Mapping[str, Mapping[str, Any]]
    account: str = ACCOUNT
    region: str = REGION
    stack_ids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for stack in self.templates:
            self.stack_ids.setdefault(
                stack, f"arn:{PARTITION}:cloudformation:{self.region}:{self.account}:stack/{stack}/{uuid.uuid4()}"
            )

    def resources(self, stack: str, resource_type: str | None = None) -> dict[str, Mapping[str, Any]]:
        """The stack's resources (optionally of one type), by logical id."""
        return {
            logical_id: resource
            for logical_id, resource in self.templates[stack].get("Resources", {}).items()
            if resource_type is None or resource["Type"] == resource_type
        }

    def resolve(self, stack: str, node: Any) -> Any:
        """``node`` with every CloudFormation expression replaced by its value in this deployment."""
        if isinstance(node, list):
            return [self.resolve(stack, item) for item in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, argument),) = node.items()
            if key == "Ref":
                return self._ref(stack, argument)
            if key == "Fn::GetAtt":
                logical_id, attribute = argument if isinstance(argument, list) else argument.split(".", 1)
                return self.attribute(stack, logical_id, attribute)
            if key == "Fn::Join":
                separator, parts = argument
                return str(separator).join(str(self.resolve(stack, part)) for part in self.resolve(stack, parts))
            if key == "Fn::Select":
                index, items = argument
                return self.resolve(stack, items)[int(self.resolve(stack, index))]
            if key == "Fn::Split":
                separator, text = argument
                return str(self.resolve(stack, text)).split(separator)
            if key == "Fn::Sub" and isinstance(argument, str):
                return re.sub(r"\$\{([^}!]+)\}", lambda m: str(self._ref(stack, m.group(1))), argument)
            if key == "Fn::ImportValue":
                return self._import(self.resolve(stack, argument))
            if key.startswith("Fn::") or key == "Condition":
                raise UnsupportedPolicyError(f"{stack}: {key} is not modelled")
        return {key: self.resolve(stack, value) for key, value in node.items()}

    def _ref(self, stack: str, name: str) -> Any:
        pseudo = {
            "AWS::AccountId": self.account,
            "AWS::Region": self.region,
            "AWS::Partition": PARTITION,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": stack,
            "AWS::StackId": self.stack_ids[stack],
            "AWS::NoValue": None,
        }
        if name in pseudo:
            return pseudo[name]
        parameters = self.templates[stack].get("Parameters", {})
        if name in parameters:
            return parameters[name].get("Default")
        return self.attribute(stack, name, "Ref")

    def _import(self, export_name: str) -> Any:
        for stack, template in self.templates.items():
            for output in template.get("Outputs", {}).values():
                export = output.get("Export")
                if export is not None and self.resolve(stack, export["Name"]) == export_name:
                    return self.resolve(stack, output["Value"])
        raise UnsupportedPolicyError(f"no stack exports {export_name!r}")

    def attribute(self, stack: str, logical_id: str, attribute: str) -> Any:
        """``Ref`` (attribute ``"Ref"``) or ``Fn::GetAtt`` of a resource, as the service would answer it."""
        resource = self.templates[stack]["Resources"][logical_id]
        kind = resource["Type"]
        props = resource.get("Properties", {})
        a, r, p = self.account, self.region, PARTITION

        def prop(name: str) -> str:
            value = props.get(name)
            return str(self.resolve(stack, value)) if value is not None else _name(stack, logical_id)

        if kind == "AWS::S3::Bucket":
            name = prop("BucketName")
            values = {"Ref": name, "Arn": f"arn:{p}:s3:::{name}", "DomainName": f"{name}.s3.amazonaws.com"}
        elif kind == "AWS::SQS::Queue":
            name = prop("QueueName")
            url = f"https://sqs.{r}.amazonaws.com/{a}/{name}"
            values = {"Ref": url, "QueueUrl": url, "QueueName": name, "Arn": f"arn:{p}:sqs:{r}:{a}:{name}"}
        elif kind == "AWS::Lambda::Function":
            name = prop("FunctionName")
            values = {"Ref": name, "Arn": f"arn:{p}:lambda:{r}:{a}:function:{name}"}
        elif kind == "AWS::IAM::Role":
            name = prop("RoleName")
            values = {"Ref": name, "Arn": f"arn:{p}:iam::{a}:role/{name}", "RoleId": f"AROA{logical_id.upper()}"}
        elif kind == "AWS::Logs::LogGroup":
            name = prop("LogGroupName")
            values = {"Ref": name, "Arn": f"arn:{p}:logs:{r}:{a}:log-group:{name}:*"}
        elif kind == "AWS::SNS::Topic":
            name = prop("TopicName")
            arn = f"arn:{p}:sns:{r}:{a}:{name}"
            values = {"Ref": arn, "TopicArn": arn, "TopicName": name}
        elif kind == "AWS::KMS::Key":
            key_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{stack}/{logical_id}"))
            values = {"Ref": key_id, "KeyId": key_id, "Arn": f"arn:{p}:kms:{r}:{a}:key/{key_id}"}
        elif kind == "AWS::KinesisFirehose::DeliveryStream":
            name = prop("DeliveryStreamName")
            values = {"Ref": name, "Arn": f"arn:{p}:firehose:{r}:{a}:deliverystream/{name}"}
        elif kind == "AWS::Glue::Database":
            values = {"Ref": str(self.resolve(stack, props["DatabaseInput"]["Name"]))}
        elif kind == "AWS::S3Tables::TableBucket":
            name = prop("TableBucketName")
            arn = f"arn:{p}:s3tables:{r}:{a}:bucket/{name}"
            values = {"Ref": arn, "TableBucketARN": arn}
        elif kind == "AWS::S3Tables::Table":
            bucket_arn = str(self.resolve(stack, props["TableBucketARN"]))
            table_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{stack}/{logical_id}"))
            arn = f"{bucket_arn}/table/{table_id}"
            values = {"Ref": arn, "TableARN": arn}
        elif kind == "AWS::Events::Rule":
            name = prop("Name")
            values = {"Ref": name, "Arn": f"arn:{p}:events:{r}:{a}:rule/{name}"}
        elif kind in ("AWS::Glue::Table", "AWS::Athena::WorkGroup"):
            values = {"Ref": prop("Name")}
        else:
            values = {"Ref": _name(stack, logical_id)}
        if attribute not in values:
            raise UnsupportedPolicyError(f"{stack}/{logical_id} ({kind}): attribute {attribute} is not modelled")
        return values[attribute]

    # -- policies of a principal, and of a resource --------------------------------------------------------------

    def role_policies(self, stack: str, role_logical_id: str) -> list[Policy]:
        """The identity policies of a role: its inline policies and every AWS::IAM::Policy attached to it."""
        role = self.resources(stack)[role_logical_id]
        if role["Properties"].get("ManagedPolicyArns"):
            raise UnsupportedPolicyError(f"{stack}/{role_logical_id}: managed policies are not modelled")
        policies = [
            Policy(f"{stack}/{role_logical_id}/{inline['PolicyName']}", self.resolve(stack, inline["PolicyDocument"]))
            for inline in role["Properties"].get("Policies", [])
        ]
        for logical_id, policy in self.resources(stack, "AWS::IAM::Policy").items():
            if {"Ref": role_logical_id} in policy["Properties"].get("Roles", []):
                policies.append(
                    Policy(f"{stack}/{logical_id}", self.resolve(stack, policy["Properties"]["PolicyDocument"]))
                )
        return policies

    def trust_policy(self, stack: str, role_logical_id: str) -> Policy:
        """The role's trust (assume-role) policy."""
        role = self.resources(stack)[role_logical_id]
        document = self.resolve(stack, role["Properties"]["AssumeRolePolicyDocument"])
        return Policy(f"{stack}/{role_logical_id}/trust", document)

    def resource_policies(self, arn: str, *, caller_arn: str) -> list[Policy]:
        """Bucket and queue policies of the resource ``arn`` names, narrowed to statements about ``caller_arn``."""
        found = []
        for stack in self.templates:
            for kind, target_key, attribute in (
                ("AWS::S3::BucketPolicy", "Bucket", "Arn"),
                ("AWS::SQS::QueuePolicy", "Queues", "Arn"),
            ):
                for logical_id, resource in self.resources(stack, kind).items():
                    targets = _as_list(resource["Properties"][target_key])
                    names = {self._resource_arn(stack, target, attribute) for target in targets}
                    bucket_or_queue = arn.split("/", 1)[0] if kind == "AWS::S3::BucketPolicy" else arn
                    if bucket_or_queue not in names:
                        continue
                    document = self.resolve(stack, resource["Properties"]["PolicyDocument"])
                    statements = [s for s in _as_list(document["Statement"]) if principal_matches(s, arn=caller_arn)]
                    found.append(Policy(f"{stack}/{logical_id}", {"Statement": statements}))
        return found

    def _resource_arn(self, stack: str, target: Any, attribute: str) -> str:
        """The ARN of a policy's target, given as a Ref to a resource of the stack or as a name or URL."""
        if isinstance(target, dict) and set(target) == {"Ref"}:
            return str(self.attribute(stack, target["Ref"], attribute))
        value = str(self.resolve(stack, target))
        if value.startswith("https://sqs."):
            host, account, name = value.removeprefix("https://").split("/")
            return f"arn:{PARTITION}:sqs:{host.split('.')[1]}:{account}:{name}"
        return f"arn:{PARTITION}:s3:::{value}"
