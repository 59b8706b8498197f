"""Reading and checking request bodies: the LibreTranslate `/translate` fields and our `/v1/translate`.

Every problem is an ApiError with an HTTP status and a one-line message naming the field, which
the app sends as {"error": message}. Bodies are JSON objects, or (LibreTranslate's clients send
them too) HTML form fields. Invalid UTF-8 is replaced with U+FFFD and control characters are left
for `translate`'s line cleaning, so a request's text is read exactly as a file's would be.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Limits:
    max_chars: int = 5000  # characters of text per request
    max_lines: int = 100  # lines per request (each q text is split at newlines)
    max_queue_lines: int = 2000  # lines waiting in the queue before 503
    timeout: float = 30.0  # seconds a request may wait for its answer
    max_nbest: int = 8  # nbest / alternatives + 1
    max_beam: int = 16


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object from body bytes (invalid UTF-8 replaced, as `translate` reads files)."""
    try:
        value = json.loads(body.decode("utf-8", errors="replace"), strict=False)  # raw control characters too
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise ApiError(400, "request body must be a JSON object with a field q")
    return value


def texts_of(fields: dict[str, Any], name: str = "q") -> tuple[list[str], bool]:
    """(the texts of field `name`, whether it was a list): a string or a non-empty list of strings."""
    if name not in fields:
        raise ApiError(400, f"missing field {name}: the text to translate, a string or a list of strings")
    value = fields[name]
    if isinstance(value, str):
        texts, many = [value], False
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        texts, many = value, True
    else:
        raise ApiError(400, f"field {name} must be a string or a list of strings, got {_kind(value)}")
    if name == "q" and (not texts or not any(t.strip() for t in texts)):
        raise ApiError(400, "field q is empty: nothing to translate")
    return texts, many


def split_lines(texts: list[str], limits: Limits) -> tuple[list[str], list[int]]:
    """All lines of the texts (split at '\\n' as a file's lines are; a '\\r' before it is dropped)
    and how many lines each text has; 413 past the request limits."""
    chars = sum(len(t) for t in texts)
    if chars > limits.max_chars:
        raise ApiError(413, f"field q has {chars} characters; at most {limits.max_chars} per request")
    lines, counts = [], []
    for text in texts:
        parts = [p[:-1] if p.endswith("\r") else p for p in text.split("\n")]
        lines += parts
        counts.append(len(parts))
    if len(lines) > limits.max_lines:
        raise ApiError(413, f"field q has {len(lines)} lines; at most {limits.max_lines} per request")
    return lines, counts


def integer(fields: dict, name: str, low: int, high: int, default: int | None = None) -> int | None:
    value = fields.get(name, default)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():  # form fields are strings
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"field {name} must be an integer, got {_kind(value)}")
    if not low <= value <= high:
        raise ApiError(400, f"field {name} must be between {low} and {high}, got {value}")
    return value


def number(fields: dict, name: str) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ApiError(400, f"field {name} must be a number, got {_kind(value)}")
    return float(value)


def boolean(fields: dict, name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"field {name} must be true or false, got {_kind(value)}")
    return value


def string(fields: dict, name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"field {name} must be a string, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list" + ("" if all(isinstance(v, str) for v in value) else " with non-strings")
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object"}.get(
        type(value), type(value).__name__)
