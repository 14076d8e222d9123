"""Calibration sets through the runtime's front end, and INT8 Q/DQ vision graphs with the sensitivity pass, on the
tiny checkpoint's exported graphs and the shipped face photograph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import write_video
from PIL import Image, ImageEnhance

from facellava.bundle import Bundle
from facellava.calibration.dataset import CalibrationSet, build_calibration_set
from facellava.calibration.int8 import calibrate_vision, held_out_figures, node_groups
from facellava.cli import main
from facellava.errors import FaceLlavaError
from facellava.runtime import face
from facellava.runtime.preprocess import preprocess_image
from facellava.runtime.vision import open_vision


@pytest.fixture(scope="module")
def face_folder(tmp_path_factory: pytest.TempPathFactory, face_photo: Path) -> Path:
    """The photograph, five augmented copies, two videos, and three files that cannot be used."""
    folder = tmp_path_factory.mktemp("faces")
    shutil.copy(face_photo, folder / "photo.jpg")
    image = Image.open(face_photo).convert("RGB")
    for i, (angle, light) in enumerate([(-8, 0.8), (-3, 1.2), (4, 0.9), (8, 1.1), (0, 0.7)]):
        ImageEnhance.Brightness(image.rotate(angle)).enhance(light).save(folder / f"aug{i}.png")
    write_video(folder / "clip.mp4", 10)
    write_video(folder / "clip2.mp4", 16)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not a medium")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / "noise.png")
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache") / "set"


@pytest.fixture(scope="module")
def face_set(face_folder: Path, cache_dir: Path, front_end) -> CalibrationSet:
    return build_calibration_set(face_folder, cache=cache_dir, front_end=front_end, progress=False)


def test_folder_set_uses_the_front_end_and_counts_what_it_skips(face_set, face_folder, front_end):
    assert face_set.count("image") == 6 and face_set.count("video") == 2
    assert face_set.pixel_values["image"].shape == (6, 3, 224, 224)
    assert face_set.landmarks["image"].shape == (6, 68, 2)
    assert face_set.pixel_values["video"].shape == (2, 3, 8, 224, 224)
    assert face_set.landmarks["video"].shape == (2, 8, 68, 2)
    # crop pixels / 256: within the crop, give or take a jaw point of a rotated face
    assert -0.1 < face_set.landmarks["image"].min() and face_set.landmarks["image"].max() < 1.1
    reasons = {entry["file"]: entry["reason"] for entry in face_set.skipped}
    assert set(reasons) == {"broken.jpg", "notes.txt", "noise.png"}
    assert "no face found" in reasons["noise.png"] and "not an image or video" in reasons["notes.txt"]
    assert face_set.skipped_summary().startswith("skipped 3 files")
    # the row of the photograph is exactly what the runtime makes of it
    found = front_end.process_image(face.load_image(face_folder / "photo.jpg"))
    row = face_set.sources["image"].index("photo.jpg")
    np.testing.assert_array_equal(face_set.pixel_values["image"][row], preprocess_image(found.crop))
    np.testing.assert_array_equal(face_set.landmarks["image"][row], found.landmarks)


def test_cache_holds_arrays_and_source_list(face_set, face_folder, cache_dir):
    directory = cache_dir
    listing = json.loads((directory / "sources.json").read_text())
    assert listing["sources"] == face_set.sources and len(listing["skipped"]) == 3
    assert np.load(directory / "image_pixel_values.npy").shape == (6, 3, 224, 224)
    again = build_calibration_set(face_folder, cache=directory, progress=False)  # read back, no front end needed
    np.testing.assert_array_equal(again.pixel_values["video"], face_set.pixel_values["video"])
    assert again.sources == face_set.sources


def test_limit_takes_a_seeded_random_subset(face_folder, front_end):
    def pick(seed: int) -> list[str]:
        return build_calibration_set(face_folder, modalities=["image"], limit=2, seed=seed, front_end=front_end,
                                     progress=False).sources["image"]

    first = pick(0)
    assert len(first) == 2 and pick(0) == first
    assert len({tuple(sorted(pick(seed))) for seed in range(1, 5)} | {tuple(sorted(first))}) > 1


def test_empty_or_unusable_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FaceLlavaError, match="has no files"):
        build_calibration_set(empty, progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"nope")
    (junk / "b.txt").write_text("nope")
    with pytest.raises(FaceLlavaError, match="no usable image or video calibration sample.*skipped 2 files"):
        build_calibration_set(junk, progress=False)


def test_data_json_reads_crops_and_landmark_files(tmp_path, face_photo, front_end):
    found = front_end.process_image(face.load_image(face_photo))
    Image.fromarray(found.crop).save(tmp_path / "crop.png")
    np.save(tmp_path / "crop.npy", found.landmarks * 256.0)
    write_video(tmp_path / "clip.mp4", 9)
    video_points = np.tile(found.landmarks * 256.0, (9, 1, 1)) + np.arange(9, dtype=np.float32)[:, None, None]
    np.save(tmp_path / "clip.npy", video_points)
    records = [
        {"id": "1", "image": "crop.png", "landmarks_2d": "crop.npy", "conversations": []},
        {"id": "2", "video": "clip.mp4", "landmarks_2d": "clip.npy", "conversations": []},
        {"id": "3", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "4", "image": "missing.png", "conversations": []},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    data = build_calibration_set(tmp_path / "data.json", front_end=front_end, progress=False)
    assert data.sources == {"image": ["crop.png"], "video": ["clip.mp4"]}
    np.testing.assert_allclose(data.landmarks["image"][0], found.landmarks, atol=1e-6)
    np.testing.assert_array_equal(data.pixel_values["image"][0], preprocess_image(found.crop))
    frames = face.read_video(tmp_path / "clip.mp4").frame_indices
    np.testing.assert_allclose(data.landmarks["video"][0], video_points[frames] / 256.0, atol=1e-6)
    reasons = sorted(e["reason"].split(":")[0] for e in data.skipped)
    assert reasons == ["image not found", "neither an image nor a video"]


# --- INT8 ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's FP32 landmark graphs (image and video); copied before each test writes into it."""
    from facellava.export.vision import export_vision

    bundle = tmp_path_factory.mktemp("int8") / "fp32"
    export_vision(tiny_checkpoint, bundle, precisions=("fp32",), landmarks=True, seed=0, progress=False)
    return bundle


