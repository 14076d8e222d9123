"""The runtime end to end on the tiny bundle: the same greedy answer as the PyTorch reference, the session's
KV-cache reuse, streaming and sampling, and the CLI's handling of bad input."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_video
from PIL import Image

from facellava import contract
from facellava.cli import main
from facellava.errors import FaceLlavaError
from facellava.runtime.pipeline import Pipeline
from facellava.runtime.session import ChatSession

QUESTION = "What emotion is shown?"


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "face.mp4", frames=10)


@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("with_landmarks", [True, False])
def test_pipeline_answers_token_for_token_like_the_reference(pipeline, tiny_model, face_photo, video_file,
                                                             modality, with_landmarks):
    source = {"image": face_photo} if modality == "image" else {"video": video_file}
    answer = pipeline.ask(QUESTION, **source, no_landmarks=not with_landmarks, max_tokens=24)
    assert answer.landmarks == ("face mesh" if with_landmarks else "none")

    # the reference: the same preprocessed input through the PyTorch model and greedy decoding
    prepared = pipeline.prepare(**source, no_landmarks=not with_landmarks)
    pixels = torch.from_numpy(prepared.pixel_values)
    landmarks = None if prepared.landmarks is None else torch.from_numpy(prepared.landmarks)
    with torch.no_grad():
        if modality == "image":
            blocks = [tiny_model.encode_image(pixels, landmarks)[0]]
        else:
            blocks = list(tiny_model.encode_video(pixels, landmarks)[0])
    reference = tiny_model.generate_reference(tiny_model.prompt_ids(QUESTION, modality), blocks,
                                              max_new_tokens=24, stop_at_eos=True)
    expected = [t for t in reference.tokens if t != tiny_model.config.eos_token_id]
    assert answer.tokens == expected
    assert answer.finish_reason == ("eos" if reference.tokens[-1] == 2 else "length")
    assert answer.text == pipeline.session.llm.detokenize(answer.tokens)
    visual = contract.IMAGE_TOKENS if modality == "image" else contract.NUM_FRAMES * contract.VIDEO_FRAME_TOKENS
    assert answer.prompt_positions == len(tiny_model.prompt_ids(QUESTION, modality)) - len(blocks) + visual
    timings = answer.timings
    assert timings.vision_ms > 0 and timings.time_to_first_token_ms > 0 and timings.preprocessing_ms > 0
    assert (timings.landmarks_ms > 0) == with_landmarks and timings.face_detection_ms > 0


def test_the_system_prefix_stays_in_the_kv_cache(pipeline, face_photo):
    first = pipeline.ask(QUESTION, image=face_photo, max_tokens=12)
    pipeline.session.forget_medium()  # the system prompt only (the same image would reuse its visual block too)
    second = pipeline.ask(QUESTION, image=face_photo, max_tokens=12)
    prefix = len(pipeline.session.prefix_ids)
    assert prefix > 20 and second.reused_prefix_positions == prefix
    assert second.tokens == first.tokens  # reusing the cache changes nothing
    other = pipeline.ask("How old is this person?", image=face_photo, no_landmarks=True, max_tokens=12)
    assert other.reused_prefix_positions == prefix


def test_streaming_and_sampling(pipeline, face_photo):
    stream = pipeline.ask(QUESTION, image=face_photo, max_tokens=20, stream=True)
    pieces = list(stream)
    assert stream.answer is not None and "".join(pieces) == stream.answer.text
    assert len(pieces) > 1 and stream.answer.finish_reason in ("eos", "length")

    sampled = [pipeline.ask(QUESTION, image=face_photo, max_tokens=20, temperature=1.5, seed=seed).tokens
               for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    short = pipeline.ask(QUESTION, image=face_photo, max_tokens=3, temperature=1.5, top_k=5, top_p=0.9, seed=3)
    assert len(short.tokens) <= 3


def test_the_torch_backend_is_the_reference_the_onnx_backend_matches(pipeline, tiny_bundle, tiny_checkpoint,
                                                                     face_photo, tmp_path):
    from facellava.runtime.vision import open_vision

    prepared = pipeline.prepare(image=face_photo)
    # the checkpoint is given, never taken from the manifest (a path outside the bundle), and must be the source
    with pytest.raises(FaceLlavaError, match="pass --checkpoint") as missing:
        open_vision(pipeline.bundle, "torch")
    assert f"(the bundle records '{tiny_checkpoint.resolve()}')" in str(missing.value)
    other = shutil.copytree(tiny_checkpoint, tmp_path / "other")
    (other / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FaceLlavaError, match="is not the checkpoint .* was exported from"):
        open_vision(pipeline.bundle, "torch", checkpoint=other)
    with pytest.raises(FaceLlavaError, match="torch vision backend only"):
        open_vision(pipeline.bundle, "onnxruntime", checkpoint=tiny_checkpoint)
    reference = open_vision(pipeline.bundle, "torch", checkpoint=tiny_checkpoint).encode(
        "image", prepared.pixel_values, prepared.landmarks)
    exported = pipeline.vision.encode("image", prepared.pixel_values, prepared.landmarks)
    assert reference.shape == exported.shape == (1, 256, 256)
    assert np.linalg.norm(exported - reference) / np.linalg.norm(reference) < 1e-4
    with pytest.raises(FaceLlavaError, match="no fp16 image vision graph"):
        open_vision(pipeline.bundle, "onnxruntime", "fp16").encode("image", prepared.pixel_values, None)
    with pytest.raises(FaceLlavaError, match="unknown vision backend"):
        open_vision(pipeline.bundle, "cuda-magic")


def test_stop_strings_are_cut_even_across_pieces(pipeline):
    session = ChatSession(pipeline.session.llm, stop=("</s>", "###"))
    assert session._split_stop("Happy</") == ("Happy", "</", False)
    assert session._split_stop("Happy</s> and more") == ("Happy", "", True)
    assert session._split_stop("a # b") == ("a # b", "", False)
    assert session._split_stop("a ##") == ("a ", "##", False)


def test_a_prompt_longer_than_the_context_is_a_clear_error(tiny_bundle, video_file):
    small = Pipeline.open(tiny_bundle, vision="onnxruntime", n_ctx=512)
    try:
        with pytest.raises(FaceLlavaError, match="context holds 512"):
            small.ask(QUESTION, video=video_file, no_landmarks=True)
    finally:
        small.close()


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def expect_error(bundle, pattern: str, *args) -> None:
    code, _, err = run_cli("run", bundle, *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and pattern in lines[0], err


def expect_answer(bundle, *args) -> dict:
    code, out, err = run_cli("run", bundle, "--json", "--max-tokens", "4", *args)
    assert code == 0, err
    return json.loads(out)


def test_cli_bad_and_unusual_inputs(tmp_path, tiny_bundle, face_photo):
    expect_error(tiny_bundle, "image not found", QUESTION, "--image", tmp_path / "missing.jpg")
    (tmp_path / "text.jpg").write_text("not an image at all")
    expect_error(tiny_bundle, "text.jpg", QUESTION, "--image", tmp_path / "text.jpg")
    data = face_photo.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    expect_error(tiny_bundle, "truncated.jpg", QUESTION, "--image", tmp_path / "truncated.jpg")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    expect_error(tiny_bundle, "tiny.png", QUESTION, "--image", tmp_path / "tiny.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    expect_error(tiny_bundle, "no face found", QUESTION, "--image", tmp_path / "noise.png")
    assert expect_answer(tiny_bundle, QUESTION, "--image", tmp_path / "noise.png", "--no-face-crop")
    expect_error(tiny_bundle, "question is empty", "  ", "--image", face_photo)
    (tmp_path / "garbage.mp4").write_bytes(rng.integers(0, 255, 5000, dtype=np.uint8).tobytes())
    expect_error(tiny_bundle, "garbage.mp4", QUESTION, "--video", tmp_path / "garbage.mp4")

    photo = Image.open(face_photo)
    photo.convert("L").save(tmp_path / "gray.png")
    photo.convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    photo.resize((4000, 4000), Image.BICUBIC).save(tmp_path / "large.jpg", quality=90)
    for name in ("gray.png", "rgba.png", "gray16.png", "large.jpg"):
        answer = expect_answer(tiny_bundle, QUESTION, "--image", tmp_path / name)
        assert answer["landmarks"] == "face mesh" and answer["modality"] == "image", name

    short = write_video(tmp_path / "short.mp4", frames=5)  # fewer than 8: frames repeat, as officially
    assert expect_answer(tiny_bundle, QUESTION, "--video", short)["modality"] == "video"
    np.save(tmp_path / "landmarks.npy", rng.uniform(60, 200, (68, 2)).astype(np.float32))
    assert expect_answer(tiny_bundle, QUESTION, "--image", face_photo, "--landmarks",
                         tmp_path / "landmarks.npy")["landmarks"] == "file"
    np.save(tmp_path / "wrong.npy", np.zeros((5, 3), np.float32))
    expect_error(tiny_bundle, "wrong.npy", QUESTION, "--image", face_photo, "--landmarks", tmp_path / "wrong.npy")
    expect_error(tiny_bundle, "no q4_k_m GGUF", QUESTION, "--image", face_photo, "--llm", "q4_k_m")
    expect_error(tiny_bundle, "camera 9 cannot be opened", QUESTION, "--camera", "9")


def test_cli_device_picks_onnx_runtimes_providers(tiny_bundle, face_photo):
    import onnxruntime

    answers = [expect_answer(tiny_bundle, QUESTION, "--image", face_photo, *device)
               for device in ([], ["--device", "cpu"])]
    assert answers[0]["tokens"] and answers[0]["tokens"] == answers[1]["tokens"]
    assert answers[0]["landmarks"] == answers[1]["landmarks"] == "face mesh"
    device, provider = next((d, p) for d, p in (("cuda", "CUDAExecutionProvider"),
                                                 ("tensorrt", "TensorrtExecutionProvider"))
                            if p not in onnxruntime.get_available_providers())  # this CPU build lacks both
    expect_error(tiny_bundle, f"has no {provider}", QUESTION, "--image", face_photo, "--device", device)


def test_cli_refuses_a_damaged_bundle(tmp_path, tiny_bundle, face_photo):
    import shutil

    damaged = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    gguf = damaged / "llm-f32.gguf"
    data = bytearray(gguf.read_bytes())
    data[-10] ^= 0x55
    gguf.write_bytes(bytes(data))
    expect_error(damaged, "does not match its manifest sha256", QUESTION, "--image", face_photo)
    (damaged / "vision_image.onnx").unlink()
    gguf.write_bytes(bytes(data[:100]))
    expect_error(damaged, "llm-f32.gguf has 100 bytes", QUESTION, "--image", face_photo)
    expect_error(tmp_path / "nothing", "does not exist", QUESTION, "--image", face_photo)


def test_cli_streams_then_prints_one_timing_line(tiny_bundle, face_photo):
    result = subprocess.run([sys.executable, "-m", "facellava", "run", str(tiny_bundle), "--image", str(face_photo),
                             "--max-tokens", "6", QUESTION], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.rstrip("\n").split("\n")
    assert "time to first token" in lines[-1] and "vision: onnxruntime" in lines[-1]
    assert "Traceback" not in result.stderr


def test_the_runtime_needs_neither_torch_nor_transformers():
    code = ("import sys, facellava.runtime.pipeline, facellava.runtime.cli, facellava.runtime.vision; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
