"""The native runner (`CMakeLists.txt`, native/): the built `facellava-native` against the Python runtime on the tiny
bundle, token for token (image and video, landmarks from the face mesh, a file and none, the face crop and
--no-face-crop, --face-index, greedy); its face front end against the Python one on the same front-end graphs
(`FaceFrontEnd(graphs=...)`) and its preprocessing against runtime.preprocess, through libfacellava's C ABI; bad
inputs as one line and a non-zero exit; and the headers generated from the Python source.

Measured (this machine: Debian's OpenCV 4.6 natively, the opencv-python wheel's 4.11 in Python, the same ONNX
Runtime library): face boxes and 256 x 256 crops identical on the photograph, every face of the 4-face composite
and the 8 frames of the clips; the 68 landmarks identical too (0.011 crop pixels apart before the native side
computed the detectors' scores with numpy's float32 exp instead of libm's expf).

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
from composites import compose
from conftest import FACE_PHOTO, REPO, write_video

BUILD = Path(os.environ.get("FACELLAVA_NATIVE_BUILD", REPO / "build" / "native"))
CLI = BUILD / "facellava-native"
LIBRARY = BUILD / "libfacellava.so"
QUESTION = "What emotion is shown on this face?"
MAX_TOKENS = 24
# the F32 cache and exact attention of conftest's `pipeline`, given to the native runner too
EXACT = ["--kv-cache", "f32", "--flash-attn", "off"]
# the native front end's 68 landmarks against the Python one's on the same graphs, in pixels of the 256 crop:
# measured 0 on every image and clip here (asserted where numpy's exp kernel runs); the limit leaves room for CPUs
# where numpy's float32 exp is libm's or the BLAS rounds the landmark correction otherwise (with libm's expf natively
# they were 0.011 apart on this machine)
LANDMARK_TOLERANCE_PX = 0.05


def landmarks_limit() -> float:
    """0 where numpy runs its own float32 exp kernel (x86-64 with AVX2 and FMA3, or AVX512F), which the native side
    reproduces, as on this machine; LANDMARK_TOLERANCE_PX elsewhere."""
    import platform

    from numpy.core._multiarray_umath import __cpu_features__ as features

    kernel = (features.get("AVX2") and features.get("FMA3")) or features.get("AVX512F")
    return 0.0 if platform.machine() == "x86_64" and kernel else LANDMARK_TOLERANCE_PX


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
def group_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/test_front_end_parity.py's 4-face composite of the photograph (faces of 30 to 120 pixels), as a PNG."""
    import cv2

    from facellava.runtime.face import load_image

    path = tmp_path_factory.mktemp("group") / "group.png"
    cv2.imwrite(str(path), cv2.cvtColor(compose(load_image(FACE_PHOTO), [30, 60, 90, 120], 480, 640, seed=1)[0],
                                        cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def group_clip(group_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("native") / "group.mp4", 10, photo=group_image)


@pytest.fixture(scope="module")
def graphs_front_end(tiny_bundle: Path):
    """The Python front end on the tiny bundle's front-end graphs (ONNX Runtime, CPU): the reference."""
    from facellava.bundle import Bundle
    from facellava.runtime.face import FaceFrontEnd
    from facellava.runtime.face_graphs import FRONT_END_FILES, FrontEndGraphs

    opened = Bundle.open(tiny_bundle)
    graphs = FrontEndGraphs.from_files({model: opened.path_of(name) for model, name in FRONT_END_FILES.items()})
    with FaceFrontEnd(graphs=graphs) as front_end:
        yield front_end


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


def test_headers_are_generated_from_the_python_source():
    sys.path.insert(0, str(REPO / "native"))
    try:
        import gen_contract
    finally:
        sys.path.remove(str(REPO / "native"))
    from facellava.runtime.pipeline import LLM_PREFERENCE

    for header, render in gen_contract.HEADERS.items():
        assert header.read_text() == render(), f"{header.name}: run python native/gen_contract.py"
    assert gen_contract.LLM_PREFERENCE == LLM_PREFERENCE
    text = gen_contract.render()
    assert 'STOP_STRING = "</s>"' in text and "IMAGE_TOKENS = 256;" in text and "VIDEO_FRAME_TOKENS = 257;" in text
    front_end = gen_contract.render_front_end()
    assert '"face_mesh.onnx"' in front_end and "{132, 58}" in front_end and "MIN_FACE_SIDE = 20;" in front_end
    assert '{"emotion", "What emotion is shown in the video?", 512,' in gen_contract.render_tasks()


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


@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("marks", ["face mesh", "file", "none"])
def test_native_answer_with_the_face_front_end_is_the_python_answer(native, pipeline, tiny_bundle, clip,
                                                                    landmark_files, modality, marks):
    """Without --no-face-crop: the face found, cropped and (with the mesh) landmarked on the bundle's graphs, as
    `facellava run --front-end graphs` does (conftest's `pipeline` takes the graphs the bundle has)."""
    assert pipeline.front_end.backend == "graphs"
    medium = {"image": FACE_PHOTO} if modality == "image" else {"video": clip}
    landmarks = landmark_files[modality] if marks == "file" else None
    expected = pipeline.ask(QUESTION, **medium, landmarks=landmarks, no_landmarks=marks == "none",
                            max_tokens=MAX_TOKENS)
    options = {"face mesh": [], "file": ["--landmarks", landmarks], "none": ["--no-landmarks"]}[marks]
    result = run_native(tiny_bundle, f"--{modality}", medium[modality], *options, "--json", "--max-tokens",
                        MAX_TOKENS, *EXACT, QUESTION)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["tokens"] == expected.tokens and len(expected.tokens) > 0
    assert answer["text"] == expected.text
    assert (answer["modality"], answer["landmarks"]) == (modality, marks) == (expected.modality, expected.landmarks)
    assert answer["prompt_positions"] == expected.prompt_positions
    assert answer["timings"]["face_detection_ms"] > 0
    assert (answer["timings"]["landmarks_ms"] > 0) == (marks == "face mesh")
    assert list(answer["timings"]) == list(asdict(expected.timings))


@pytest.mark.parametrize("modality", ["image", "video"])
def test_native_face_index_picks_the_python_face(native, pipeline, tiny_bundle, group_image, group_clip, modality):
    """The 4-face composite: --face-index 2 (the third face from the left, not the largest) gives the tokens
    `facellava run --face-index 2` gives, and for the image another face other tokens (the tiny model answers
    every 8-frame video alike; test_native_video_faces_are_the_python_ones compares the video's crops)."""
    medium = {"image": group_image} if modality == "image" else {"video": group_clip}
    tokens = {}
    for index in (2, None):
        expected = pipeline.ask(QUESTION, **medium, face_index=index, max_tokens=MAX_TOKENS)
        index_args = [] if index is None else ["--face-index", index]
        result = run_native(tiny_bundle, f"--{modality}", medium[modality], *index_args, "--json", "--max-tokens",
                            MAX_TOKENS, *EXACT, QUESTION)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["tokens"] == expected.tokens and answer["landmarks"] == expected.landmarks == "face mesh"
        tokens[index] = answer["tokens"]
    if modality == "image":
        assert tokens[2] != tokens[None]


@pytest.mark.parametrize("task", ["emotion", "age"])
def test_native_task_answer_is_the_python_answer(native, pipeline, tiny_bundle, task):
    """--task: the task's official question for an empty one, its max_tokens, decoding constrained by its grammar
    (generated from runtime/structured.py), the JSON answer the runtime gives."""
    from facellava.runtime import structured

    spec = structured.get_task(task)
    expected = pipeline.ask(spec.question, image=FACE_PHOTO, grammar=spec.grammar, max_tokens=spec.max_tokens)
    result = run_native(tiny_bundle, "--image", FACE_PHOTO, "--task", task, "--json", *EXACT, "")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["tokens"] == expected.tokens and answer["text"] == expected.text
    assert answer["finish_reason"] == expected.finish_reason != "length"  # closed: the grammar ended it
    assert set(structured.parse_answer(answer["text"], spec.schema)) == set(spec.schema["required"])
    assert_one_line_error(run_native(tiny_bundle, "--image", FACE_PHOTO, "--task", "mood", ""),
                          "unknown task 'mood'", "emotion, action_units, age, attributes, deepfake")


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


def test_native_json_reports_the_face_as_facellava_run(native, tiny_bundle):
    """With the face front end (the CLIs' defaults): the same --json keys, landmarks "face mesh", the face's
    timings filled in, and the same tokens."""
    args = [tiny_bundle, "--image", FACE_PHOTO, "--max-tokens", 8, "--json", QUESTION]
    python = subprocess.run([sys.executable, "-m", "facellava", "run", *map(str, args), "--front-end", "graphs"],
                            capture_output=True, text=True, timeout=600)
    ours = run_native(*args)
    assert python.returncode == 0 and ours.returncode == 0, (python.stderr, ours.stderr)
    python_json, our_json = json.loads(python.stdout), json.loads(ours.stdout)
    assert list(our_json) == list(python_json) and list(our_json["timings"]) == list(python_json["timings"])
    assert our_json["landmarks"] == python_json["landmarks"] == "face mesh"
    assert our_json["tokens"] == python_json["tokens"]
    for key in ("face_detection_ms", "landmarks_ms"):
        assert our_json["timings"][key] > 0 and python_json["timings"][key] > 0


# --- preprocessing through the C ABI --------------------------------------------------------------------------


class Request(ctypes.Structure):  # facellava_request
    _fields_ = [("image", ctypes.c_char_p), ("video", ctypes.c_char_p), ("landmarks_npy", ctypes.c_char_p),
                ("no_landmarks", ctypes.c_int), ("no_face_crop", ctypes.c_int), ("max_tokens", ctypes.c_int),
                ("temperature", ctypes.c_float), ("top_p", ctypes.c_float), ("top_k", ctypes.c_int),
                ("seed", ctypes.c_uint32), ("face_index", ctypes.c_int), ("task", ctypes.c_char_p),
                ("camera", ctypes.c_int)]


class Options(ctypes.Structure):  # facellava_options
    _fields_ = [("llm_type", ctypes.c_char_p), ("vision_precision", ctypes.c_char_p), ("n_ctx", ctypes.c_int),
                ("n_threads", ctypes.c_int), ("n_threads_batch", ctypes.c_int), ("poll", ctypes.c_int),
                ("kv_cache_f32", ctypes.c_int), ("flash_attn", ctypes.c_int), ("n_gpu_layers", ctypes.c_int),
                ("min_face", ctypes.c_int), ("device", ctypes.c_char_p), ("vision", ctypes.c_char_p)]


class Face(ctypes.Structure):  # facellava_face
    _fields_ = [("width", ctypes.c_int), ("height", ctypes.c_int), ("rgb", ctypes.POINTER(ctypes.c_uint8)),
                ("has_landmarks", ctypes.c_int), ("landmarks", ctypes.c_float * 136), ("has_box", ctypes.c_int),
                ("box", ctypes.c_int * 4), ("score", ctypes.c_double), ("detect_ms", ctypes.c_double),
                ("landmarks_ms", ctypes.c_double)]


@pytest.fixture(scope="module")
def library(native) -> ctypes.CDLL:
    if sanitized() and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("a sanitizer build loads into Python only with its runtime first: LD_PRELOAD=\"$(gcc "
                    "-print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)\" ASAN_OPTIONS=detect_leaks=0 "
                    "(libstdc++ too, or C++ exceptions thrown in other extensions, onnx's, abort)")
    lib = ctypes.CDLL(str(LIBRARY))
    lib.facellava_preprocess.restype = ctypes.POINTER(ctypes.c_float)
    lib.facellava_preprocess.argtypes = [ctypes.POINTER(Request), ctypes.POINTER(ctypes.c_size_t),
                                         ctypes.POINTER(ctypes.c_char_p)]
    lib.facellava_free.argtypes = [ctypes.c_void_p]
    lib.facellava_front_end.restype = ctypes.POINTER(Face)
    lib.facellava_front_end.argtypes = [ctypes.c_char_p, ctypes.POINTER(Options), ctypes.POINTER(Request),
                                        ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_char_p)]
    lib.facellava_free_faces.argtypes = [ctypes.POINTER(Face), ctypes.c_size_t]
    lib.facellava_files_hashed.restype = ctypes.c_ulong
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


@pytest.mark.parametrize("channels", [1, 3])
def test_native_16_bit_pixels_are_the_python_pixels(library, tmp_path, channels):
    # Pillow reads 16-bit grey as rint(level / 257) and 16-bit colour by its high bytes; the levels' low bytes are
    # chosen so that OpenCV's own 16 -> 8 bit scaling (>> 8) gives other grey pixels
    import cv2

    from facellava.runtime.face import load_image
    from facellava.runtime.preprocess import expand2square, preprocess_image

    photo = cv2.resize(cv2.imread(str(FACE_PHOTO)), (300, 240), interpolation=cv2.INTER_AREA)
    eight = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY) if channels == 1 else photo
    levels = eight.astype(np.uint16) * 256 + 200
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), levels)
    expected = preprocess_image(expand2square(load_image(path))).ravel()
    ours = native_pixels(library, image=path)
    assert np.array_equal(ours, expected)
    if channels == 1:  # the scaling matters: OpenCV's would differ
        high = tmp_path / "high.png"
        cv2.imwrite(str(high), eight)
        assert not np.array_equal(native_pixels(library, image=high), expected)