@pytest.fixture
def bundle(fp32_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, copy)
    return copy


def _producers(model: onnx.ModelProto) -> dict[str, str]:
    return {output: node.op_type for node in model.graph.node for output in node.output}


def test_int8_graphs_load_and_meet_the_target_on_held_out_crops(bundle, face_set):
    entries = calibrate_vision(bundle, face_set, target_cosine=0.99, seed=0, progress=False)
    assert sorted(entries) == ["vision_image.int8.onnx", "vision_video.int8.onnx"]
    opened = Bundle.open(bundle)
    assert opened.find("vision", precision="int8", modality="image", landmarks=True) == ["vision_image.int8.onnx"]
    image = opened.manifest.parity["vision_image.int8.onnx"]
    assert image["passed"] and image["cosine"] >= 0.99 and image["calibration"]["method"] == "minmax"
    assert image["calibration"]["calibration_samples"] + image["calibration"]["held_out_samples"] == 6
    # measured again here, through the runtime's INT8 backend, on the held-out crops only
    int8, fp32 = open_vision(opened, "onnxruntime", "int8"), open_vision(opened, "onnxruntime", "fp32")
    _, held = face_set.split("image", 0.25, 0)
    pixels, points = face_set.pixel_values["image"][held], face_set.landmarks["image"][held]
    figures = held_out_figures(list(int8.encode("image", pixels, points)[:, None]),
                               list(fp32.encode("image", pixels, points)[:, None]))
    assert figures["cosine"] >= 0.99
    assert figures["cosine"] == pytest.approx(image["cosine"], abs=1e-5)
    model = onnx.load(str(bundle / "vision_image.int8.onnx"))
    assert sum(node.op_type == "QuantizeLinear" for node in model.graph.node) > 10
    # symmetric activations and weights: every zero point is an int8 0 (no INT32 bias, which TensorRT cannot take)
    zero_points = {node.input[2] for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")}
    for tensor in model.graph.initializer:
        if tensor.name in zero_points:
            assert tensor.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(tensor).any()


def test_sensitivity_pass_keeps_the_most_damaging_groups_out_of_int8(bundle, face_set):
    entries = calibrate_vision(bundle, face_set, modalities="image", target_cosine=0.9999, seed=0, progress=False)
    calibration = entries["vision_image.int8.onnx"]["calibration"]
    kept = calibration["fp32_groups"]
    assert kept, "a 0.9999 target needs some groups in FP32 on the tiny model"
    sensitivity = calibration["sensitivity"]
    assert set(sensitivity) == set(node_groups(onnx.load(str(bundle / "vision_image.onnx"))))
    # the groups kept are the most damaging ones, in order
    assert kept == sorted(sensitivity, key=sensitivity.get)[: len(kept)]
    parity = Bundle.open(bundle).manifest.parity["vision_image.int8.onnx"]
    assert parity["cosine"] >= 0.9999 and parity["passed"]

    model = onnx.load(str(bundle / "vision_image.int8.onnx"))
    produced_by = _producers(model)
    fp32_nodes = set(calibration["fp32_nodes"])
    quantizable = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")]
    assert fp32_nodes and len(fp32_nodes) < len(quantizable)
    for node in quantizable:
        sources = [produced_by.get(name) for name in node.input[:2]]  # data and weight, not the bias
        if node.name in fp32_nodes:
            assert "DequantizeLinear" not in sources, node.name
        else:
            assert sources == ["DequantizeLinear", "DequantizeLinear"], node.name


def test_named_groups_stay_fp32(bundle, face_set):
    entries = calibrate_vision(bundle, face_set, modalities="image", keep_fp32=["frgca"], target_cosine=0.9,
                               method="percentile", progress=False)
    calibration = entries["vision_image.int8.onnx"]["calibration"]
    assert calibration["fp32_groups"] == ["frgca"] and calibration["method"] == "percentile"
    model = onnx.load(str(bundle / "vision_image.int8.onnx"))
    produced_by = _producers(model)
    frgca = set(node_groups(onnx.load(str(bundle / "vision_image.onnx")))["frgca"])
    assert len(frgca) == 7  # q, k, v, scores, attention x values (after the softmax), out_proj, linear_proj
    for node in model.graph.node:
        if node.name in frgca:
            assert all(produced_by.get(name) != "DequantizeLinear" for name in node.input), node.name


def test_unreachable_target_fails_and_leaves_the_bundle_as_it_was(bundle, face_set):
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(FaceLlavaError, match="misses its parity threshold.*every node group but one in FP32"):
        calibrate_vision(bundle, face_set, modalities="image", target_cosine=1.0, progress=False)
    assert (bundle / "manifest.json").read_bytes() == before
    assert not list(bundle.glob("*int8*")) and not list(bundle.glob(".int8-*"))
    entries = calibrate_vision(bundle, face_set, modalities="image", target_cosine=1.0, allow_drift=True,
                               method="entropy", progress=False)
    parity = Bundle.open(bundle).manifest.parity["vision_image.int8.onnx"]
    assert not parity["passed"] and 0.99 < parity["cosine"] < 1.0 and entries


def test_cli_calibrates_and_reports_bad_data_in_one_line(bundle, face_folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["calibrate", "vision", str(bundle), "--data", str(empty)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("facellava calibrate vision: error:") and "has no files" in error
    assert "Traceback" not in error and len(error.splitlines()) == 1
    assert main(["calibrate", "vision", str(bundle), "--data", str(face_folder), "--modalities", "image",
                 "--limit", "4", "--method", "minmax"]) == 0
    out = capsys.readouterr().out
    assert "vision_image.int8.onnx" in out and "wrote 1 INT8 vision graphs" in out
    calibration = Bundle.open(bundle).files["vision_image.int8.onnx"]["calibration"]
    assert calibration["calibration_samples"] + calibration["held_out_samples"] == 4
