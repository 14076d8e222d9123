"""`facellava serve` on the tiny bundle, in process (FastAPI's TestClient) and once on a real uvicorn on loopback:
the same answer as `facellava run`, streaming, task schemas, the queue and the deadline, and every refusal
(key, limits, local paths, remote URLs, CORS, malformed bodies) as one JSON error in OpenAI's shape."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import socket
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facellava.cli import main
from facellava.runtime import structured
from facellava.runtime.serve.api import parse_chat_request
from facellava.runtime.serve.app import Engine, Job, ServeConfig, _Cancelled, create_app
from facellava.runtime.serve.media import MediaPolicy
from facellava.runtime.serve.metrics import Metrics

QUESTION = "What emotion is shown?"
# `facellava run` with the settings the server's pipeline is opened with
RUN_SETTINGS = ["--vision", "onnxruntime", "--llm", "f32", "--kv-cache", "f32", "--flash-attn", "off"]


@pytest.fixture(scope="module")
def photo_uri(face_photo) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(Path(face_photo).read_bytes()).decode()


@contextlib.contextmanager
def serving(pipeline, **config):
    with TestClient(create_app(pipeline, ServeConfig(model_name="tiny", **config))) as client:
        yield client


def chat(url: str, text: str = QUESTION, kind: str = "image_url", **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": kind, kind: {"url": url}}]}], **fields}


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert "Traceback" not in response.text
    for word in words:
        assert word in error["message"] or word == error["code"], error
    return error


def run_cli_json(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", *args, "--json", *RUN_SETTINGS]) == 0
    return json.loads(out.getvalue())


def sse_chunks(response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_the_server_answers_like_facellava_run_streamed_or_not(pipeline, tiny_bundle, face_photo, photo_uri):
    expected = run_cli_json(str(tiny_bundle), QUESTION, "--image", str(face_photo), "--max-tokens", "24")
    with serving(pipeline) as client:
        response = client.post("/v1/chat/completions", json=chat(photo_uri, max_tokens=24))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": expected["text"]}
        assert body["choices"][0]["finish_reason"] == ("length" if expected["finish_reason"] == "length" else "stop")
        assert body["usage"]["completion_tokens"] == len(expected["tokens"])
        assert body["usage"]["prompt_tokens"] == expected["prompt_positions"]

        with client.stream("POST", "/v1/chat/completions",
                           json=chat(photo_uri, max_tokens=24, stream=True,
                                     stream_options={"include_usage": True})) as streamed:
            assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
            events = sse_chunks(streamed)
        assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
        content = [e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]]
        assert len(content) > 2 and "".join(content) == expected["text"]
        finals = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
        assert len(finals) == 1 and events[-2]["usage"]["completion_tokens"] == len(expected["tokens"])
        # the second and third questions reused the photo's visual block from the KV cache
        assert finals[0]["facellava"]["reused_prefix_positions"] > body["usage"]["prompt_tokens"] - 30

        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert 'facellava_requests_total{path="/v1/chat/completions",code="200"} 2' in metrics.text
        assert "facellava_queue_length 0" in metrics.text and 'stage="vision"' in metrics.text
        assert client.get("/health").json() == {"status": "ok", "model": "tiny"}
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("name", ["age", "emotion"])
def test_task_answers_are_json_that_validates_and_match_run_task(pipeline, tiny_bundle, face_photo, photo_uri,
                                                                 name):
    task = structured.TASKS[name]
    expected = run_cli_json(str(tiny_bundle), "--task", name, "--image", str(face_photo), "")
    with serving(pipeline) as client:
        response = client.post("/v1/chat/completions", json=chat(photo_uri, text="", task=name))
        assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert content == expected["text"]
    jsonschema.validate(json.loads(content), task.schema)


def test_response_format_json_schema_and_json_object(pipeline, photo_uri):
    schema = {"type": "object", "properties": {"smiling": {"type": "boolean"}, "age": {"enum": [20, 40, 60]}},
              "required": ["smiling", "age"], "additionalProperties": False}
    with serving(pipeline) as client:
        response = client.post("/v1/chat/completions", json=chat(photo_uri, response_format={
            "type": "json_schema", "json_schema": {"name": "face", "schema": schema}}, max_tokens=40))
        assert response.status_code == 200, response.text
        jsonschema.validate(json.loads(response.json()["choices"][0]["message"]["content"]), schema)
        response = client.post("/v1/chat/completions", json=chat(photo_uri, response_format={"type": "json_object"},
                                                                 max_tokens=16))
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"].startswith("{")
        assert_error(client.post("/v1/chat/completions", json=chat(photo_uri, response_format={
            "type": "json_schema", "json_schema": {"schema": {"type": "array", "maxItems": 10**9}}})), 400,
                     "maxItems")
        assert_error(client.post("/v1/chat/completions", json=chat(photo_uri, task="mood")), 400, "unknown task")


def test_the_api_key(pipeline, photo_uri):
    with serving(pipeline, api_key="s3cret-key") as client:
        assert client.get("/health").status_code == 200  # the health check is public
        assert_error(client.get("/v1/models"), 401, "invalid_api_key")
        assert_error(client.get("/metrics"), 401, "invalid_api_key")
        assert_error(client.get("/v1/models", headers={"Authorization": "Bearer s3cret-kez"}), 401)
        assert_error(client.get("/v1/models", headers={"Authorization": "s3cret-key"}), 401)
        assert_error(client.post("/v1/chat/completions", json=chat(photo_uri),
                                 headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200


def test_limits(pipeline, photo_uri):
    with serving(pipeline, max_body_bytes=2000) as client:
        assert_error(client.post("/v1/chat/completions", json=chat(photo_uri)), 413, "request_too_large")
    with serving(pipeline, media=MediaPolicy(max_image_pixels=100 * 100)) as client:
        assert_error(client.post("/v1/chat/completions", json=chat(photo_uri)), 413, "image_too_large")
    with serving(pipeline, max_tokens_limit=8) as client:
        assert_error(client.post("/v1/chat/completions", json=chat(photo_uri, max_tokens=9)), 400, "at most 8")
    with serving(pipeline, request_timeout_s=1e-6) as client:
        assert_error(client.post("/v1/chat/completions", json=chat(photo_uri, max_tokens=4)), 504, "timeout")


def test_the_queue_is_bounded(pipeline, photo_uri):
    with serving(pipeline, max_queue=1) as client:
        engine: Engine = client.app.state.engine
        engine.admit()
        engine.admit()  # one answering, one waiting: the queue is full
        try:
            assert_error(client.post("/v1/chat/completions", json=chat(photo_uri)), 429, "queue_full")
            assert "facellava_queue_length 2" in client.get("/metrics").text
        finally:
            engine.release()
            engine.release()
        assert client.post("/v1/chat/completions", json=chat(photo_uri, max_tokens=2)).status_code == 200


def test_a_client_that_leaves_stops_its_generation(pipeline, face_photo, tmp_path):
    engine = Engine(pipeline, ServeConfig(), Metrics())
    body = chat("data:,", max_tokens=200)
    job = Job(parse_chat_request(body, 256, 2048), Path(face_photo), tmp_path / "work", time.monotonic() + 60)
    pieces = []

    def leave_after_two(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 2:
            job.cancel.set()

    engine.admit()
    with pytest.raises(_Cancelled):
        engine.run(job, leave_after_two)
    assert len(pieces) == 2 and engine.running == 0
    engine.close()


def test_local_paths(pipeline, face_photo, tmp_path):
    media_dir = tmp_path / "media"
    media_dir.mkdir()
    (media_dir / "face.jpg").write_bytes(Path(face_photo).read_bytes())
    (tmp_path / "secret.jpg").write_bytes(Path(face_photo).read_bytes())
    (media_dir / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    with serving(pipeline) as client:
        for url in (str(media_dir / "face.jpg"), f"file://{media_dir / 'face.jpg'}", "/etc/passwd", "face.jpg"):
            assert_error(client.post("/v1/chat/completions", json=chat(url)), 400, "local_media_refused")
    with serving(pipeline, media=MediaPolicy(local_dir=media_dir)) as client:
        for url in ("../secret.jpg", str(tmp_path / "secret.jpg"), "link.jpg", "file:///etc/passwd"):
            assert_error(client.post("/v1/chat/completions", json=chat(url)), 400, "local_media_refused")
        assert_error(client.post("/v1/chat/completions", json=chat("missing.jpg")), 400, "does not exist")
        response = client.post("/v1/chat/completions", json=chat("face.jpg", max_tokens=2))
        assert response.status_code == 200, response.text


@contextlib.contextmanager
def http_server(directory: Path):
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(directory))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_remote_urls(pipeline, face_photo, tmp_path):
    (tmp_path / "face.jpg").write_bytes(Path(face_photo).read_bytes())
    with http_server(tmp_path) as port:
        url = f"http://localhost:{port}/face.jpg"
        with serving(pipeline) as client:
            assert_error(client.post("/v1/chat/completions", json=chat(url)), 400, "remote_media_refused")
        with serving(pipeline, media=MediaPolicy(remote_hosts=frozenset({"example.org"}))) as client:
            assert_error(client.post("/v1/chat/completions", json=chat(url)), 400, "is not allowed")
        with serving(pipeline, media=MediaPolicy(remote_hosts=frozenset({"localhost", "127.0.0.1"}))) as client:
            for allowed_but_private in (url, f"http://127.0.0.1:{port}/face.jpg"):
                assert_error(client.post("/v1/chat/completions", json=chat(allowed_but_private)), 400,
                             "private address")
            assert_error(client.post("/v1/chat/completions", json=chat("ftp://localhost/face.jpg")), 400,
                         "local_media_refused")


def test_cors_is_off_unless_asked(pipeline):
    origin = {"Origin": "http://kiosk.local"}
    with serving(pipeline) as client:
        assert "access-control-allow-origin" not in client.get("/v1/models", headers=origin).headers
    with serving(pipeline, cors_origins=("http://kiosk.local",)) as client:
        assert client.get("/v1/models", headers=origin).headers["access-control-allow-origin"] == "http://kiosk.local"
        other = client.get("/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_bad_requests_are_one_json_error(pipeline, photo_uri):
    cases = [
        (b"not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b"[" * 100000, 400, ""),
        (json.dumps({"messages": []}).encode(), 400, "non-empty list"),
        (json.dumps(chat(photo_uri) | {"messages": [{"role": "system", "content": "x"}]}).encode(), 400, "'user'"),
        (json.dumps(chat(photo_uri, temperature=-1)).encode(), 400, "temperature"),
        (json.dumps(chat(photo_uri, top_p=2)).encode(), 400, "top_p"),
        (json.dumps(chat(photo_uri, seed=2**40)).encode(), 400, "seed"),
        (json.dumps(chat(photo_uri, max_tokens=0)).encode(), 400, "max_tokens"),
        (json.dumps(chat(photo_uri, text="   ")).encode(), 400, "empty"),
        (json.dumps(chat(photo_uri, n=3)).encode(), 400, "n must be 1"),
        (json.dumps(chat("data:image/png;base64,%%%")).encode(), 400, "not valid base64"),
        (json.dumps(chat("data:text/plain;base64,aGVsbG8=")).encode(), 400, "text/plain"),
        (json.dumps(chat("data:image/png;base64,aGVsbG8=")).encode(), 400, "invalid_image"),
        (json.dumps(chat("data:video/mp4;base64,aGVsbG8=", kind="video_url")).encode(), 400, "invalid_video"),
    ]
    with serving(pipeline) as client:
        for body, status, words in cases:
            assert_error(client.post("/v1/chat/completions", content=body,
                                     headers={"Content-Type": "application/json"}), status, *filter(None, [words]))
        assert_error(client.get("/nothing-here"), 404)
        wrong_method = client.get("/v1/chat/completions")  # 404 where the page's static mount at / answers GETs
        assert_error(wrong_method, 405 if wrong_method.status_code == 405 else 404)


# --- a bounded fuzz of request bodies: every one a clean 4xx, never a 500 -------------------------------------

_scalars = st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=True) | st.text(max_size=20)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_junk_uri = st.sampled_from(["data:image/jpeg;base64,", "data:video/mp4;base64,", "data:", "", "/etc/",
                             "http://127.0.0.1/", "file:///"]).flatmap(
    lambda prefix: st.binary(max_size=64).map(lambda b: prefix + base64.b64encode(b).decode()))
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30) | _json}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _junk_uri})}),
    st.fixed_dictionaries({"type": st.just("video_url"), "video_url": st.fixed_dictionaries({"url": _junk_uri})}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "audio", "video_url"]), "image_url": _json}),
    _json)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", 3]),
                                  "content": st.lists(_part, max_size=4) | _json})
_body = st.fixed_dictionaries(
    {"messages": st.lists(_message, max_size=2) | _json},
    optional={"model": _json, "stream": st.booleans() | _json, "max_tokens": st.integers(-5, 10**6) | _json,
              "temperature": _scalars, "top_p": _scalars, "top_k": _scalars, "seed": _scalars, "n": _scalars,
              "task": st.sampled_from([*structured.TASKS, "x"]) | _json, "stop": _json,
              "stream_options": _json,
              "response_format": st.fixed_dictionaries({"type": st.sampled_from(["json_schema", "json_object",
                                                                                  "text", "xml"]),
                                                        "json_schema": st.fixed_dictionaries({"schema": _json})})
              | _json})
_raw = st.one_of(_body.map(lambda b: json.dumps(b).encode()), _json.map(lambda b: json.dumps(b).encode()),
                 st.binary(max_size=200))

FUZZ_CASES = 100


@pytest.fixture(scope="module")
def fuzz_client(pipeline):
    with serving(pipeline, max_body_bytes=64 * 1024) as client:
        yield client


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
@given(body=_raw)
def test_fuzzed_bodies_are_clean_4xx_errors(fuzz_client, body):
    response = fuzz_client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
    assert_error(response, response.status_code)


# --- a real uvicorn on loopback --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_real_server_on_loopback_streams_and_survives_a_client_that_leaves(pipeline, photo_uri):
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipeline, ServeConfig(model_name="tiny")), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            time.sleep(0.05)
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat(photo_uri, max_tokens=400, stream=True),
                          timeout=60) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first event, then the client leaves
        complete = httpx.post(f"{base}/v1/chat/completions", json=chat(photo_uri, max_tokens=8), timeout=60)
        assert complete.status_code == 200 and complete.json()["usage"]["completion_tokens"] <= 8
        metrics = httpx.get(f"{base}/metrics").text
        assert "facellava_requests_running 0" in metrics
        # only the complete answer was counted: the abandoned one stopped before its end
        tokens = complete.json()["usage"]["completion_tokens"]
        assert f"facellava_generated_tokens_total {tokens}\n" in metrics
    finally:
        server.should_exit = True
        thread.join(timeout=30)
