"""The strict JSON body reader every endpoint with a body uses (orders.api.bodies)."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from werkzeug.exceptions import BadRequest, HTTPException

from orders.api.bodies import MAX_DEPTH, read_json

LIMIT = 64 * 1024


def read(data: bytes, content_type: str = "application/json") -> Any:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = LIMIT + 1
    with app.test_request_context("/", method="POST", data=data, content_type=content_type):
        return read_json(LIMIT)


def refusal(data: bytes, content_type: str = "application/json") -> HTTPException:
    with pytest.raises(HTTPException) as refused:
        read(data, content_type)
    return refused.value


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def test_reads_a_document_with_its_text_numbers_and_nesting() -> None:
    body = '{"a": [1, 2.5, "é€😀", {"b": null}], "c": true}'.encode()
    assert read(body) == {"a": [1, 2.5, "é€😀", {"b": None}], "c": True}
    assert read(nested(MAX_DEPTH)) is not None


@pytest.mark.parametrize(
    ("case", "data", "status", "words"),
    [
        ("duplicate key", b'{"ids": [1], "ids": [2]}', 400, '"ids" appears twice'),
        ("duplicate nested key", b'{"a": [{"b": 1, "c": 2, "b": 3}]}', 400, '"b" appears twice'),
        ("too deep", nested(MAX_DEPTH + 1), 400, "nested deeper"),
        ("far too deep", nested(10_000), 400, "nested deeper"),
        ("not UTF-8", b'{"a": "\xff"}', 400, "not UTF-8"),
        ("UTF-16", '{"a": 1}'.encode("utf-16"), 400, "not UTF-8"),
        ("a BOM", b'\xef\xbb\xbf{"a": 1}', 400, "not valid JSON"),
        ("NaN", b'{"a": NaN}', 400, "NaN"),
        ("Infinity", b"[-Infinity]", 400, "Infinity"),
        ("lone surrogate", b'{"a": "\\ud800"}', 400, "surrogate"),
        ("lone surrogate in a key", b'{"\\udc00": 1}', 400, "surrogate"),
        ("too many digits", b"[" + b"9" * 5000 + b"]", 400, "too many digits"),
        ("malformed", b'{"a": ', 400, "not valid JSON"),
        ("empty", b"", 400, "not valid JSON"),
        ("too large", b'["' + b"x" * LIMIT + b'"]', 413, ""),
    ],
)
def test_refuses_what_is_not_one_plain_json_document(
    case: str, data: bytes, status: int, words: str
) -> None:
    refused = refusal(data)
    assert refused.code == status, case
    assert words in (refused.description or ""), (case, refused.description)


def test_refuses_another_media_type() -> None:
    assert refusal(b'{"a": 1}', "text/plain").code == 415
    assert refusal(b"a=1", "application/x-www-form-urlencoded").code == 415


def test_a_surrogate_pair_is_one_character_not_a_refusal() -> None:
    assert read(b'["\\ud83d\\ude00"]') == ["😀"]


def test_a_quoted_duplicate_key_is_cut_short() -> None:
    key = "k" * 5000
    refused = refusal(f'{{"{key}": 1, "{key}": 2}}'.encode())
    assert isinstance(refused, BadRequest) and len(refused.description or "") < 200
