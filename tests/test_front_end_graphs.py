"""The front end's ONNX graphs (export/tflite_onnx.py, export/front_end.py) against MediaPipe's own models.

- The detectors against the TFLite interpreter (ai-edge-litert) on the shipped photograph and face crops: every
  output, same names and shapes.
- The attention face mesh (MediaPipe custom ops; no stock interpreter runs it) against MediaPipe's face mesh
  subgraph itself (FaceLandmarkCpu with attention: what refine_landmarks=True runs), fed the same 192x192 crop as
  its whole region of interest: all 478 refined points.
- `facellava export front-end` writes a bundle that `Bundle.open` verifies, with parity figures and the notice;
  bad model paths are one-line errors that leave no bundle behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

pytest.importorskip("tflite")  # the export extra's flatbuffer parser
pytest.importorskip("mediapipe")  # the models and the reference

from facellava.bundle import Bundle, BundleWriter  # noqa: E402
from facellava.cli import main  # noqa: E402
from facellava.export import front_end  # noqa: E402
from facellava.export.tflite_onnx import convert_tflite  # noqa: E402

MODELS = front_end.find_models()


@pytest.fixture(scope="module")
def sessions() -> dict[str, onnxruntime.InferenceSession]:
    return {key: onnxruntime.InferenceSession(convert_tflite(path).SerializeToString(),
                                              providers=["CPUExecutionProvider"])
            for key, path in MODELS.items()}


@pytest.mark.parametrize("key", ["short_range", "full_range"])
def test_detector_matches_the_tflite_interpreter(sessions, key: str) -> None:
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")
    model = front_end.MODELS[key]
    interpreter = interpreter_module.Interpreter(model_path=str(MODELS[key]))
    interpreter.allocate_tensors()
    session = sessions[key]
    (tflite_input,) = interpreter.get_input_details()
    assert [session.get_inputs()[0].name, session.get_inputs()[0].shape] == [tflite_input["name"],
                                                                             list(tflite_input["shape"])]
    expected_outputs = {d["name"]: (d["index"], list(d["shape"])) for d in interpreter.get_output_details()}
    assert {o.name: o.shape for o in session.get_outputs()} == {n: s for n, (_, s) in expected_outputs.items()}
    worst = 0.0
    for image in front_end.parity_images(model.size).values():
        tensor = front_end.input_tensor(image, model.input_range)
        interpreter.set_tensor(tflite_input["index"], tensor)
        interpreter.invoke()
        ours = dict(zip([o.name for o in session.get_outputs()], session.run(None, {tflite_input["name"]: tensor}),
                        strict=True))
        for name, (index, _) in expected_outputs.items():
            expected = interpreter.get_tensor(index)
            error = float(np.abs(ours[name] - expected).max())
            assert error < 2e-3 * max(1.0, float(np.abs(expected).max()) / 100), (name, error)
            worst = max(worst, error)
    assert worst < 2e-3


def mediapipe_face_mesh(crop: np.ndarray) -> np.ndarray:
    """MediaPipe's refined face mesh (478 points, x and y in crop pixels) on a 192x192 crop as its whole ROI."""
    from google.protobuf import text_format
    from mediapipe.framework import calculator_pb2
    from mediapipe.framework.formats import rect_pb2
    from mediapipe.python.solution_base import PacketDataType, SolutionBase

    config = text_format.Parse("""
        input_stream: "image" input_stream: "roi" input_side_packet: "with_attention" output_stream: "landmarks"
        node { calculator: "FaceLandmarkCpu" input_stream: "IMAGE:image" input_stream: "ROI:roi"
               input_side_packet: "WITH_ATTENTION:with_attention" output_stream: "LANDMARKS:landmarks" }
    """, calculator_pb2.CalculatorGraphConfig())
    solution = SolutionBase(graph_config=config, side_inputs={"with_attention": True}, outputs=["landmarks"],
                            stream_type_hints={"roi": PacketDataType.PROTO, "landmarks": PacketDataType.PROTO})
    try:
        roi = rect_pb2.NormalizedRect(x_center=0.5, y_center=0.5, width=1.0, height=1.0, rotation=0.0)
        landmarks = solution.process({"image": np.ascontiguousarray(crop), "roi": roi}).landmarks
    finally:
        solution.close()
    assert landmarks is not None, "MediaPipe found no face in the crop"
    return np.array([[p.x, p.y] for p in landmarks.landmark]) * crop.shape[0]


