"""The vision export on the tiny checkpoint: ONNX files, their parity in ONNX Runtime, the bundle manifest, the
external-data path, re-exports, the errors a user can cause, and (where TensorRT and a GPU exist) engines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from facellava import contract
from facellava.bundle import BOOKKEEPING, BundleWriter
from facellava.cli import main
from facellava.errors import FaceLlavaError
from facellava.export import fidelity, front_end, parity, vision
from facellava.export.vision import MODALITIES, PRECISIONS, export_vision, vision_file_name, vision_only_model

VARIANTS = [(m, lm, p) for m in MODALITIES for lm in (True, False) for p in PRECISIONS]
TINY_USED_LAYERS = 2  # the tiny towers have 3 layers; mm_vision_select_layer -2 uses 2


@pytest.fixture(scope="module")
def vision_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, face_photo: Path
                  ) -> tuple[Path, vision.VisionExport]:
    """Every variant (image, video; with and without landmarks; FP32, FP16), exported once for the module."""
    bundle = tmp_path_factory.mktemp("vision") / "bundle"
    result = export_vision(tiny_checkpoint, bundle, face_photo=face_photo, seed=1234, progress=False)
    return bundle, result


@pytest.fixture(scope="module")
def external_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image graphs without landmarks, exported with the external-data threshold lowered below their size."""
    bundle = tmp_path_factory.mktemp("external") / "bundle"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vision, "EXTERNAL_DATA_THRESHOLD", 100_000)
        export_vision(tiny_checkpoint, bundle, modalities="image", landmarks=False, seed=7, front_end=False,
                      progress=False)
    return bundle


