"""The demo API logic shared by the local gateway and the AWS demo Lambda."""

from __future__ import annotations

import json
import string

import pytest

from meterlake.demo_api import BadParameterError, lambda_handler, random_strings


def test_lambda_handler_answers_like_api_gateway_proxy() -> None:
    response = lambda_handler({"queryStringParameters": {"len": "5", "num": "3", "chars": "digits"}}, None)
    assert response["statusCode"] == 200
    assert response["headers"] == {"Content-Type": "application/json"}
    strings = json.loads(response["body"])
    assert len(strings) == 3
    assert all(len(s) == 5 and set(s) <= set(string.digits) for s in strings)


def test_lambda_handler_without_parameters_uses_defaults() -> None:
    strings = json.loads(lambda_handler({"queryStringParameters": None}, None)["body"])
    assert len(strings) == 1
    assert len(strings[0]) == 1
    assert set(strings[0]) <= set(string.ascii_letters)


@pytest.mark.parametrize(("params", "named"), [({"chars": "emoji"}, "chars"), ({"num": "1e3"}, "num")])
def test_bad_parameters_are_400_naming_the_parameter(params: dict[str, str], named: str) -> None:
    response = lambda_handler({"queryStringParameters": params}, None)
    assert response["statusCode"] == 400
    assert named in json.loads(response["body"])["message"]
    with pytest.raises(BadParameterError, match=named):
        random_strings(params)


def test_values_are_clamped() -> None:
    strings = random_strings({"len": "-4", "num": "9" * 5000})
    assert len(strings) == 100
    assert all(len(s) == 1 for s in strings)