@pytest.mark.parametrize("image_name", ["face", "face_tilted"])
def test_face_mesh_matches_mediapipe_refined_landmarks(sessions, image_name: str) -> None:
    model = front_end.MODELS["face_mesh"]
    crop = front_end.parity_images(model.size)[image_name]
    session = sessions["face_mesh"]
    ours = dict(zip([o.name for o in session.get_outputs()],
                    session.run(None, {"input_1": front_end.input_tensor(crop, model.input_range)}), strict=True))
    reference = mediapipe_face_mesh(crop)
    assert reference.shape == (478, 2)
    mesh = ours["output_mesh_identity"].reshape(468, 3)[:, :2]
    refined = np.concatenate([ours[n].reshape(-1, 2) for n in ("output_lips", "output_left_eye",
                                                               "output_right_eye")])
    # MediaPipe replaces the x, y of the lips' and eyes' mesh points by the attention outputs: each of its first
    # 468 points is our mesh point of the same index or exactly one of the 222 refined points, each used once
    as_mesh = np.abs(reference[:468] - mesh).max(axis=1)
    distances = np.abs(reference[:468, None] - refined[None]).max(axis=2)
    replaced = as_mesh > 0.01
    assert replaced.sum() == len(refined) == 222
    matches = distances[replaced].argmin(axis=1)
    assert sorted(matches) == list(range(len(refined)))
    errors = np.concatenate([as_mesh[~replaced], distances[replaced].min(axis=1)])
    iris = np.concatenate([ours["output_left_iris"].reshape(5, 2), ours["output_right_iris"].reshape(5, 2)])
    iris_error = np.abs(reference[468:] - iris).max()
    assert max(errors.max(), iris_error) < 5e-3  # pixels of the 192 crop; measured 1.4e-4
    assert float(ours["conv_faceflag"].ravel()[0]) > 0  # a face: MediaPipe kept it


