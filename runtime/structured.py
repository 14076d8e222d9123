"""Structured answers: a JSON schema (or any JSON object) turned into a llama.cpp grammar that constrains decoding,
and the built-in schema of each face task.

```python
task = TASKS["emotion"]
answer = pipeline.ask(task.question, video="clip.mp4", grammar=task.grammar, max_tokens=task.max_tokens)
value = parse_answer(answer.text, task.schema)     # {"emotion": "happiness", "reason": "..."}
```

The grammar is built by llama.cpp's own JSON-schema converter (`llama_cpp.llama_grammar`), never with remote
`$ref` fetching. Each task schema is bounded (enums, short plain-text reasons, capped lists), so its grammar can
only produce a finite JSON text: with `max_tokens` at the task's bound the answer always closes, parses and
validates, whatever the model's weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from facellava.calibration.answers import ACTION_UNIT_NAMES, ATTRIBUTE_WORDS, EMOTIONS, TASK_PROMPTS
from facellava.errors import FaceLlavaError

# repetition counts in a user's schema are expanded by the converter and by llama.cpp's grammar parser (nested
# optional groups): a maxItems of 10**8 would exhaust memory, so larger counts are refused
MAX_REPETITION = 256
MAX_SCHEMA_DEPTH = 32
_REPETITION_KEYWORDS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
                        "minContains", "maxContains")
_PATTERN_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")

# a reason is short plain text: every character is one grammar step (no escapes), so its token count is bounded
REASON = {"type": "string", "pattern": r"^[A-Za-z0-9 ,.;:'()!?-]{0,160}$"}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


@dataclass(frozen=True)
class Task:
    """A face task's structured answer: the official question, the JSON schema of the answer, and a max_tokens
    that the schema's longest answer fits in."""

    name: str
    question: str
    schema: dict[str, Any]
    max_tokens: int = 512
    grammar: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grammar", schema_grammar(self.schema))


def json_object_grammar() -> str:
    """The grammar of any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def _check_bounded(node: Any, depth: int = 0) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise FaceLlavaError(f"the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, list):
        for item in node:
            _check_bounded(item, depth + 1)
    elif isinstance(node, dict):
        for key in _REPETITION_KEYWORDS:
            value = node.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_REPETITION:
                raise FaceLlavaError(f"the JSON schema's {key} is {value}; at most {MAX_REPETITION} is supported")
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            for low, high in _PATTERN_COUNT.findall(pattern):
                if max(int(low), int(high or 0)) > MAX_REPETITION:
                    raise FaceLlavaError(f"the JSON schema's pattern repeats more than {MAX_REPETITION} times")
        for value in node.values():
            _check_bounded(value, depth + 1)


def check_schema(schema: object) -> dict[str, Any]:
    """`schema` checked to be a valid JSON schema (draft 2020-12) of bounded size; returns it. Raises
    FaceLlavaError naming the problem."""
    import jsonschema

    if not isinstance(schema, dict):
        raise FaceLlavaError(f"the JSON schema must be an object, got {type(schema).__name__}")
    _check_bounded(schema)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise FaceLlavaError(f"the JSON schema is not valid: {error.message}") from None
    except RecursionError:
        raise FaceLlavaError("the JSON schema refers to itself without end") from None
    return schema


def schema_grammar(schema: object) -> str:
    """The GBNF grammar (llama.cpp) whose sentences are the JSON texts `schema` accepts. Raises FaceLlavaError for
    an invalid schema, one too large to expand, or one using what llama.cpp's converter does not support (remote
    `$ref`s are never fetched)."""
    from llama_cpp.llama_grammar import SchemaConverter

    schema = check_schema(schema)
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "input")
        converter.visit(resolved, "")
        return converter.format_grammar()
    except RecursionError:
        raise FaceLlavaError("the JSON schema refers to itself without end") from None
    except Exception as error:  # the converter reports what it cannot do with asserts, KeyErrors, ValueErrors
        raise FaceLlavaError(f"llama.cpp's grammar converter cannot use this JSON schema "
                             f"({type(error).__name__}: {error})") from None


def parse_answer(text: str, schema: dict[str, Any] | None = None) -> Any:
    """The JSON value of a structured answer, validated against `schema` when given. Raises FaceLlavaError when
    the text is not JSON (an answer cut at max_tokens) or does not validate."""
    import jsonschema

    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise FaceLlavaError(f"the answer is not complete JSON ({error}); raise max_tokens") from None
    if schema is not None:
        try:
            jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
        except jsonschema.ValidationError as error:
            raise FaceLlavaError(f"the answer does not match the JSON schema: {error.message}") from None
    return value


TASKS: dict[str, Task] = {
    "emotion": Task("emotion", TASK_PROMPTS["emotion"],
                    _object({"emotion": {"enum": list(EMOTIONS)}, "reason": REASON})),
    "action_units": Task("action_units", TASK_PROMPTS["action_units"],
                         _object({"action_units": {"type": "array", "items": {"enum": sorted(ACTION_UNIT_NAMES)},
                                                   "maxItems": len(ACTION_UNIT_NAMES)},
                                  "reason": REASON})),
    "age": Task("age", TASK_PROMPTS["age"], _object({"age": {"enum": list(range(0, 101))}, "reason": REASON})),
    "attributes": Task("attributes", TASK_PROMPTS["attributes"],
                       _object({"attributes": {"type": "array", "items": {"enum": sorted(ATTRIBUTE_WORDS)},
                                               "maxItems": 12},
                                "reason": REASON}), max_tokens=640),
    "deepfake": Task("deepfake", TASK_PROMPTS["deepfake"],
                     _object({"verdict": {"enum": ["real", "fake"]}, "reason": REASON})),
}


def get_task(name: object) -> Task:
    """The built-in task called `name`. Raises FaceLlavaError for any other name."""
    if not isinstance(name, str) or name not in TASKS:
        raise FaceLlavaError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]