def _png16(path: Path, levels: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written by hand (OpenCV writes no grey-with-alpha PNG, Pillow no 16-bit one but grey)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = levels.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in levels.reshape(height, -1))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def _image_file(kind: str, folder: Path) -> Path:
    """One file of the formats the native side must read as Pillow does, made from the photograph (300 x 240)."""
    import cv2
    from PIL import Image

    rgb = cv2.cvtColor(cv2.resize(cv2.imread(str(FACE_PHOTO)), (300, 240), interpolation=cv2.INTER_AREA),
                       cv2.COLOR_BGR2RGB)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    rng = np.random.default_rng(15)
    low = rng.integers(0, 256, rgb.shape, dtype=np.uint16)  # low bytes: rint(v / 257) and v >> 8 differ
    alpha = rng.integers(0, 65536, grey.shape, dtype=np.uint16)
    deep = rgb.astype(np.uint16) * 256 + low
    if kind == "la16.png":  # Pillow: RGBA of the grey's high bytes
        return _png16(folder / kind, np.dstack([deep[:, :, 1], alpha]), 4)
    if kind == "rgb16.png":
        return _png16(folder / kind, deep, 2)
    if kind == "rgba16.png":
        return _png16(folder / kind, np.dstack([deep, alpha]), 6)
    path = folder / kind
    if kind == "rgb8.tif":
        Image.fromarray(rgb).save(path, compression="tiff_lzw")
    elif kind == "grey16.tif":  # Pillow: I;16, rint(v / 257)
        Image.fromarray(deep[:, :, 1]).save(path)
    elif kind == "rgba8.tif":  # unassociated alpha (ExtraSamples 2): OpenCV's libtiff RGBA reading premultiplies
        Image.fromarray(np.dstack([rgb, (alpha >> 8).astype(np.uint8)])).save(path)
    elif kind == "palette-transparency.png":
        Image.fromarray(rgb).quantize(64).save(path, transparency=5)
    elif kind == "cmyk.jpg":
        Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    else:  # exif-N.jpg: EXIF orientation N
        exif = Image.Exif()
        exif[0x0112] = int(kind.split("-")[1].split(".")[0])
        Image.fromarray(rgb).save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("kind", ["la16.png", "rgb16.png", "rgba16.png", "rgb8.tif", "grey16.tif",
                                  "palette-transparency.png", "exif-3.jpg", "exif-5.jpg", "exif-6.jpg", "exif-8.jpg"])
