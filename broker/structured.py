"""Structured outputs in the request contract: how a `response_format` schema becomes the
grammar a worker enforces (llguidance; why this library: docs/decisions.md, "Structured
outputs"), and the check the gateway runs before queueing one.

The output's layout is fixed: no free whitespace between JSON's tokens, ", " between items and
": " after keys, as `json.dumps` writes. A small model given free whitespace can fill its whole
budget with newlines; one layout also keeps a greedy answer the same from run to run."""

from __future__ import annotations

import json
from typing import Any

LAYOUT: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# `response_format: {"type": "json_object"}`: any JSON object.
ANY_OBJECT = json.dumps({"type": "object"})
# The most schema text a request may carry.
MAX_SCHEMA_CHARS = 64_000


class SchemaError(ValueError):
    """A schema that cannot be enforced; the message names what is wrong or not supported."""


def grammar_of(schema_text: str) -> str:
    """llguidance's grammar for a JSON schema (as text), with Corral's layout."""
    from llguidance import LLMatcher

    return str(LLMatcher.grammar_from_json_schema(schema_text, defaults=LAYOUT))


# Keywords whose value is a subschema, a list of them, or a map of names to them.
_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that lists its
    properties and says nothing about others, as vLLM's default (xgrammar's strict mode) and
    OpenAI's strict mode have it: a small model left free to add keys keeps adding them until
    max_tokens cuts the JSON off. A schema that wants other keys says so."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(item) for item in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(item) for name, item in out[key].items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def check_schema(schema: dict[str, Any]) -> str:
    """The schema as the text workers compile; raises SchemaError naming the problem when it
    cannot be enforced (an unsupported keyword, a bad pattern, a dangling $ref). Needs no
    tokenizer."""
    from llguidance import LLMatcher

    # llguidance reads its own options from "x-guidance": the layout is Corral's, not the client's.
    schema = {key: value for key, value in schema.items() if key != "x-guidance"}
    text = json.dumps(closed_objects(schema), separators=(",", ":"))
    if len(text) > MAX_SCHEMA_CHARS:
        raise SchemaError(f"the schema is {len(text)} characters; at most {MAX_SCHEMA_CHARS}")
    try:
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar_of(text))
    except (ValueError, TypeError) as e:
        raise SchemaError(str(e)) from e
    if failed:
        raise SchemaError("; ".join(messages) or "the schema cannot be compiled")
    return text
