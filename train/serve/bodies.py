"""Request bodies from raw bytes to validated models, with work bounded before it starts.

A JSON parser builds every value of a body before a schema can say that a list is too long:
8 MB of ``[[[0.5]]],`` is 800 000 lists, ~1 GB once parsed and validated. So a body is first
measured without parsing: :func:`json_budget` reads from a model's JSON schema the most
values (``[``, ``{`` and ``,`` outside strings) and strings a valid body can hold, and
:func:`parse_body` refuses a body over either in one pass of C-speed byte counting, then
validates the rest with pydantic (``model_validate_json``: parse and validate in one step,
non-UTF-8 included). Its errors become one bounded message: the first few, each naming the
field path, never echoing the input.

Example::

    budget = json_budget(EmbedText)               # JsonBudget(values=259, strings=257)
    body = parse_body(EmbedText, raw, budget)     # an EmbedText, or ValueError -> 422
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

MAX_REPORTED_ERRORS = 5
MAX_MESSAGE_CHARS = 200

_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')  # a JSON string (possessive: no backtracking)
Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class JsonBudget:
    """Upper bounds on a valid body: ``values`` (its ``[``, ``{`` and ``,`` outside
    strings) and ``strings`` (keys and string values)."""

    values: int
    strings: int


def json_budget(model: type[BaseModel]) -> JsonBudget:
    """The :class:`JsonBudget` of ``model``'s bodies, from its JSON schema. Every array in it
    must have a ``maxItems`` (``ValueError`` naming the first that has none)."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})

    def walk(node: dict, path: str) -> tuple[int, int]:
        if "$ref" in node:
            return walk(defs[node["$ref"].rsplit("/", 1)[-1]], path)
        kind = node.get("type")
        options = node.get("anyOf") or node.get("oneOf")
        if kind is None and options:  # alternatives: the largest of them
            sizes = [walk(option, path) for option in options]
            return max(v for v, _ in sizes), max(s for _, s in sizes)
        if kind == "object":
            if node.get("additionalProperties", False) is not False:
                raise ValueError(f"json_budget: {model.__name__}{path} takes any keys")
            values, strings = 1, 0
            for name, prop in node.get("properties", {}).items():
                v, s = walk(prop, f"{path}.{name}")
                values, strings = values + v + 1, strings + s + 1  # its comma, its key
            return values, strings
        if kind == "array":
            if "maxItems" not in node:
                raise ValueError(f"json_budget: {model.__name__}{path} is a list without a bound")
            v, s = walk(node.get("items", {}), f"{path}[]")
            return 1 + node["maxItems"] * (v + 1), node["maxItems"] * s
        return 0, int(kind == "string" or kind is None)

    values, strings = walk(schema, "")
    return JsonBudget(values=values, strings=strings)


def check_budget(raw: bytes, budget: JsonBudget) -> None:
    """``ValueError`` if ``raw`` holds more strings or values than ``budget`` allows."""
    # Every quote is a string's end or escaped by a backslash: fewer unescaped quotes than
    # this means too many strings, found at memchr speed before the regex below runs.
    quotes = raw.count(b'"') - raw.count(b"\\")
    if quotes > 2 * budget.strings:
        raise ValueError(f"body: more strings than this route accepts (at most {budget.strings})")
    bare = _STRING.sub(b"", raw)
    values = bare.count(b"[") + bare.count(b"{") + bare.count(b",")
    if values > budget.values:
        raise ValueError(
            f"body: {values} JSON values or more; this route accepts at most {budget.values}"
        )


def parse_body(model: type[Model], raw: bytes, budget: JsonBudget) -> Model:
    """``raw`` (JSON bytes) validated as ``model``, or ``ValueError`` with a bounded message
    (see :func:`describe`). Call it off the event loop: it costs up to tens of milliseconds."""
    check_budget(raw, budget)
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise ValueError(describe(e)) from None


def describe(error: ValidationError, limit: int = MAX_REPORTED_ERRORS) -> str:
    """The first ``limit`` errors as ``"path: message"``, joined by ``"; "``; the input itself
    is never quoted (a 1 MB body must not come back as a 60 MB answer)."""
    errors = error.errors(include_url=False, include_input=False, include_context=False)
    parts = [f"{_path(e['loc'])}: {e['msg'][:MAX_MESSAGE_CHARS]}" for e in errors[:limit]]
    more = len(errors) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _path(loc: tuple[Any, ...]) -> str:
    # ("images", 0, "pixel-lists", 2) -> "images[0][2]"; () -> "body". Tags of union
    # branches are not identifiers, so they never read as field names.
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
    return out or "body"
