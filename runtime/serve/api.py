"""The OpenAI chat-completions request, read and checked: one user message holding the question and one image
or video, the sampling values, `response_format` and the face `task`. Every refusal is an ApiError carrying
OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`).

Content parts:

- `{"type": "text", "text": "..."}` (several are joined by new lines; a plain string content is one text part),
- `{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}`,
- `{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`,

where `url` may also be a local path (`/dir/face.jpg`, `file:///dir/face.jpg`) under `--allow-local-media` or an
`http(s)` URL on a host of `--allow-remote-media`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from facellava.errors import FaceLlavaError
from facellava.runtime import structured
from facellava.runtime.session import Sampling, check_max_tokens, check_question

MEDIA_PARTS = {"image_url": "image", "video_url": "video"}


class ApiError(Exception):
    """A refused request: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


@dataclass
class MediaRef:
    """The image or video a request asks about, as its part gave it (not fetched yet)."""

    modality: str  # "image" or "video"
    url: str


@dataclass
class ChatRequest:
    question: str
    media: MediaRef
    stream: bool
    include_usage: bool
    max_tokens: int
    sampling: Sampling
    task: structured.Task | None
    schema: dict[str, Any] | None  # what the answer must validate against (the task's or the user's)
    model: str | None


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object. Raises ApiError (400) for anything else."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON ({error})") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(value, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(value).__name__}")
    return value


def _text_of(part: dict[str, Any], where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise bad_request(f"{where}.text must be a string", where)
    return text


def _media_of(part: dict[str, Any], kind: str, where: str) -> MediaRef:
    inner = part.get(kind)
    url = inner.get("url") if isinstance(inner, dict) else inner
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.{kind}.url must be a non-empty string (a data: URI)", f"{where}.{kind}")
    return MediaRef(MEDIA_PARTS[kind], url)


def _read_messages(messages: object) -> tuple[str, MediaRef]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    if len(messages) != 1:
        raise bad_request("this server answers one question about one image or video per request: send exactly one "
                          "user message (the llava_v1 system prompt is fixed)", "messages")
    message = messages[0]
    if not isinstance(message, dict):
        raise bad_request("messages[0] must be an object", "messages[0]")
    if message.get("role") != "user":
        raise bad_request(f"messages[0].role must be 'user', got {message.get('role')!r}", "messages[0].role")
    content = message.get("content")
    if isinstance(content, str):
        raise bad_request("messages[0].content must be a list holding one image_url or video_url part and the "
                          "question as text parts", "messages[0].content")
    if not isinstance(content, list) or not content:
        raise bad_request("messages[0].content must be a non-empty list of parts", "messages[0].content")
    texts: list[str] = []
    media: list[MediaRef] = []
    for index, part in enumerate(content):
        where = f"messages[0].content[{index}]"
        if not isinstance(part, dict):
            raise bad_request(f"{where} must be an object", where)
        kind = part.get("type")
        if kind == "text":
            texts.append(_text_of(part, where))
        elif kind in MEDIA_PARTS:
            media.append(_media_of(part, kind, where))
        else:
            raise bad_request(f"{where}.type must be 'text', 'image_url' or 'video_url', got {kind!r}",
                              f"{where}.type")
    if len(media) != 1:
        raise bad_request(f"messages[0].content must hold exactly one image_url or video_url part, got {len(media)}",
                          "messages[0].content")
    return "\n".join(texts), media[0]


def _read_response_format(value: object) -> dict[str, Any] | str | None:
    """None (free text), "json_object", or a user's JSON schema."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("response_format must be an object", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object"
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                              "response_format.json_schema")
        return spec["schema"]
    raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                      "response_format.type")


def _number(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


def parse_chat_request(body: dict[str, Any], default_max_tokens: int, max_tokens_limit: int) -> ChatRequest:
    """A checked ChatRequest from a chat-completions body. Greedy unless `temperature` > 0 (OpenAI's default of 1
    is not applied: the model's answers are meant to be reproducible). Raises ApiError (400) naming the field."""
    question, media = _read_messages(body.get("messages"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage") is True)
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("n must be 1: one answer per request", "n")
    if body.get("stop") is not None:
        raise bad_request("stop is not supported: answers stop at the model's end of turn", "stop")

    task = None
    if body.get("task") is not None:
        try:
            task = structured.get_task(body["task"])
        except FaceLlavaError as error:
            raise bad_request(str(error), "task") from None
    response_format = _read_response_format(body.get("response_format"))
    if task is not None and response_format is not None:
        raise bad_request("give a task or a response_format, not both (a task brings its own JSON schema)",
                          "response_format")
    try:
        if task is not None:
            grammar, schema = task.grammar, task.schema
            question = question if question.strip() else task.question
        elif response_format == "json_object":
            grammar, schema = structured.json_object_grammar(), {"type": "object"}
        elif response_format is not None:
            schema = response_format  # type: ignore[assignment]
            grammar = structured.schema_grammar(schema)
        else:
            grammar, schema = None, None
    except FaceLlavaError as error:
        raise bad_request(str(error), "response_format.json_schema.schema") from None

    default = task.max_tokens if task is not None else default_max_tokens
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    try:
        check_question(question)
        max_tokens = check_max_tokens(default if limit is None else limit)
    except FaceLlavaError as error:
        raise bad_request(str(error), "max_tokens" if "max_tokens" in str(error) else "messages") from None
    if max_tokens > max_tokens_limit:
        raise bad_request(f"max_tokens is {max_tokens}; this server allows at most {max_tokens_limit}", "max_tokens")
    try:
        sampling = Sampling(_number(body, "temperature", 0.0), _number(body, "top_p", 1.0),
                            _number(body, "top_k", 0), _number(body, "seed", 0), grammar)
    except FaceLlavaError as error:
        param = str(error).split(" ", 1)[0]
        raise bad_request(str(error), param if param in ("temperature", "top_p", "top_k", "seed") else None) from None
    return ChatRequest(question, media, stream, include_usage, max_tokens, sampling, task, schema, model)
