"""Reading a request's JSON body strictly, the same way for every endpoint that takes one.

A body is refused, always as a problem document, when it is

- of another media type than ``application/json`` (415);
- larger than the endpoint's limit (413);
- not UTF-8 (400), as RFC 8259 requires of JSON exchanged between systems;
- not JSON, or JSON with ``NaN``/``Infinity`` (400);
- an object with a key given twice, at any depth (400): "last one wins" would let two
  readers of one body disagree on what it says;
- nested deeper than ``MAX_DEPTH`` (400);
- holding a lone UTF-16 surrogate (``"\\ud800"``) in a string (400): no database or
  encoder downstream could store it.
"""

from __future__ import annotations

import json
from typing import Any

from flask import request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

#: Deepest nesting of arrays and objects a body may have; ours need 3.
MAX_DEPTH = 32
#: Characters of a duplicated key quoted back in the problem.
_QUOTED = 40


class _Refused(ValueError):
    """Valid JSON syntax that this reader refuses (a duplicate key, NaN)."""


def read_json(max_bytes: int) -> Any:
    """The request's JSON document, or an HTTP error (see the module docstring).

    The app's ``MAX_CONTENT_LENGTH`` must be ``max_bytes + 1`` at least: Flask cuts a
    chunked body (no Content-Length) there silently, so one byte more than allowed means
    too large."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("send the body as application/json")
    raw = request.get_data(cache=False)
    if len(raw) > max_bytes:
        raise RequestEntityTooLarge(f"the body is larger than {max_bytes} bytes")
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    """``raw`` as a JSON document, or BadRequest (see the module docstring)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8 (byte {exc.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except _Refused as exc:
        raise BadRequest(f"the body is refused: {exc}") from None
    except RecursionError:
        raise BadRequest(f"the body is nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except ValueError:  # an integer of more digits than Python converts
        raise BadRequest("the body holds a number of too many digits") from None
    _check_shape(document)
    return document


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"the key {json.dumps(key[:_QUOTED])} appears twice in an object")
            seen.add(key)
    return found


def _no_constants(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _check_shape(document: Any) -> None:
    """Refuse nesting past MAX_DEPTH and lone surrogates; iteratively (no recursion)."""
    pending: list[tuple[Any, int]] = [(document, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise BadRequest(f"the body is nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key in value:
                    _check_text(key)
                pending.extend((item, depth + 1) for item in value.values())
            else:
                pending.extend((item, depth + 1) for item in value)


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("the body holds a lone UTF-16 surrogate in a string") from None