def test_export_front_end_writes_a_verified_bundle(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bundle_dir = tmp_path / "bundle"
    assert main(["export", "front-end", "--bundle", str(bundle_dir)]) == 0
    assert "wrote 3 front-end graphs" in capsys.readouterr().out
    bundle = Bundle.open(bundle_dir)
    assert sorted(bundle.verify_all()) == sorted([front_end.NOTICE_NAME, *(m.file for m in front_end.MODELS.values())])
    for key, model in front_end.MODELS.items():
        assert bundle.find("front_end", model=key) == [model.file]
        entry, record = bundle.files[model.file], bundle.manifest.parity[model.file]
        assert entry["notice"] == front_end.NOTICE_NAME and entry["input_range"] == list(model.input_range)
        assert record["passed"] and record["max_abs"] < model.limits["max_abs_max"]
        assert set(record["outputs"]) == set(entry["outputs"])
        assert set(record["inputs"]) == {"photo", "face", "face_mirrored", "face_tilted"}
    session = onnxruntime.InferenceSession(str(bundle.path_of("face_mesh.onnx")), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 192, 192, 3]
    notice = bundle.path_of(front_end.NOTICE_NAME).read_text()
    assert "Apache License, Version 2.0" in notice and "face_landmark_with_attention.tflite" in notice

    # the other exports add the graphs only to a bundle that lacks them: this one has them, nothing changes
    manifest = (bundle_dir / "manifest.json").read_bytes()
    with BundleWriter.transaction(bundle_dir) as writer:
        assert front_end.add_front_end_if_missing(writer, progress=False) is None
    assert (bundle_dir / "manifest.json").read_bytes() == manifest


def test_bad_model_paths_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bundle_dir = tmp_path / "bundle"
    missing = tmp_path / "no-such-dir"
    assert main(["export", "front-end", "--bundle", str(bundle_dir), "--mediapipe-models", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err

    models = tmp_path / "models"
    models.mkdir()
    for path in MODELS.values():
        (models / path.name).write_bytes(path.read_bytes())
    assert main(["export", "front-end", "--bundle", str(bundle_dir), "--mediapipe-models", str(models)]) == 0
    before = (bundle_dir / "manifest.json").read_bytes()
    capsys.readouterr()

    (models / MODELS["face_mesh"].name).unlink()
    assert main(["export", "front-end", "--bundle", str(bundle_dir), "--mediapipe-models", str(models)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "face_landmark_with_attention.tflite not found" in err
    assert str(models / "face_landmark_with_attention.tflite") in err

    (models / MODELS["face_mesh"].name).write_bytes(b"PK\x03\x04 not a flatbuffer" * 10)
    assert main(["export", "front-end", "--bundle", str(bundle_dir), "--mediapipe-models", str(models)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a TFLite model" in err
    assert (bundle_dir / "manifest.json").read_bytes() == before  # the failed export changed nothing


@pytest.fixture(scope="module")
def graphs_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle_dir = tmp_path_factory.mktemp("front_end") / "bundle"
    front_end.export_front_end(bundle_dir, progress=False)
    return bundle_dir


def test_front_end_device_choice(graphs_bundle: Path, face_photo: Path) -> None:
    from facellava.errors import FaceLlavaError
    from facellava.runtime.face import load_image
    from facellava.runtime.face_graphs import FrontEndGraphs

    bundle = Bundle.open(graphs_bundle)
    rgb = load_image(face_photo)
    with pytest.raises(FaceLlavaError, match="unknown front-end device 'npu'"):
        FrontEndGraphs.from_bundle(bundle, "npu")
    # no engine of the graphs is built for this device (nor could be here): asked for, a one-line how-to
    with pytest.raises(FaceLlavaError, match="no TensorRT engines of the front-end graphs .* `facellava build-engine"):
        FrontEndGraphs.from_bundle(bundle, "tensorrt")
    answers = []
    for device in ("auto", "onnxruntime", "cpu"):  # "auto" falls back to ONNX Runtime's best provider
        graphs = FrontEndGraphs.from_bundle(bundle, device)
        try:
            answers.append((graphs.official_detections(rgb), graphs.mesh(rgb)))
        finally:
            graphs.close()
        assert not graphs.networks
    (boxes, mesh), *others = answers
    assert len(boxes) == 1 and mesh.shape == (478, 2)
    for other_boxes, other_mesh in others:  # one machine, one provider here: the same numbers
        assert other_boxes == boxes and np.array_equal(other_mesh, mesh)


def test_a_new_front_end_graph_drops_its_stale_engine(graphs_bundle: Path, tmp_path: Path) -> None:
    """An engine names its graph as `source`: the same graphs exported again keep it; another graph in its place
    (another MediaPipe, another converter) removes it, as a new vision graph removes its engines."""
    import shutil

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(graphs_bundle, bundle_dir)
    engine = "engines/some-gpu-trt10.3.0/face_mesh.engine"
    with BundleWriter.transaction(bundle_dir) as writer:
        writer.stage(engine).write_bytes(b"an engine of this graph")
        writer.add(engine, "front_end_engine", model="face_mesh", source="face_mesh.onnx",
                   source_onnx_sha256=writer.manifest.files["face_mesh.onnx"]["sha256"])
    with BundleWriter.transaction(bundle_dir) as writer:
        front_end.write_front_end(writer, progress=False)  # the same graphs, byte for byte
    assert engine in Bundle.open(bundle_dir).files
    mesh = bundle_dir / "face_mesh.onnx"
    with BundleWriter.transaction(bundle_dir) as writer:
        writer.stage("face_mesh.onnx").write_bytes(mesh.read_bytes() + b"\0")  # another graph in its place
        writer.add("face_mesh.onnx", "front_end", model="face_mesh")
    bundle = Bundle.open(bundle_dir)
    assert engine not in bundle.files and not (bundle_dir / engine).exists()
    assert sorted(bundle.find("front_end")) == sorted(m.file for m in front_end.MODELS.values())


@pytest.mark.parametrize("entry, complaint", [
    ({"source": "face_mesh.onnx"}, "model must be"),
    ({"model": "../face_mesh", "source": "face_mesh.onnx"}, "model must be a front-end model name"),
    ({"model": "face_mesh"}, "source must be"),
])
def test_front_end_engine_entries_are_checked(entry: dict, complaint: str) -> None:
    from facellava.bundle import Manifest
    from facellava.errors import FaceLlavaError

    manifest = Manifest().to_json()
    manifest["files"]["engines/x/face_mesh.engine"] = {"sha256": "a" * 64, "bytes": 1, "kind": "front_end_engine",
                                                       **entry}
    with pytest.raises(FaceLlavaError, match=complaint):
        Manifest.from_json(manifest)
