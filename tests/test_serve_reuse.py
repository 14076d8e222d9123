"""Visual-token reuse (the KV cache up to the visual block kept across questions about one medium) and the
structured answers of each face task, on the tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import write_video

from facellava import contract
from facellava.errors import FaceLlavaError
from facellava.runtime import structured

QUESTIONS = ["What emotion is shown?", "How old is this person?", "Is this face real?"]


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "face.mp4", frames=10)


@pytest.mark.parametrize("modality", ["image", "video"])
def test_questions_about_one_medium_reuse_its_visual_block_token_for_token(pipeline, face_photo, video_file,
                                                                           modality):
    source = {"image": face_photo} if modality == "image" else {"video": video_file}
    prefix = len(pipeline.session.prefix_ids)
    fresh = []
    for question in QUESTIONS:  # each from a cold medium: vision graph and the whole prompt
        pipeline.session.forget_medium()
        answer = pipeline.ask(question, **source, max_tokens=16)
        assert answer.reused_prefix_positions in (0, prefix) and answer.timings.vision_ms > 0  # 0: the very first
        fresh.append(answer)
    pipeline.session.forget_medium()
    reused = [pipeline.ask(question, **source, max_tokens=16) for question in QUESTIONS]
    visual = contract.IMAGE_TOKENS if modality == "image" else contract.NUM_FRAMES * contract.VIDEO_FRAME_TOKENS
    assert reused[0].reused_prefix_positions == prefix
    for answer, reference in zip(reused[1:], fresh[1:], strict=True):
        # everything up to the end of the visual block came from the cache; no vision graph ran
        assert answer.reused_prefix_positions >= prefix + visual
        assert answer.timings.vision_ms == 0 and answer.timings.face_detection_ms == 0  # same file: front end too
        assert answer.prompt_positions == reference.prompt_positions
    assert [a.tokens for a in reused] == [a.tokens for a in fresh]
    assert [a.text for a in reused] == [a.text for a in fresh]


def test_a_different_medium_replaces_the_cached_one(pipeline, face_photo):
    first = pipeline.ask(QUESTIONS[0], image=face_photo, max_tokens=8)
    other = pipeline.ask(QUESTIONS[0], image=face_photo, no_landmarks=True, max_tokens=8)  # other landmarks
    prefix = len(pipeline.session.prefix_ids)
    assert other.reused_prefix_positions == prefix and other.timings.vision_ms > 0
    again = pipeline.ask(QUESTIONS[0], image=face_photo, max_tokens=8)
    assert again.reused_prefix_positions == prefix and again.tokens == first.tokens
    stream = pipeline.ask(QUESTIONS[1], image=face_photo, max_tokens=8, stream=True)
    for _ in stream:
        break  # an answer abandoned half way leaves the cached medium usable
    after = pipeline.ask(QUESTIONS[0], image=face_photo, max_tokens=8)
    assert after.reused_prefix_positions >= prefix + contract.IMAGE_TOKENS and after.tokens == first.tokens
    pipeline.session.llm.reset()  # someone decoding on the LLM directly: the session notices, nothing is reused
    cleared = pipeline.ask(QUESTIONS[0], image=face_photo, max_tokens=8)
    assert cleared.reused_prefix_positions == 0 and cleared.tokens == first.tokens


@pytest.mark.parametrize("name", list(structured.TASKS))
def test_every_task_schema_yields_json_that_validates(pipeline, face_photo, video_file, name):
    task = structured.TASKS[name]
    jsonschema.Draft202012Validator.check_schema(task.schema)
    source = {"video": video_file} if name in ("emotion", "deepfake") else {"image": face_photo}
    for sampling in ({}, {"temperature": 1.0, "seed": 7}):
        answer = pipeline.ask(task.question, **source, grammar=task.grammar, max_tokens=task.max_tokens, **sampling)
        assert answer.finish_reason == "eos", answer.text
        value = structured.parse_answer(answer.text, task.schema)
        jsonschema.validate(value, task.schema)
        assert set(value) == set(task.schema["properties"])


def test_json_object_and_user_schemas(pipeline, face_photo):
    answer = pipeline.ask("Describe the face as JSON.", image=face_photo, grammar=structured.json_object_grammar(),
                          max_tokens=48)
    if answer.finish_reason == "eos":
        assert isinstance(json.loads(answer.text), dict)
    else:
        assert answer.text.startswith("{")
    schema = {"type": "object", "properties": {"smiling": {"type": "boolean"}}, "required": ["smiling"],
              "additionalProperties": False}
    answer = pipeline.ask("Is the person smiling?", image=face_photo, grammar=structured.schema_grammar(schema),
                          max_tokens=32)
    assert structured.parse_answer(answer.text, schema) in ({"smiling": True}, {"smiling": False})


@pytest.mark.parametrize(("schema", "message"), [
    ([], "must be an object"),
    ({"type": "array", "maxItems": 10**9}, "maxItems is 1000000000"),
    ({"type": "string", "pattern": "^a{5000}$"}, "pattern repeats"),
    ({"type": "nonsense"}, "not valid"),
    ({"$ref": "https://example.com/schema.json"}, "cannot use this JSON schema"),
])
def test_bad_user_schemas_are_one_line(schema, message):
    with pytest.raises(FaceLlavaError, match=message):
        structured.schema_grammar(schema)


def test_unknown_task_and_cut_answers_are_one_line():
    with pytest.raises(FaceLlavaError, match="unknown task 'mood'; expected one of emotion"):
        structured.get_task("mood")
    with pytest.raises(FaceLlavaError, match="not complete JSON"):
        structured.parse_answer('{"age": 3', structured.TASKS["age"].schema)
    with pytest.raises(FaceLlavaError, match="does not match"):
        structured.parse_answer('{"age": 300, "reason": ""}', structured.TASKS["age"].schema)


def test_run_task_needs_a_known_task(tiny_bundle, face_photo, capsys):
    from facellava.cli import main

    assert main(["run", str(tiny_bundle), "--image", str(face_photo), "--task", "mood", ""]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task 'mood'" in err