def _reference(model, modality: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    pixels = torch.from_numpy(inputs["pixel_values"])
    landmarks = torch.from_numpy(inputs["landmarks"]) if "landmarks" in inputs else None
    with torch.no_grad():
        encode = model.encode_image if modality == "image" else model.encode_video
        return encode(pixels, landmarks).numpy()


def _meets_threshold(figures: dict[str, float], precision: str) -> bool:
    if precision == "fp32":
        return figures["rel_err"] <= parity.LIMITS["fp32"]["rel_err_max"]
    return figures["cosine"] >= parity.LIMITS["fp16"]["cosine_min"]


# --- parity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("modality", "with_landmarks", "precision"), VARIANTS)
def test_ort_matches_pytorch_at_batch_1_and_3(vision_bundle, tiny_model, face_photo, modality, with_landmarks,
                                              precision):
    """Each file, run here in ONNX Runtime, against the fully loaded PyTorch model (not the export's own reference):
    fresh random inputs at batch 1 and 3, and the face photograph."""
    bundle, _ = vision_bundle
    session = onnxruntime.InferenceSession(str(bundle / vision_file_name(modality, with_landmarks, precision)),
                                           providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(99)
    feeds = [parity.random_inputs(modality, with_landmarks, batch, rng) for batch in (1, 3)]
    feeds.append(parity.face_photo_inputs(modality, with_landmarks, face_photo))
    for feed in feeds:
        out = session.run(["visual_tokens"], feed)[0]
        reference = _reference(tiny_model, modality, feed)
        assert out.dtype == np.float32 and out.shape == reference.shape
        figures = fidelity.compare(out, reference)
        assert _meets_threshold(figures, precision), figures
        if precision == "fp16":  # really reduced precision, not an FP32 graph under another name
            assert figures["max_abs"] > 1e-5


def test_landmarks_change_the_tokens(vision_bundle, face_photo):
    """The landmark graph uses its landmark input: other landmarks give other tokens; the no-landmark graph equals
    the landmark-free path of the model."""
    bundle, _ = vision_bundle
    session = onnxruntime.InferenceSession(str(bundle / "vision_image.onnx"), providers=["CPUExecutionProvider"])
    feed = parity.face_photo_inputs("image", True, face_photo)
    moved = {**feed, "landmarks": feed["landmarks"] + np.float32(0.05)}
    a, b = (session.run(["visual_tokens"], f)[0] for f in (feed, moved))
    assert fidelity.compare(a, b)["rel_err"] > 1e-3


def test_fp16_graph_keeps_layernorm_and_softmax_in_fp32(vision_bundle):
    bundle, _ = vision_bundle
    model = onnx.load(str(bundle / "vision_video.fp16.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input,
                                                             *model.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    fp16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert fp16 > len(model.graph.initializer) // 2
    kept = [n for n in model.graph.node if n.op_type in vision.FP16_KEEP_FP32_OPS]
    assert kept
    for node in kept:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in matmuls)
    assert [types[v.name] for v in [*model.graph.input, *model.graph.output]] == [onnx.TensorProto.FLOAT] * 3


def test_masked_frgca_exports_with_parity(tmp_path):
    """The paper figure's FRGCA variant (proximity bias between region centroids and patch centres)."""
    from facellava.model.tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "masked", seed=2, cross_attn="masked")
    result = export_vision(checkpoint, tmp_path / "bundle", modalities="video", precisions="fp32", landmarks=True,
                           seed=5, progress=False)
    record = result.parity["vision_video.onnx"]
    assert record["passed"] and record["rel_err"] <= 1e-4


def test_vision_only_model_allocates_no_llm():
    from facellava.model.loading import read_config_dict
    from facellava.model.modeling import TowerConfig
    from facellava.model.tiny import TINY_TOWER, tiny_config

    config = read_config_dict(tiny_config(512, "simple", "directories"))
    tower = TowerConfig(**TINY_TOWER, num_used_layers=2)
    model = vision_only_model(config, tower, None, seed=0)
    assert all(p.is_meta for p in model.llm.parameters())
    assert not any(p.is_meta for p in model.image_tower.parameters()) and model.video_tower is None
    feed = parity.random_inputs("image", True, 2, np.random.default_rng(0))
    tokens = _reference(model, "image", feed)
    assert tokens.shape == (2, 256, 256) and np.isfinite(tokens).all() and tokens.std() > 0.1


# --- the files and the manifest -----------------------------------------------------------------------------


@pytest.mark.parametrize(("modality", "with_landmarks"), [(m, lm) for m in MODALITIES for lm in (True, False)])
def test_graph_contract(vision_bundle, modality, with_landmarks):
    """Inputs, outputs, dynamic batch, opset, checker, and only the tower layers that the features use."""
    bundle, _ = vision_bundle
    path = bundle / vision_file_name(modality, with_landmarks, "fp32")
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    frames = [] if modality == "image" else [contract.NUM_FRAMES]
    expected_inputs = {"pixel_values": ["batch", 3, *frames, 224, 224]}
    if with_landmarks:
        expected_inputs["landmarks"] = ["batch", *frames, 68, 2]
    tokens = contract.IMAGE_TOKENS if modality == "image" else contract.VIDEO_FRAME_TOKENS
    assert {v.name: dims(v) for v in model.graph.input} == expected_inputs
    assert {v.name: dims(v) for v in model.graph.output} == {"visual_tokens": ["batch", *frames, tokens, 256]}
    norms = sum(n.op_type == "LayerNormalization" for n in model.graph.node)
    per_layer = 3 if modality == "video" else 2  # video layers add the temporal block's LayerNorm
    assert norms == 1 + per_layer * TINY_USED_LAYERS + with_landmarks  # pre-LN, the used layers, FRGCA's LN


def test_manifest_records_every_file_with_sha256_and_parity(vision_bundle):
    bundle, result = vision_bundle
    manifest = json.loads((bundle / contract.MANIFEST_NAME).read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {
        contract.MANIFEST_NAME, *BOOKKEEPING}
    graphs = {vision_file_name(*v) for v in VARIANTS}
    # export vision adds the face front end's graphs and their notice (export front-end) to a bundle without them
    front_end_files = {model.file for model in front_end.MODELS.values()} | {front_end.NOTICE_NAME}
    assert on_disk == set(manifest["files"]) == graphs | front_end_files
    assert set(result.files) == graphs
    assert {manifest["files"][name]["model"] for name in front_end_files - {front_end.NOTICE_NAME}} == set(
        front_end.MODELS)
    for name in graphs:
        entry = manifest["files"][name]
        assert entry["sha256"] == contract.file_sha256(bundle / name)
        assert entry["bytes"] == (bundle / name).stat().st_size
        assert entry["kind"] == "vision" and entry["opset"] == vision.OPSET
        assert name == vision_file_name(entry["modality"], entry["landmarks"], entry["precision"])
        assert list(entry["inputs"]) == (["pixel_values", "landmarks"] if entry["landmarks"] else ["pixel_values"])
        assert entry["outputs"]["visual_tokens"]["shape"][0] == "batch"
        assert entry["external_data"] == []
        record = manifest["parity"][name]
        assert record["passed"] is True and record["seed"] == 1234
        assert set(record["inputs"]) == {"random", "face_photo"}
        assert _meets_threshold(record, entry["precision"])
        assert 0 < record["max_abs"] < 0.1 and record["reference"] == f"FaceLlava.encode_{entry['modality']}"
    assert manifest["source"]["checkpoint_sha256"] and manifest["schema_version"] == contract.MANIFEST_SCHEMA_VERSION
    sizes = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    assert sizes["vision_video.fp16.onnx"] < 0.65 * sizes["vision_video.onnx"]


def test_external_data_path(external_bundle, tiny_model):
    manifest = json.loads((external_bundle / contract.MANIFEST_NAME).read_text())
    names = {"vision_image_nolm.onnx", "vision_image_nolm.fp16.onnx"}
    assert set(manifest["files"]) == names | {f"{n}.data" for n in names}
    rng = np.random.default_rng(5)
    for name in names:
        entry, data = manifest["files"][name], manifest["files"][f"{name}.data"]
        assert entry["external_data"] == [f"{name}.data"]
        assert data["kind"] == "data" and data["part_of"] == name
        assert data["sha256"] == contract.file_sha256(external_bundle / f"{name}.data")
        assert entry["bytes"] < data["bytes"] and data["bytes"] > 100_000  # the weights sit beside the graph
        assert manifest["parity"][name]["passed"]
        onnx.checker.check_model(str(external_bundle / name), full_check=True)
        session = onnxruntime.InferenceSession(str(external_bundle / name), providers=["CPUExecutionProvider"])
        feed = parity.random_inputs("image", False, 3, rng)
        figures = fidelity.compare(session.run(["visual_tokens"], feed)[0], _reference(tiny_model, "image", feed))
        assert _meets_threshold(figures, entry["precision"]), figures


def test_fp16_from_external_data_equals_the_in_memory_conversion(external_bundle, tmp_path):
    """`convert_fp16` on a graph with external weights converts them one at a time from the file (the graph
    alone in memory): the same nodes and bit-identical initializers as converting the whole graph in memory."""
    from onnx import numpy_helper

    whole = onnx.load(str(external_bundle / "vision_image_nolm.onnx"))  # the FP32 graph with its weights
    onnx.save_model(whole, str(tmp_path / "inline.onnx"))  # tiny: one file, converted in memory
    vision.convert_fp16(tmp_path / "inline.onnx", tmp_path / "inline.fp16.onnx")
    assert not (tmp_path / "inline.fp16.onnx.data").exists()
    streamed_path = external_bundle / "vision_image_nolm.fp16.onnx"
    header = onnx.load(str(streamed_path), load_external_data=False)
    outside = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(outside) > 10 and all(int({e.key: e.value for e in t.external_data}["offset"]) % 4096 == 0
                                     for t in outside)
    in_memory, streamed = onnx.load(str(tmp_path / "inline.fp16.onnx")), onnx.load(str(streamed_path))

    def nodes(model: onnx.ModelProto) -> list:
        return [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]

    assert nodes(streamed) == nodes(in_memory)
    a = {t.name: numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in streamed.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name
    assert sum(v.dtype == np.float16 for v in b.values()) > len(b) // 2
    assert sum(v.dtype == np.float32 and v.size > 1 for v in b.values()) > 0  # LayerNorm weights kept FP32


def test_reexport_replaces_vision_files_and_stale_engines(external_bundle, tiny_checkpoint, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(external_bundle, bundle)
    # an engine built from the graph this re-export replaces, and a foreign file the export must not touch
    engine = "engines/some-gpu-trt10.3.0/vision_image_nolm.engine"
    with BundleWriter.transaction(bundle) as writer:
        old_hash = writer.manifest.files["vision_image_nolm.onnx"]["sha256"]
        writer.stage(engine).write_bytes(b"engine")
        writer.add(engine, "engine", source="vision_image_nolm.onnx", source_onnx_sha256=old_hash,
                   modality="image", precision="fp32", landmarks=False)
        writer.stage(f"{engine}.json").write_text("{}")
        writer.add(f"{engine}.json", "data", part_of=engine)
        writer.stage("model.gguf").write_bytes(b"gguf")
        writer.add("model.gguf", "llm", type="f32")

    export_vision(tiny_checkpoint, bundle, modalities="image", precisions="fp16", landmarks=True, seed=3,
                  front_end=False, progress=False)
    manifest = json.loads((bundle / contract.MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"vision_image.fp16.onnx", "model.gguf"}
    assert set(manifest["parity"]) == {"vision_image.fp16.onnx"}
    left = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")} - set(BOOKKEEPING)
    assert left == {contract.MANIFEST_NAME, "vision_image.fp16.onnx", "model.gguf"}  # no staging, no empty dirs
    assert manifest["files"]["vision_image.fp16.onnx"]["sha256"] == contract.file_sha256(
        bundle / "vision_image.fp16.onnx")


def test_parity_miss_fails_and_leaves_the_bundle_as_it_was(external_bundle, tiny_checkpoint, tmp_path,
                                                           monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(external_bundle, bundle)
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    monkeypatch.setitem(parity.LIMITS, "fp32", {"rel_err_max": 0.0})  # no export can reach exactly zero
    with pytest.raises(FaceLlavaError, match=r"vision_image_nolm\.onnx misses .*rel_err <= 0.*--allow-drift"):
        export_vision(tiny_checkpoint, bundle, modalities="image", precisions="fp32", landmarks=False,
                      front_end=False, progress=False)
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before

    export_vision(tiny_checkpoint, bundle, modalities="image", precisions="fp32", landmarks=False,
                  allow_drift=True, front_end=False, progress=False)
    manifest = json.loads((bundle / contract.MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"vision_image_nolm.onnx"}  # weights inline now: the old .data is gone
    assert not (bundle / "vision_image_nolm.onnx.data").exists()
    record = manifest["parity"]["vision_image_nolm.onnx"]
    assert record["passed"] is False and 0 < record["rel_err"] < 1e-4


# --- user errors --------------------------------------------------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_checkpoint_without_towers(tmp_path, capsys):
    from facellava.model.tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "no-towers", towers="none")
    rc = main(["export", "vision", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "bundle")])
    assert rc == 1
    assert "no image tower" in _one_line_error(capsys)
    assert not (tmp_path / "bundle").exists()


def test_bundle_path_is_a_file(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "bundle"
    target.write_text("not a bundle")
    rc = main(["export", "vision", "--checkpoint", str(tiny_checkpoint), "--out", str(target)])
    assert rc == 1
    assert "is a file" in _one_line_error(capsys)
    assert target.read_text() == "not a bundle"


@pytest.mark.parametrize(("option", "value", "message"), [("--modalities", "image,audio", "unknown modality audio"),
                                                          ("--precision", "int8", "unknown precision int8")])
def test_unknown_modality_or_precision(tiny_checkpoint, tmp_path, capsys, option, value, message):
    rc = main(["export", "vision", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "b"), option, value])
    assert rc == 1
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "b").exists()


def test_cli_process_exits_nonzero_without_traceback(tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "facellava", "export", "vision", "--checkpoint",
                             str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--modalities", "audio"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "facellava export vision: error: unknown modality audio; choose from image,video"]


def test_build_engine_on_a_directory_without_bundle(tmp_path, capsys):
    assert main(["build-engine", str(tmp_path)]) == 1
    assert "not a bundle" in _one_line_error(capsys)


# --- torch-free device side ---------------------------------------------------------------------------------


def test_device_side_modules_do_not_import_torch():
    code = ("import sys, facellava.export.tensorrt, facellava.export.parity, facellava.runtime.tensorrt_runner, "
            "facellava.runtime.ort_providers; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_execution_providers_choose_what_is_installed(vision_bundle):
    from facellava.runtime.ort_providers import execution_providers

    providers = execution_providers("auto")
    names = [p if isinstance(p, str) else p[0] for p in providers]
    assert names[-1] == "CPUExecutionProvider" and set(names) <= set(onnxruntime.get_available_providers())
    bundle, _ = vision_bundle
    session = onnxruntime.InferenceSession(str(bundle / "vision_image_nolm.fp16.onnx"), providers=providers)
    assert session.run(["visual_tokens"], parity.random_inputs("image", False, 1, np.random.default_rng(0)))[0].shape \
        == (1, 256, 256)
    with pytest.raises(FaceLlavaError, match="unknown device"):
        execution_providers("npu")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(FaceLlavaError, match="install onnxruntime-gpu"):
            execution_providers("cuda")


def test_build_engine_without_tensorrt_says_how_to_get_it(vision_bundle, capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    bundle, _ = vision_bundle
    assert main(["build-engine", str(bundle), "--modalities", "image"]) == 1
    assert "TensorRT is not installed" in _one_line_error(capsys)
    assert not (bundle / "engines").exists()


def test_build_engine_takes_int8_graphs_and_refuses_unknown_precisions(vision_bundle, capsys):
    bundle, _ = vision_bundle
    assert main(["build-engine", str(bundle), "--precision", "int4"]) == 1
    assert "precision" in _one_line_error(capsys)
    assert main(["build-engine", str(bundle), "--precision", "int8"]) == 1  # int8 is a precision it builds
    assert "has no vision graphs for image,video at int8" in _one_line_error(capsys)


# --- TensorRT (where it and a GPU are present) ----------------------------------------------------------------


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401

        from facellava.runtime.tensorrt_runner import gpu_info

        gpu_info(0)
    except ImportError as error:
        return f"TensorRT or cuda-python is not installed ({error.name})"
    except FaceLlavaError as error:
        return f"TensorRT cannot run here: {error}"
    return None


requires_tensorrt = pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))


@requires_tensorrt
def test_engines_match_onnxruntime_and_pytorch(vision_bundle, tiny_model, tmp_path):
    from facellava.export.tensorrt import TIMING_CACHE_NAME, build_engines
    from facellava.runtime.tensorrt_runner import TensorRTRunner

    bundle = tmp_path / "bundle"
    shutil.copytree(vision_bundle[0], bundle)
    entries = build_engines(bundle, max_batch=3, seed=11, front_end=False, progress=False)
    manifest = json.loads((bundle / contract.MANIFEST_NAME).read_text())
    assert len(entries) == len(VARIANTS) and all(e["kind"] == "engine" for e in entries.values())
    rng = np.random.default_rng(12)
    for name, entry in entries.items():
        info = json.loads((bundle / f"{name}.json").read_text())
        assert info["source_onnx_sha256"] == manifest["files"][entry["source"]]["sha256"]
        assert info["tensorrt"] and info["gpu"] and "." in info["compute_capability"]
        assert manifest["files"][name]["sha256"] == contract.file_sha256(bundle / name)
        assert manifest["parity"][name]["passed"]
        with TensorRTRunner(bundle / name) as runner:
            assert runner.max_batch() == 3
            for batch in (1, 3):
                feed = parity.random_inputs(entry["modality"], entry["landmarks"], batch, rng)
                out = runner.run(feed)["visual_tokens"]
                figures = fidelity.compare(out, _reference(tiny_model, entry["modality"], feed))
                assert _meets_threshold(figures, entry["precision"]), (name, figures)
            with pytest.raises(FaceLlavaError, match="outside the engine's profile"):
                runner.run(parity.random_inputs(entry["modality"], entry["landmarks"], 4, rng))
    assert (bundle / Path(next(iter(entries))).parent / TIMING_CACHE_NAME).is_file()


@requires_tensorrt
def test_front_end_engines_match_onnxruntime(vision_bundle, face_photo, tmp_path):
    """build-engine builds the face front end's graphs too (static shapes, FP32); the front end on those engines
    finds the same faces, crops and landmarks as on ONNX Runtime's CPU provider."""
    from facellava.bundle import Bundle
    from facellava.export.tensorrt import build_engines
    from facellava.runtime.face import FaceFrontEnd, load_image
    from facellava.runtime.face_graphs import FRONT_END_FILES, FrontEndGraphs

    bundle = tmp_path / "bundle"
    shutil.copytree(vision_bundle[0], bundle)
    entries = build_engines(bundle, modalities="image", precisions="fp32", seed=5, progress=False)
    front = {name: e for name, e in entries.items() if e["kind"] == "front_end_engine"}
    assert sorted(e["source"] for e in front.values()) == sorted(FRONT_END_FILES.values())
    manifest = json.loads((bundle / contract.MANIFEST_NAME).read_text())
    for name, entry in front.items():
        record = manifest["parity"][name]
        assert record["passed"] and set(record["inputs"]) == {"random", "face_photo"}, (name, record)
        assert entry["max_batch"] == 1 and entry["source_onnx_sha256"] == manifest["files"][entry["source"]]["sha256"]
    opened = Bundle.open(bundle)
    rgb = load_image(face_photo)
    engines, cpu = FrontEndGraphs.from_bundle(opened, "tensorrt"), FrontEndGraphs.from_bundle(opened, "cpu")
    try:
        on_gpu, on_cpu = engines.official_detections(rgb), cpu.official_detections(rgb)
        assert [box[:4] for box in on_gpu] == [box[:4] for box in on_cpu]
        assert np.allclose([box[4] for box in on_gpu], [box[4] for box in on_cpu], atol=1e-5)
        assert np.abs(engines.mesh(rgb) - cpu.mesh(rgb)).max() * max(rgb.shape[:2]) < 0.05  # image pixels
    finally:
        engines.close()
        cpu.close()
    with FaceFrontEnd.from_bundle(opened, "graphs", "tensorrt") as front_end, \
            FaceFrontEnd.from_bundle(opened, "graphs", "cpu") as reference:
        ours, theirs = front_end.process_image(rgb), reference.process_image(rgb)
        assert np.array_equal(ours.crop, theirs.crop)
        assert np.abs(ours.landmarks - theirs.landmarks).max() * 256 < 0.1  # crop pixels


@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
                    reason="onnxruntime-gpu with CUDA is not installed")
def test_cuda_execution_provider_parity(vision_bundle, tiny_model):
    from facellava.runtime.ort_providers import execution_providers

    bundle, _ = vision_bundle
    rng = np.random.default_rng(13)
    for precision in PRECISIONS:
        session = onnxruntime.InferenceSession(str(bundle / vision_file_name("video", True, precision)),
                                               providers=execution_providers("cuda"))
        feed = parity.random_inputs("video", True, 3, rng)
        figures = fidelity.compare(session.run(["visual_tokens"], feed)[0], _reference(tiny_model, "video", feed))
        assert _meets_threshold(figures, precision), figures

