"""The policy evaluator behind the IAM gate decides as IAM does, so a wrong grant cannot pass for a right one."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cdk_stacks.iam_evaluation import AwsCall, Deployment, Policy, UnsupportedPolicyError, evaluate

BUCKET = "arn:aws:s3:::lake"


def policy(*statements: dict[str, Any]) -> Policy:
    return Policy("p", {"Version": "2012-10-17", "Statement": list(statements)})


def allow(action: str | list[str], resource: str | list[str], **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def test_an_s3_prefix_condition_does_not_cover_a_request_without_a_prefix() -> None:
    narrowed = policy(allow("s3:ListBucket", BUCKET, Condition={"StringEquals": {"s3:prefix": "amberflo/x.json"}}))
    existence_check = AwsCall("s3:ListBucket", (BUCKET,), {})
    listing = AwsCall("s3:ListBucket", (BUCKET,), {"s3:prefix": "amberflo/x.json"})
    assert not evaluate(existence_check, [narrowed]).allowed
    assert evaluate(listing, [narrowed]).allowed
    assert evaluate(existence_check, [policy(allow("s3:ListBucket", BUCKET))]).allowed


def test_absent_keys_fail_positive_operators_and_satisfy_negated_and_if_exists_ones() -> None:
    call = AwsCall("sqs:SendMessage", ("arn:aws:sqs:us-east-1:1:q",), {})
    for condition, allowed in (
        ({"StringEquals": {"aws:SourceAccount": "1"}}, False),
        ({"StringNotEquals": {"aws:SourceAccount": "1"}}, True),
        ({"StringEqualsIfExists": {"aws:SourceAccount": "1"}}, True),
        ({"Null": {"aws:SourceAccount": "true"}}, True),
        ({"Null": {"aws:SourceAccount": "false"}}, False),
    ):
        decision = evaluate(call, [policy(allow("sqs:SendMessage", "*", Condition=condition))])
        assert decision.allowed is allowed, condition


def test_an_explicit_deny_wins_over_any_allow_and_every_resource_must_be_allowed() -> None:
    tls_only = policy(
        {"Effect": "Deny", "Action": "s3:*", "Resource": "*", "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
    )
    grant = policy(allow("s3:GetObject", f"{BUCKET}/*"))
    assert evaluate(
        AwsCall("s3:GetObject", (f"{BUCKET}/k",), {"aws:SecureTransport": "true"}), [grant], [tls_only]
    ).allowed
    plain = AwsCall("s3:GetObject", (f"{BUCKET}/k",), {"aws:SecureTransport": "false"})
    assert "explicitly denied" in evaluate(plain, [grant], [tls_only]).reason
    glue = ("arn:aws:glue:r:1:catalog", "arn:aws:glue:r:1:database/db", "arn:aws:glue:r:1:table/db/t")
    table_only = policy(allow("glue:GetTable", glue[2]))
    assert not evaluate(AwsCall("glue:GetTable", glue), [table_only]).allowed
    assert evaluate(AwsCall("glue:GetTable", glue), [policy(allow("glue:GetTable", list(glue)))]).allowed


def test_wildcards_match_as_iam_matches_them() -> None:
    secret = policy(allow("secretsmanager:GetSecretValue", "arn:aws:secretsmanager:r:1:secret:team/key-??????"))
    assert evaluate(
        AwsCall("secretsmanager:GetSecretValue", ("arn:aws:secretsmanager:r:1:secret:team/key-AbC123",)), [secret]
    ).allowed
    longer = AwsCall("secretsmanager:GetSecretValue", ("arn:aws:secretsmanager:r:1:secret:team/key-extra-AbC123",))
    assert not evaluate(longer, [secret]).allowed
    assert evaluate(AwsCall("S3:getobject", (f"{BUCKET}/a/b",)), [policy(allow("s3:Get*", f"{BUCKET}/*"))]).allowed
    not_action = policy({"Effect": "Allow", "NotAction": "s3:DeleteObject", "Resource": "*"})
    assert not evaluate(AwsCall("s3:DeleteObject", (f"{BUCKET}/k",)), [not_action]).allowed


def test_what_is_not_modelled_is_refused_not_guessed() -> None:
    call = AwsCall("s3:GetObject", (f"{BUCKET}/k",), {"aws:PrincipalTag/team": "a"})
    with pytest.raises(UnsupportedPolicyError):
        evaluate(call, [policy(allow("s3:GetObject", "${aws:username}/*"))])
    with pytest.raises(UnsupportedPolicyError):
        evaluate(call, [policy(allow("s3:GetObject", "*", Condition={"ForAnyValue:StringLike": {"x": "y"}}))])
    with pytest.raises(UnsupportedPolicyError):
        Deployment({"S": {"Resources": {}}}).resolve("S", {"Fn::If": ["c", 1, 2]})


def test_templates_resolve_to_the_names_cloudformation_gives() -> None:
    template = {
        "Resources": {
            "Queue": {"Type": "AWS::SQS::Queue", "Properties": {}},
            "Bucket": {"Type": "AWS::S3::Bucket", "Properties": {"BucketName": "named"}},
        },
        "Outputs": {"Out": {"Value": {"Fn::GetAtt": ["Queue", "Arn"]}, "Export": {"Name": "S:QueueArn"}}},
    }
    deployment = Deployment({"S": template, "T": {"Resources": {}}})
    assert deployment.resolve("T", {"Fn::ImportValue": "S:QueueArn"}) == "arn:aws:sqs:us-east-1:123456789012:s-queue"
    joined = {"Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, ":s3:::", {"Ref": "Bucket"}, "/*"]]}
    assert deployment.resolve("S", joined) == "arn:aws:s3:::named/*"
    stack_uuid = {"Fn::Select": [2, {"Fn::Split": ["/", {"Ref": "AWS::StackId"}]}]}
    assert len(deployment.resolve("S", stack_uuid)) == 36
