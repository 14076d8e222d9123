"""The native runner (`CMakeLists.txt`, native/): the built `facellava-native` against the Python runtime on the tiny
bundle, token for token (image and video, landmarks from a file and none, --no-face-crop, greedy); its
preprocessing against runtime.preprocess through libfacellava's C ABI; bad inputs as one line and a non-zero exit;
and the contract header generated from facellava/contract.py.

The build is found at $FACELLAVA_NATIVE_BUILD or build/native (native/README.md; .ci/run builds it). Without it
the tests that need it skip, saying so.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import FACE_PHOTO, REPO, write_video

BUILD = Path(os.environ.get("FACELLAVA_NATIVE_BUILD", REPO / "build" / "native"))
CLI = BUILD / "facellava-native"
LIBRARY = BUILD / "libfacellava.so"
QUESTION = "What emotion is shown on this face?"
MAX_TOKENS = 24
# the F32 cache and exact attention of conftest's `pipeline`, given to the native runner too
EXACT = ["--kv-cache", "f32", "--flash-attn", "off"]


def sanitized() -> bool:
    cache = BUILD / "CMakeCache.txt"
    return cache.is_file() and "FACELLAVA_SANITIZE:BOOL=ON" in cache.read_text()


@pytest.fixture(scope="module")
def native() -> Path:
    if not CLI.is_file():
        pytest.skip(f"the native runner is not built ({CLI} is missing): build it as native/README.md says "
                    "(.ci/run does)")
    return CLI


def run_native(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("native") / "clip.mp4", 12)


@pytest.fixture(scope="module")
def landmark_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Official-format landmarks (crop pixels, 0..256): one (68, 2) array for the photo, (12, 68, 2) for the clip."""
    folder = tmp_path_factory.mktemp("landmarks")
    rng = np.random.default_rng(15)
    files = {"image": folder / "photo.npy", "video": folder / "clip.npy"}
    np.save(files["image"], rng.uniform(40, 216, (68, 2)).astype(np.float32))
    np.save(files["video"], rng.uniform(40, 216, (12, 68, 2)))  # float64, as numpy saves by default
    return files


# --- the contract header --------------------------------------------------------------------------------------


def test_contract_header_is_generated_from_the_contract():
    sys.path.insert(0, str(REPO / "native"))
    try:
        import gen_contract
    finally:
        sys.path.remove(str(REPO / "native"))
    from facellava.runtime.pipeline import LLM_PREFERENCE

    assert gen_contract.HEADER.read_text() == gen_contract.render(), "run python native/gen_contract.py"
    assert gen_contract.LLM_PREFERENCE == LLM_PREFERENCE
    text = gen_contract.render()
    assert 'STOP_STRING = "</s>"' in text and "IMAGE_TOKENS = 256;" in text and "VIDEO_FRAME_TOKENS = 257;" in text


# --- token for token ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("marks", ["file", "none"])
def test_native_answer_is_the_python_answer(native, pipeline, tiny_bundle, clip, landmark_files, modality, marks):
    medium = {"image": FACE_PHOTO} if modality == "image" else {"video": clip}
    landmarks = landmark_files[modality] if marks == "file" else None
    expected = pipeline.ask(QUESTION, **medium, landmarks=landmarks, no_landmarks=marks == "none", no_face_crop=True,
                            max_tokens=MAX_TOKENS)
    options = ["--landmarks", landmarks] if landmarks else ["--no-landmarks"]
    result = run_native(tiny_bundle, f"--{modality}", medium[modality], *options, "--no-face-crop", "--json",
                        "--max-tokens", MAX_TOKENS, *EXACT, QUESTION)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["tokens"] == expected.tokens and len(expected.tokens) > 0
    assert answer["text"] == expected.text
    assert answer["finish_reason"] == expected.finish_reason
    assert (answer["modality"], answer["landmarks"]) == (modality, marks)
    assert answer["prompt_positions"] == expected.prompt_positions
    assert answer["prompt_positions"] > (2056 if modality == "video" else 256)
    assert list(answer["timings"]) == list(asdict(expected.timings))