def test_native_decodes_images_as_pillow(library, tmp_path, kind):
    """runtime/face.py's load_image (Pillow) is the reference: the pixel values bit for bit the Python runtime's."""
    from PIL import Image

    from facellava.runtime.face import load_image
    from facellava.runtime.preprocess import expand2square, preprocess_image

    path = _image_file(kind, tmp_path)
    rgb = load_image(path)
    assert np.array_equal(native_pixels(library, image=path), preprocess_image(expand2square(rgb)).ravel())
    if kind.startswith("exif"):  # the orientation was applied: upright is not the stored image
        with Image.open(path) as stored:
            assert rgb.shape[:2] == ((300, 240) if kind in ("exif-5.jpg", "exif-6.jpg", "exif-8.jpg") else (240, 300))
            assert rgb.shape != np.asarray(stored).shape or not np.array_equal(rgb, np.asarray(stored))


def test_native_decodes_an_exif_rotated_photo_to_the_python_face(library, tiny_bundle, graphs_front_end, tmp_path):
    """The photograph stored on its side with EXIF orientation 6: the same box, crop and landmarks as Python's."""
    import cv2
    from PIL import Image

    from facellava.runtime.face import load_image

    path = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns it 90 degrees clockwise
    stored = cv2.rotate(load_image(FACE_PHOTO), cv2.ROTATE_90_COUNTERCLOCKWISE)
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    expected = graphs_front_end.process_image(load_image(path))
    assert expected.box is not None
    assert assert_same_faces(native_faces(library, tiny_bundle, image=path), [expected]) <= landmarks_limit()


