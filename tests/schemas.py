"""JSON schemas that structured-output requests are tested and benchmarked with: nested
objects, arrays with item bounds, enums, anyOf, required and optional fields, numbers with
bounds and string patterns. Each comes with a prompt that asks the built-in model for it."""

from __future__ import annotations

from typing import Any

# Bounded, as a schema for a small model should be: an unbounded integer or string lets a sampled
# answer run on to max_tokens (which the tests would count as a failure).
NAME = {"type": "string", "minLength": 1, "maxLength": 40}
SMALL_INT = {"type": "integer", "minimum": -100, "maximum": 100}
PERSON = {
    "type": "object",
    "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
    "required": ["name", "age"],
    "additionalProperties": False,
}

# (name, schema, prompt)
SCHEMAS: list[tuple[str, dict[str, Any], str]] = [
    ("person", PERSON, "Describe a person as JSON with a name and an age."),
    (
        "person_optional_email",
        {**PERSON, "properties": {**PERSON["properties"], "email": {"type": "string", "maxLength": 60}}},
        "Describe a person as JSON: name, age, and an email if you know one.",
    ),
    (
        "city",
        {
            "type": "object",
            "properties": {
                "city": NAME,
                "country": NAME,
                "population": {"type": "integer", "minimum": 1, "maximum": 50_000_000},
            },
            "required": ["city", "country", "population"],
        },
        "Give me a city as JSON with its country and population.",
    ),
    (
        "colour_enum",
        {
            "type": "object",
            "properties": {"colour": {"enum": ["red", "green", "blue"]}},
            "required": ["colour"],
        },
        "Pick a colour of the sky, as JSON.",
    ),
    (
        "sentiment",
        {
            "type": "object",
            "properties": {
                "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["sentiment", "confidence"],
        },
        "Classify the sentiment of 'I love this phone' as JSON.",
    ),
    (
        "tags",
        {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}},
            "required": ["tags"],
        },
        "Give two to four tags for a blog post about baking, as JSON.",
    ),
    (
        "numbers_exactly_three",
        {
            "type": "object",
            "properties": {
                "numbers": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1, "maximum": 9},
                    "minItems": 3,
                    "maxItems": 3,
                }
            },
            "required": ["numbers"],
        },
        "List three small numbers as JSON.",
    ),
    (
        "nested_address",
        {
            "type": "object",
            "properties": {
                "name": NAME,
                "address": {
                    "type": "object",
                    "properties": {
                        "street": NAME,
                        "city": NAME,
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["street", "city", "zip"],
                },
            },
            "required": ["name", "address"],
        },
        "Give a person and their postal address as JSON.",
    ),
    (
        "list_of_people",
        {
            "type": "object",
            "properties": {"people": {"type": "array", "items": PERSON, "minItems": 1, "maxItems": 3}},
            "required": ["people"],
        },
        "List up to three people with names and ages as JSON.",
    ),
    (
        "any_of_id",
        {
            "type": "object",
            "properties": {
                "id": {
                    "anyOf": [
                        {"type": "integer", "minimum": 0, "maximum": 99_999},
                        {"type": "string", "maxLength": 12},
                    ]
                }
            },
            "required": ["id"],
        },
        "Give an identifier for a product as JSON.",
    ),
    (
        "any_of_shape",
        {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}},
                    "required": ["kind", "radius"],
                },
                {
                    "type": "object",
                    "properties": {
                        "kind": {"const": "square"},
                        "side": {"type": "number", "minimum": 0},
                    },
                    "required": ["kind", "side"],
                },
            ]
        },
        "Describe a shape as JSON.",
    ),
    (
        "boolean_flags",
        {
            "type": "object",
            "properties": {"is_open": {"type": "boolean"}, "has_parking": {"type": "boolean"}},
            "required": ["is_open", "has_parking"],
        },
        "Is the shop open and does it have parking? Answer as JSON.",
    ),
    (
        "nullable_note",
        {
            "type": "object",
            "properties": {"title": NAME, "note": {"type": ["string", "null"], "maxLength": 40}},
            "required": ["title", "note"],
        },
        "Write a to-do item as JSON, with a note or null.",
    ),
    (
        "temperature_bounds",
        {
            "type": "object",
            "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 60}},
            "required": ["celsius"],
        },
        "What is a typical summer temperature in Paris? JSON please.",
    ),
    (
        "integer_exclusive",
        {
            "type": "object",
            "properties": {"rating": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 6}},
            "required": ["rating"],
        },
        "Rate a film from 1 to 5 as JSON.",
    ),
    (
        "date_pattern",
        {
            "type": "object",
            "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
            "required": ["date"],
        },
        "When did the first moon landing happen? Give the date as JSON.",
    ),
    (
        "code_pattern",
        {
            "type": "object",
            "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["code"],
        },
        "Give the airport code of a big city as JSON.",
    ),
    (
        "recipe",
        {
            "type": "object",
            "properties": {
                "title": NAME,
                "servings": {"type": "integer", "minimum": 1, "maximum": 12},
                "ingredients": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "item": NAME,
                            "grams": {"type": "integer", "minimum": 1, "maximum": 2000},
                        },
                        "required": ["item", "grams"],
                    },
                    "minItems": 1,
                    "maxItems": 3,
                },
            },
            "required": ["title", "servings", "ingredients"],
        },
        "Write a short pancake recipe as JSON.",
    ),
    (
        "matrix",
        {
            "type": "object",
            "properties": {
                "rows": {
                    "type": "array",
                    "items": {"type": "array", "items": SMALL_INT, "minItems": 2, "maxItems": 2},
                    "minItems": 2,
                    "maxItems": 2,
                }
            },
            "required": ["rows"],
        },
        "Give a 2 by 2 matrix of integers as JSON.",
    ),
    (
        "top_level_array",
        {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3},
        "List some fruits as a JSON array.",
    ),
    ("top_level_string_enum", {"enum": ["yes", "no"]}, "Is water wet? Answer yes or no as JSON."),
    (
        "top_level_integer",
        {"type": "integer", "minimum": 1, "maximum": 100},
        "Pick a number from 1 to 100, as JSON.",
    ),
    (
        "optional_only",
        {"type": "object", "properties": {"nickname": NAME, "hobby": NAME}},
        "Give a nickname and a hobby if you like, as JSON.",
    ),
    (
        "event",
        {
            "type": "object",
            "properties": {
                "name": NAME,
                "day": {"enum": ["monday", "tuesday", "wednesday", "thursday", "friday"]},
                "attendees": {"type": "integer", "minimum": 0, "maximum": 500},
                "online": {"type": "boolean"},
            },
            "required": ["name", "day", "attendees", "online"],
            "additionalProperties": False,
        },
        "Plan a team meeting as JSON.",
    ),
    (
        "definitions_ref",
        {
            "type": "object",
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {"x": SMALL_INT, "y": SMALL_INT},
                    "required": ["x", "y"],
                }
            },
            "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
            "required": ["start", "end"],
        },
        "Give a line segment's start and end points as JSON.",
    ),
    (
        "book",
        {
            "type": "object",
            "properties": {
                "title": NAME,
                "author": PERSON,
                "year": {"type": "integer", "minimum": 1450, "maximum": 2030},
                "genres": {
                    "type": "array",
                    "items": {"enum": ["fiction", "history", "science", "poetry"]},
                    "maxItems": 2,
                },
            },
            "required": ["title", "author", "year"],
        },
        "Describe a famous book as JSON.",
    ),
    (
        "product_const_currency",
        {
            "type": "object",
            "properties": {
                "product": NAME,
                "price": {"type": "number", "minimum": 0, "maximum": 10000},
                "currency": {"const": "EUR"},
            },
            "required": ["product", "price", "currency"],
        },
        "Price a coffee in euros, as JSON.",
    ),
]