def test_native_streams_like_facellava_run(native, tiny_bundle):
    """The CLIs side by side with their default options (llama.cpp's F16 cache, automatic flash attention): the
    streamed text, then the summary line; and the --json objects with the same keys."""
    args = [tiny_bundle, "--image", FACE_PHOTO, "--no-face-crop", "--no-landmarks", "--max-tokens", 12, QUESTION]
    python = subprocess.run([sys.executable, "-m", "facellava", "run", *map(str, args)], capture_output=True,
                            text=True, timeout=600)
    ours = run_native(*args)
    assert python.returncode == 0 and ours.returncode == 0, (python.stderr, ours.stderr)
    python_text, python_summary = python.stdout.rstrip("\n").rsplit("\n", 1)
    our_text, our_summary = ours.stdout.rstrip("\n").rsplit("\n", 1)
    assert our_text == python_text
    # "[image, landmarks: none, vision: onnxruntime, 12 tokens, length] face 0.1 ms | ...": the same but the times
    assert our_summary.split("]")[0] == python_summary.split("]")[0]
    assert re.sub(r"\d+\.\d", "N", our_summary) == re.sub(r"\d+\.\d", "N", python_summary)
    python_json = json.loads(subprocess.run([sys.executable, "-m", "facellava", "run", *map(str, args), "--json"],
                                            capture_output=True, text=True, timeout=600).stdout)
    our_json = json.loads(run_native(*args, "--json").stdout)
    assert list(our_json) == list(python_json) and list(our_json["timings"]) == list(python_json["timings"])
    assert our_json["tokens"] == python_json["tokens"]


# --- preprocessing through the C ABI --------------------------------------------------------------------------


class Request(ctypes.Structure):
    _fields_ = [("image", ctypes.c_char_p), ("video", ctypes.c_char_p), ("landmarks_npy", ctypes.c_char_p),
                ("no_landmarks", ctypes.c_int), ("no_face_crop", ctypes.c_int), ("max_tokens", ctypes.c_int),
                ("temperature", ctypes.c_float), ("top_p", ctypes.c_float), ("top_k", ctypes.c_int),
                ("seed", ctypes.c_uint32)]


@pytest.fixture(scope="module")
def library(native) -> ctypes.CDLL:
    if sanitized() and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("a sanitizer build loads into Python only with its runtime first: LD_PRELOAD=$(gcc "
                    "-print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0")
    lib = ctypes.CDLL(str(LIBRARY))
    lib.facellava_preprocess.restype = ctypes.POINTER(ctypes.c_float)
    lib.facellava_preprocess.argtypes = [ctypes.POINTER(Request), ctypes.POINTER(ctypes.c_size_t),
                                         ctypes.POINTER(ctypes.c_char_p)]
    lib.facellava_free.argtypes = [ctypes.c_void_p]
    return lib


def native_pixels(lib: ctypes.CDLL, image: Path | None = None, video: Path | None = None) -> np.ndarray:
    request = Request()
    lib.facellava_request_default(ctypes.byref(request))
    request.image = str(image).encode() if image else None
    request.video = str(video).encode() if video else None
    request.no_face_crop = 1
    count, error = ctypes.c_size_t(), ctypes.c_char_p()
    pointer = lib.facellava_preprocess(ctypes.byref(request), ctypes.byref(count), ctypes.byref(error))
    assert pointer, error.value
    try:
        return np.ctypeslib.as_array(pointer, shape=(count.value,)).copy()
    finally:
        lib.facellava_free(ctypes.cast(pointer, ctypes.c_void_p))


@pytest.mark.parametrize("shape", [(512, 512), (480, 640), (500, 301), (150, 200), (224, 224)])
def test_native_image_pixels_are_the_python_pixels_bit_for_bit(library, tmp_path, shape):
    import cv2

    from facellava.runtime.face import load_image
    from facellava.runtime.preprocess import expand2square, preprocess_image

    photo = cv2.imread(str(FACE_PHOTO))
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), cv2.resize(photo, shape[::-1], interpolation=cv2.INTER_AREA))
    expected = preprocess_image(expand2square(load_image(path)))
    ours = native_pixels(library, image=path)
    assert ours.shape == (3 * 224 * 224,)
    assert np.array_equal(ours, expected.ravel())  # Pillow's float bicubic, reproduced to the bit