@pytest.mark.parametrize("kind", ["cmyk.jpg", "rgba8.tif"])
def test_native_refuses_images_opencv_cannot_read_as_pillow(native, tiny_bundle, tmp_path, kind):
    """A CMYK JPEG (OpenCV converts with truncated products, Pillow rounds: a grey level apart on most pixels) and an
    8-bit TIFF with unassociated alpha (OpenCV premultiplies it): one line naming the format, exit 1."""
    from facellava.runtime.face import load_image

    path = _image_file(kind, tmp_path)
    load_image(path)  # Python reads it
    result = ask(tiny_bundle, "--image", path, "--no-face-crop", "--no-landmarks")
    assert_one_line_error(result, "CMYK JPEG" if kind == "cmyk.jpg" else "TIFF with an unassociated alpha")


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


# --- the face front end through the C ABI ----------------------------------------------------------------------


def native_faces(lib: ctypes.CDLL, bundle: Path, image: Path | None = None, video: Path | None = None,
                 face_index: int | None = None, no_face_crop: bool = False, min_face: int | None = None) -> list[dict]:
    options = Options()
    lib.facellava_options_default(ctypes.byref(options))
    assert options.min_face == 20  # runtime/face.py's MIN_FACE_SIDE
    if min_face is not None:
        options.min_face = min_face
    request = Request()
    lib.facellava_request_default(ctypes.byref(request))
    request.image = str(image).encode() if image else None
    request.video = str(video).encode() if video else None
    if face_index is not None:
        request.face_index = face_index
    request.no_face_crop = int(no_face_crop)
    count, error = ctypes.c_size_t(), ctypes.c_char_p()
    faces = lib.facellava_front_end(str(bundle).encode(), ctypes.byref(options), ctypes.byref(request),
                                    ctypes.byref(count), ctypes.byref(error))
    assert faces, error.value
    try:
        return [{"crop": np.ctypeslib.as_array(face.rgb, shape=(face.height, face.width, 3)).copy(),
                 "landmarks": np.array(face.landmarks).reshape(68, 2) if face.has_landmarks else None,
                 "box": tuple(face.box) if face.has_box else None}
                for face in (faces[i] for i in range(count.value))]
    finally:
        lib.facellava_free_faces(faces, count)


