"""The demo API behind ``GET /random/strings``: the AWS sample's random-strings Lambda, defined once.

The local gateway and the AWS demo Lambda both answer from :func:`random_strings`, so the metered API behaves the
same in both places. Stdlib-only on purpose: this module is the whole of the demo Lambda's asset.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Mapping
from typing import Any, Final

#: The route the demo API serves, as ``$context.resourcePath`` names it.
RANDOM_STRINGS_RESOURCE: Final = "/random/strings"

#: The sample Lambda's character sets, by the value of its ``chars`` parameter.
CHARACTER_SETS: Final[Mapping[str, str]] = {
    "letters": string.ascii_letters,
    "lowercase": string.ascii_lowercase,
    "uppercase": string.ascii_uppercase,
    "digits": string.digits,
}
DEFAULT_CHARS: Final = "letters"
MAX_STRING_LENGTH: Final = 20
MAX_STRING_COUNT: Final = 100

_JSON: Final = "application/json"


class BadParameterError(ValueError):
    """A query parameter that is not what the API accepts; the message is the client's 400 message."""


def random_strings(params: Mapping[str, str]) -> list[str]:
    """``num`` random strings of ``len`` characters drawn from ``chars``; ``len``/``num`` clamped as the sample does.

    Raises:
        BadParameterError: ``chars`` names no character set, or ``len``/``num`` is not an integer.
    """
    chars = params.get("chars", DEFAULT_CHARS)
    alphabet = CHARACTER_SETS.get(chars)
    if alphabet is None:
        choices = ", ".join(sorted(CHARACTER_SETS))
        raise BadParameterError(f"chars must be one of {choices}; got {chars!r}")
    length = clamped_int(params, "len", 1, MAX_STRING_LENGTH)
    count = clamped_int(params, "num", 1, MAX_STRING_COUNT)
    drawn = "".join(random.choices(alphabet, k=length * count))
    return [drawn[i : i + length] for i in range(0, length * count, length)]


def clamped_int(params: Mapping[str, str], name: str, low: int, high: int) -> int:
    """Read integer parameter ``name`` (default ``low``) and clamp it to ``low..high``.

    Raises:
        BadParameterError: the value is not an optionally signed run of ASCII digits.
    """
    text = params.get(name)
    if text is None:
        return low
    stripped = text.strip()
    digits = stripped[1:] if stripped[:1] in ("+", "-") else stripped
    if not digits.isascii() or not digits.isdigit():
        raise BadParameterError(f"{name} must be an integer; got {text!r}")
    if len(digits.lstrip("0")) > len(str(high)):
        # Beyond either bound whatever the digits; and int() refuses numbers of over 4300 digits.
        return low if stripped.startswith("-") else high
    return max(low, min(high, int(stripped)))


def lambda_handler(event: Mapping[str, Any], context: object) -> dict[str, Any]:
    """AWS Lambda entry point behind API Gateway's Lambda proxy integration."""
    params = event.get("queryStringParameters") or {}
    try:
        status, body = 200, json.dumps(random_strings(params), separators=(",", ":"))
    except BadParameterError as exc:
        status, body = 400, json.dumps({"message": str(exc)})
    return {"statusCode": status, "headers": {"Content-Type": _JSON}, "body": body}