def test_native_video_pixels_match_within_the_opencv_builds_difference(library, clip):
    # the frames decode identically; the bilinear resize differs: the opencv-python wheel resizes float images
    # with Intel IPP, Debian's OpenCV without (cv2.ipp.setUseIPP(False) gives Debian's result exactly)
    from facellava.runtime.face import read_video
    from facellava.runtime.preprocess import expand2square, preprocess_video

    expected = preprocess_video([expand2square(frame) for frame in read_video(clip).frames]).ravel()
    ours = native_pixels(library, video=clip)
    difference = np.abs(ours - expected).max()
    print(f"native vs Python video pixels: max-abs {difference:.2e}")
    assert ours.shape == expected.shape and difference < 2e-4


# --- user errors: one line, non-zero exit ---------------------------------------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("facellava-native: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr


@pytest.fixture
def copied_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy, ignore=shutil.ignore_patterns(".verified.json", ".lock"))
    return copy


def ask(bundle: Path, *args: object) -> subprocess.CompletedProcess:
    return run_native(bundle, *args, "--max-tokens", 2, QUESTION)


def test_missing_bundle(native, tmp_path):
    assert_one_line_error(ask(tmp_path / "nothing", "--image", FACE_PHOTO, "--no-face-crop", "--no-landmarks"),
                          "does not exist")


def test_tampered_files(native, copied_bundle):
    with open(copied_bundle / "llm-f32.gguf", "r+b") as handle:
        handle.seek(-5, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-5, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 1]))
    assert_one_line_error(ask(copied_bundle, "--image", FACE_PHOTO, "--no-face-crop", "--no-landmarks"),
                          "llm-f32.gguf", "sha256")


def test_a_vision_graph_that_leads_outside(native, copied_bundle, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(copied_bundle / "vision_image_nolm.onnx", outside)
    (copied_bundle / "vision_image_nolm.onnx").symlink_to(outside)
    assert_one_line_error(ask(copied_bundle, "--image", FACE_PHOTO, "--no-face-crop", "--no-landmarks"),
                          "leads outside the bundle")


def test_a_manifest_of_another_schema(native, copied_bundle):
    manifest = json.loads((copied_bundle / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copied_bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(ask(copied_bundle, "--image", FACE_PHOTO, "--no-face-crop", "--no-landmarks"),
                          "schema version 99")


def test_bad_image(native, tiny_bundle, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_bytes(b"this is no JPEG\n" * 20)
    assert_one_line_error(ask(tiny_bundle, "--image", fake, "--no-face-crop", "--no-landmarks"), "not an image")
    assert_one_line_error(ask(tiny_bundle, "--image", tmp_path / "missing.jpg", "--no-face-crop", "--no-landmarks"),
                          "image not found")


def test_bad_landmarks(native, tiny_bundle, tmp_path, clip):
    transposed = tmp_path / "transposed.npy"
    np.save(transposed, np.full((2, 68), 100.0))
    assert_one_line_error(ask(tiny_bundle, "--image", FACE_PHOTO, "--no-face-crop", "--landmarks", transposed),
                          "(2, 68)")
    divided = tmp_path / "divided.npy"
    np.save(divided, np.full((68, 2), 0.5))
    assert_one_line_error(ask(tiny_bundle, "--image", FACE_PHOTO, "--no-face-crop", "--landmarks", divided),
                          "already divided by 256")
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x93NUMPY\x01\x00garbage")
    assert_one_line_error(ask(tiny_bundle, "--image", FACE_PHOTO, "--no-face-crop", "--landmarks", garbage),
                          "not a readable .npy")
    frames = tmp_path / "frames.npy"
    np.save(frames, np.full((5, 68, 2), 100.0))
    assert_one_line_error(ask(tiny_bundle, "--video", clip, "--no-face-crop", "--landmarks", frames),
                          "5 frames", "decodes to 12")


def test_what_the_native_runner_cannot_do_yet(native, tiny_bundle):
    # face detection and face-mesh landmarks need the bundle's front-end graphs (issue 13): refused before loading
    assert_one_line_error(ask(tiny_bundle, "--image", FACE_PHOTO, "--no-landmarks"), "front-end graphs",
                          "--no-face-crop")
    assert_one_line_error(ask(tiny_bundle, "--image", FACE_PHOTO, "--no-face-crop"), "--landmarks NPY")
    assert_one_line_error(run_native(tiny_bundle, "--image", FACE_PHOTO, "--no-face-crop", "--no-landmarks", "  "),
                          "the question is empty")