def assert_same_faces(ours: list[dict], theirs: list) -> float:
    """Boxes and crops identical; returns the landmarks' largest difference in crop pixels of 256."""
    assert len(ours) == len(theirs)
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        assert a["box"] == (None if b.box is None else (b.box.x, b.box.y, b.box.width, b.box.height))
        assert a["crop"].shape == b.crop.shape and np.array_equal(a["crop"], b.crop)
        assert (a["landmarks"] is None) == (b.landmarks is None)
        if b.landmarks is not None:
            worst = max(worst, float(np.abs(a["landmarks"] - b.landmarks).max()) * 256)
    return worst


@pytest.mark.parametrize("image", ["photo", "group"])
def test_native_face_crops_and_landmarks_are_the_python_ones(library, tiny_bundle, graphs_front_end, group_image,
                                                             image):
    """Every face of the photograph and the 4-face composite, by --face-index and by default (the largest), and the
    whole image (--no-face-crop, landmarks from the mesh on the square): boxes and crops to the byte, landmarks
    within landmarks_limit() (0 here)."""
    from facellava.runtime.face import load_image

    path = FACE_PHOTO if image == "photo" else group_image
    rgb = load_image(path)
    found = graphs_front_end.detect(rgb)
    assert len(found) == (1 if image == "photo" else 4)
    worst = 0.0
    for index in [None, *range(len(found))]:
        expected = graphs_front_end.process_image(rgb, face_index=index)
        worst = max(worst, assert_same_faces(native_faces(library, tiny_bundle, image=path, face_index=index),
                                             [expected]))
    expected = graphs_front_end.process_image(rgb, no_face_crop=True)
    worst = max(worst, assert_same_faces(native_faces(library, tiny_bundle, image=path, no_face_crop=True),
                                         [expected]))
    print(f"{image}: native vs Python landmarks max-abs {worst:.4f} crop px")
    assert worst <= landmarks_limit()


def test_native_min_face_searches_as_the_python_one(library, tiny_bundle, group_image):
    """--min-face 100: no tiles on the 640-pixel composite, so its smaller faces are found by the whole-image views
    only, with other boxes (measured: the 34-pixel face's box 49 pixels wide); the boxes and crops are
    FaceFrontEnd(min_face_side=100)'s."""
    from facellava.bundle import Bundle
    from facellava.runtime.face import FaceFrontEnd, load_image
    from facellava.runtime.face_graphs import FRONT_END_FILES, FrontEndGraphs

    opened = Bundle.open(tiny_bundle)
    graphs = FrontEndGraphs.from_files({model: opened.path_of(name) for model, name in FRONT_END_FILES.items()})
    rgb = load_image(group_image)
    with FaceFrontEnd(graphs=graphs, min_face_side=100) as front_end:
        found = front_end.detect(rgb)
        assert len(found) == 4 and found[3].width != 34  # 34 with the default min_face (20)
        for index in range(len(found)):
            expected = front_end.process_image(rgb, face_index=index)
            worst = assert_same_faces(native_faces(library, tiny_bundle, image=group_image, face_index=index,
                                                   min_face=100), [expected])
            assert worst <= landmarks_limit()


@pytest.mark.parametrize("which", ["clip", "group_clip"])
def test_native_video_faces_are_the_python_ones(library, tiny_bundle, graphs_front_end, clip, group_clip, which):
    """The 8 official frames: the face chosen in the first frame (the largest, or --face-index 1 in the group clip)
    and followed frame to frame, as process_video does."""
    from facellava.runtime.face import read_video

    path, index = (clip, None) if which == "clip" else (group_clip, 1)
    expected = graphs_front_end.process_video(read_video(path).frames, face_index=index)
    worst = assert_same_faces(native_faces(library, tiny_bundle, video=path, face_index=index), expected)
    print(f"{which}: native vs Python landmarks max-abs {worst:.4f} crop px")
    assert worst <= landmarks_limit()


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


def flip_bit(path: Path, from_end: int) -> None:
    """Tamper with a file: flip the lowest bit of the byte `from_end` bytes before its end."""
    with open(path, "r+b") as handle:
        handle.seek(-from_end, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-from_end, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 1]))


def test_tampered_files(native, copied_bundle):
    flip_bit(copied_bundle / "llm-f32.gguf", 5)
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


def test_face_errors(native, tiny_bundle, group_image, group_clip, tmp_path):
    # the Python CLI's messages: a face index out of range, no face, an image too small for one, min_face < 1
    assert_one_line_error(ask(tiny_bundle, "--image", group_image, "--face-index", 4), "face index 4 is out of range",
                          "4 face(s) found in the image", "numbered 0 to 3")
    assert_one_line_error(ask(tiny_bundle, "--image", FACE_PHOTO, "--face-index", -1), "face index -1 is out of range")
    assert_one_line_error(ask(tiny_bundle, "--video", group_clip, "--face-index", 9), "face index 9 is out of range",
                          "in the video")
    import cv2

    empty = tmp_path / "wall.png"
    cv2.imwrite(str(empty), np.full((240, 320, 3), 128, np.uint8))
    assert_one_line_error(ask(tiny_bundle, "--image", empty), "no face found in the image", "--no-face-crop")
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.full((24, 40, 3), 128, np.uint8))
    assert_one_line_error(ask(tiny_bundle, "--image", small), "40x24 pixels, too small to hold a face")
    assert_one_line_error(ask(tiny_bundle, "--image", FACE_PHOTO, "--min-face", 0), "min_face must be at least 1")
    assert_one_line_error(run_native(tiny_bundle, "--image", FACE_PHOTO, "--no-landmarks", "  "),
                          "the question is empty")


def test_a_bundle_without_the_front_end_graphs(native, copied_bundle):
    from facellava.bundle import BundleWriter
    from facellava.runtime.face_graphs import FRONT_END_FILES

    with BundleWriter.transaction(copied_bundle, create=False) as writer:
        for name in FRONT_END_FILES.values():
            writer.remove(name)
    assert_one_line_error(ask(copied_bundle, "--image", FACE_PHOTO, "--no-landmarks"), "has no front-end graphs",
                          "facellava export front-end")
    assert_one_line_error(ask(copied_bundle, "--image", FACE_PHOTO, "--no-face-crop"), "has no front-end graphs")
    # the whole image with landmarks from a file or none needs no graph
    result = ask(copied_bundle, "--image", FACE_PHOTO, "--no-face-crop", "--no-landmarks")
    assert result.returncode == 0, result.stderr


def test_tampered_front_end_graph(native, copied_bundle):
    flip_bit(copied_bundle / "face_mesh.onnx", 3)
    assert_one_line_error(ask(copied_bundle, "--image", FACE_PHOTO), "face_mesh.onnx", "sha256")


# --- execution providers, camera, priority ----------------------------------------------------------------------


def test_devices_as_the_python_runtime_chooses_them(native, tiny_bundle):
    import onnxruntime

    available = onnxruntime.get_available_providers()
    base = [tiny_bundle, "--image", FACE_PHOTO, "--no-face-crop", "--no-landmarks", "--max-tokens", 3, "--json"]
    answers = {}
    for device in ("auto", "cpu"):
        result = run_native(*base, "--device", device, QUESTION)
        assert result.returncode == 0, result.stderr
        answers[device] = json.loads(result.stdout)["tokens"]
    assert answers["auto"] == answers["cpu"] and len(answers["cpu"]) == 3
    for device, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        if provider in available:
            continue  # a GPU build of ONNX Runtime: the device is there
        result = run_native(*base, "--device", device, QUESTION)
        assert result.returncode == 1
        assert_one_line_error(result, f"onnxruntime {onnxruntime.__version__} has no {provider}",
                              "CPUExecutionProvider", "install onnxruntime-gpu")
    assert_one_line_error(run_native(*base, "--device", "npu", QUESTION), "invalid choice: 'npu'")
    build = (BUILD / "CMakeCache.txt").read_text() if (BUILD / "CMakeCache.txt").is_file() else ""
    if "FACELLAVA_HAVE_TENSORRT:INTERNAL=1" not in build:
        assert_one_line_error(run_native(*base, "--vision", "tensorrt", QUESTION), "built without TensorRT",
                              "--vision onnxruntime")


@pytest.mark.skipif(Path("/dev/video0").exists(), reason="a camera is attached: its error path cannot be reached")
def test_a_missing_camera_is_one_line(native, tiny_bundle):
    result = run_native(tiny_bundle, "--camera", 0, "--no-face-crop", "--no-landmarks", "--max-tokens", 2, QUESTION)
    assert result.returncode == 1
    assert_one_line_error(result, "camera 0 cannot be opened or gives no frame")
    assert_one_line_error(run_native(tiny_bundle, "--camera", 0, "--image", FACE_PHOTO, QUESTION), "only one of")
    # read before the bundle is opened, as `facellava run` reads it: the camera's error, not the bundle's
    assert_one_line_error(run_native(tiny_bundle / "missing", "--camera", 0, QUESTION), "camera 0 cannot be opened")
    python = subprocess.run([sys.executable, "-m", "facellava", "run", str(tiny_bundle / "missing"), "--camera", "0",
                             QUESTION], capture_output=True, text=True, timeout=600)
    assert python.returncode == 1 and "camera 0 cannot be opened" in python.stderr, python.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs root (or CAP_SYS_NICE)")
def test_priority_reaches_every_thread_and_a_refused_one_is_one_line(native, tiny_bundle, clip, tmp_path):
    # as runtime/llm.py's set_priority (tests/test_threads.py): the threads started later inherit it
    import time

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # no re-exec: the process is the one watched
    process = subprocess.Popen([str(CLI), tiny_bundle, "--video", clip, "--no-face-crop", "--no-landmarks",
                                "--max-tokens", "8", "--priority", "high", QUESTION], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    widest: dict[int, int] = {}
    while process.poll() is None:
        try:
            nices = {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{process.pid}/task")}
        except (FileNotFoundError, ProcessLookupError):
            break
        if len(nices) > len(widest):
            widest = nices
        time.sleep(0.01)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    assert len(widest) >= 2 and set(widest.values()) == {-10}, widest
    # another user may not raise it: one line before the bundle is opened (none here), as `facellava run`
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(CLI)]
    refused = subprocess.run([*drop, tmp_path / "no-bundle", "--image", "x.jpg", "--priority", "high", "Q?"],
                             capture_output=True, text=True, timeout=120)
    if "error while loading shared libraries" in refused.stderr:
        pytest.skip("user nobody cannot load the build's libraries here")
    assert refused.returncode == 1
    assert_one_line_error(refused, "priority high (nice -10) needs root or CAP_SYS_NICE")


# --- the verified cache ------------------------------------------------------------------------------------------


def test_the_verified_cache_is_shared_with_python_and_a_changed_file_is_hashed_again(library, copied_bundle):
    import time

    from facellava.bundle import VERIFIED_CACHE, Bundle, _VerifiedCache
    from facellava.runtime.face_graphs import FRONT_END_FILES

    graphs = sorted(FRONT_END_FILES.values())

    def front_end() -> tuple[int, float]:
        before, start = library.facellava_files_hashed(), time.perf_counter()
        native_faces(library, copied_bundle, image=FACE_PHOTO)
        return library.facellava_files_hashed() - before, time.perf_counter() - start

    first, first_s = front_end()
    assert first == 3 and (copied_bundle / VERIFIED_CACHE).is_file()  # the three graphs, hashed once
    python_cache = _VerifiedCache(Bundle.open(copied_bundle).path)  # written in the Python runtime's format
    assert sorted(python_cache.entries) == graphs
    second, second_s = front_end()
    assert second == 0
    print(f"front end on a fresh bundle: {first_s * 1000:.0f} ms hashing 3 graphs, then {second_s * 1000:.0f} ms")
    # the Python runtime's cache is read too: every file it verified is not hashed again
    (copied_bundle / VERIFIED_CACHE).unlink()
    Bundle.open(copied_bundle).verify_all()
    assert front_end()[0] == 0
    # a file changed after it was verified (same size, a new ctime) is hashed again and refused
    flip_bit(copied_bundle / "face_mesh.onnx", 3)
    before = library.facellava_files_hashed()
    count, error = ctypes.c_size_t(), ctypes.c_char_p()
    request = Request()
    library.facellava_request_default(ctypes.byref(request))
    request.image = str(FACE_PHOTO).encode()
    assert not library.facellava_front_end(str(copied_bundle).encode(), None, ctypes.byref(request),
                                           ctypes.byref(count), ctypes.byref(error))
    assert b"face_mesh.onnx does not match its manifest sha256" in error.value
    assert library.facellava_files_hashed() - before == 1
    library.facellava_free(ctypes.cast(error, ctypes.c_void_p))


def _native_tensorrt_missing() -> str | None:
    """Why the native TensorRT vision backend cannot be checked here, or None."""
    from facellava.errors import FaceLlavaError

    cache = BUILD / "CMakeCache.txt"
    if not cache.is_file() or "FACELLAVA_HAVE_TENSORRT:INTERNAL=1" not in cache.read_text():
        return f"{BUILD} was built without TensorRT (native/build.sh {BUILD} -DFACELLAVA_TENSORRT=ON on a GPU machine)"
    try:
        from facellava.runtime.tensorrt_runner import gpu_info, import_tensorrt

        import_tensorrt()
        gpu_info(0)
    except (ImportError, FaceLlavaError) as error:
        return f"TensorRT cannot run here: {error}"
    return None


@pytest.mark.skipif(_native_tensorrt_missing() is not None, reason=str(_native_tensorrt_missing()))
def test_native_tensorrt_engine_vision_answers_as_python(native, tiny_bundle, tmp_path):
    """On a GPU: the vision graph on the bundle's TensorRT engines (`facellava build-engine`) in both runtimes;
    their tokens agree with each other (the engines' own numbers, greedy)."""
    from facellava.export.tensorrt import build_engines

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    build_engines(bundle, precisions="fp32", front_end=False, progress=False)
    for medium in (["--image", FACE_PHOTO], ["--video", write_video(tmp_path / "clip.mp4", 16)]):
        args = [bundle, *medium, "--no-face-crop", "--no-landmarks", "--max-tokens", 8, "--json", *EXACT,
                "--vision", "tensorrt", QUESTION]
        python = subprocess.run([sys.executable, "-m", "facellava", "run", *map(str, args)], capture_output=True,
                                text=True, timeout=600)
        ours = run_native(*args)
        assert python.returncode == 0 and ours.returncode == 0, (python.stderr, ours.stderr)
        python_json, our_json = json.loads(python.stdout), json.loads(ours.stdout)
        assert our_json["vision_backend"] == python_json["vision_backend"] == "tensorrt"
        assert our_json["tokens"] == python_json["tokens"]


@pytest.mark.skipif(_native_tensorrt_missing() is not None, reason=str(_native_tensorrt_missing()))
def test_native_tensorrt_front_end_engines_answer_as_python(native, tiny_bundle, tmp_path):
    """On a GPU: beside TensorRT vision, the face front end on the bundle's engines of its three graphs
    (`facellava build-engine`, kind front_end_engine) in both runtimes, as runtime/pipeline.py's front_end chooses
    them; the same tokens (face crop and face-mesh landmarks, image and video), and the native runner verified (so
    used) the three front-end engines, not the ONNX graphs."""
    from facellava.bundle import VERIFIED_CACHE, Bundle, _VerifiedCache
    from facellava.runtime.face_graphs import FRONT_END_ENGINE_KIND, FRONT_END_FILES

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    built = subprocess.run([sys.executable, "-m", "facellava", "build-engine", str(bundle), "--precision", "fp32"],
                           capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stderr
    files = Bundle.open(bundle).files
    engines = sorted(name for name, entry in files.items() if entry.get("kind") == FRONT_END_ENGINE_KIND)
    assert sorted(files[name]["source"] for name in engines) == sorted(FRONT_END_FILES.values())
    for medium in (["--image", FACE_PHOTO], ["--video", write_video(tmp_path / "clip.mp4", 16)]):
        (bundle / VERIFIED_CACHE).unlink(missing_ok=True)
        args = [bundle, *medium, "--max-tokens", 8, "--json", *EXACT, "--vision", "tensorrt", QUESTION]
        ours = run_native(*args)
        assert ours.returncode == 0, ours.stderr
        verified = set(_VerifiedCache(Bundle.open(bundle).path).entries)
        assert set(engines) <= verified and not verified & set(FRONT_END_FILES.values()), verified
        python = subprocess.run([sys.executable, "-m", "facellava", "run", *map(str, args)], capture_output=True,
                                text=True, timeout=600)
        assert python.returncode == 0, python.stderr
        python_json, our_json = json.loads(python.stdout), json.loads(ours.stdout)
        assert our_json["vision_backend"] == python_json["vision_backend"] == "tensorrt"
        assert our_json["landmarks"] == python_json["landmarks"] == "face mesh"
        assert our_json["tokens"] == python_json["tokens"]
