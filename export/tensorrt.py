"""A bundle's vision ONNX graphs -> TensorRT engines, built on the device that will run them.

Engines are built strongly typed (the precision is the ONNX graph's: FP16 casts are in the FP16 file), so the
same code builds with TensorRT 10 (JetPack 6 ships 10.3) and TensorRT 11 (which removed the FP16/INT8 builder
flags); one optimization profile covers batch 1 to `max_batch`; a timing cache beside the engines makes rebuilds
quick. Each engine lands in `engines/<gpu>-trt<version>/<graph>.engine` with `<graph>.engine.json` beside it
(TensorRT version, GPU, compute capability, source ONNX and its hash), is checked against ONNX Runtime on the FP32
graph, and is recorded in the manifest. Torch-free: it runs where only the runtime is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from facellava import contract
from facellava.bundle import BundleWriter
from facellava.errors import FaceLlavaError
from facellava.export import fidelity, parity
from facellava.runtime.assets import face_photo
from facellava.runtime.face_graphs import (
    DETECTOR_RANGE,
    DETECTORS,
    FRONT_END_ENGINE_KIND,
    FRONT_END_FILES,
    MESH_BORDER,
    MESH_RANGE,
    MESH_SIDE,
    FrontEndGraphs,
    has_front_end_graphs,
    image_to_tensor,
    letterbox_roi,
    onnx_networks,
)
from facellava.runtime.tensorrt_runner import GpuInfo, TensorRTRunner, gpu_info, import_tensorrt

ENGINES_DIR = "engines"
TIMING_CACHE_NAME = "timing.cache"


def engine_dir(gpu: GpuInfo, trt_version: str) -> str:
    """`engines/<gpu>-trt<version>`: engines only load on the GPU model and TensorRT version that built them."""
    return f"{ENGINES_DIR}/{gpu.slug}-trt{trt_version}"


def engine_name(onnx_name: str) -> str:
    """`vision_image.fp16.onnx` -> `vision_image.fp16.engine`."""
    return onnx_name.removesuffix(".onnx") + ".engine"


def _network_flags(trt: Any) -> int:
    # TensorRT 10 needs STRONGLY_TYPED asked for; 11 is always strongly typed and deprecates the flag
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is None or int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(strongly_typed)


def build_engine(onnx_path: Path, engine_path: Path, *, max_batch: int, opt_batch: int = 1,
                 workspace_bytes: int = 2 << 30, timing_cache: Path | None = None) -> dict[str, Any]:
    """Build one strongly typed engine from an ONNX file (external data is read from beside it).

    The optimization profile spans batch 1 to `max_batch`, tuned for `opt_batch`; `timing_cache` is read if it
    exists and rewritten with what this build measured. Returns the build details. Raises FaceLlavaError when
    TensorRT cannot parse or build the graph.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FaceLlavaError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if hasattr(trt.BuilderFlag, "TF32"):  # the graph says float32; TF32 would drop 13 mantissa bits
        config.clear_flag(trt.BuilderFlag.TF32)
    # one profile over the batch of the inputs whose batch is dynamic (the vision graphs'); a graph of static
    # shapes (the front end's, batch 1 as MediaPipe ships them) needs none
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [tensor for tensor in inputs if int(tuple(tensor.shape)[0]) < 0]
    if dynamic:
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            rest = tuple(tensor.shape)[1:]
            profile.set_shape(tensor.name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))
        config.add_optimization_profile(profile)
    else:
        max_batch = opt_batch = int(tuple(inputs[0].shape)[0])
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise FaceLlavaError(f"TensorRT {trt.__version__} failed to build {onnx_path.name} (see its log above); "
                             "a larger --workspace-gb may help")
    engine_path.write_bytes(memoryview(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "max_batch": max_batch, "opt_batch": opt_batch,
            "workspace_bytes": workspace_bytes, "build_seconds": round(seconds, 3)}


def _write_details(writer: BundleWriter, rel: str, entry: dict[str, Any]) -> None:
    """`<engine>.json` beside an engine: its manifest entry without the kind (TensorRT, GPU, source and its hash)."""
    writer.stage(f"{rel}.json").write_text(json.dumps({k: v for k, v in entry.items() if k != "kind"}, indent=2)
                                           + "\n")


def _limits(entry: dict[str, Any]) -> dict[str, float]:
    """An INT8 graph's own target cosine; the precision's limits for the others."""
    if entry["precision"] != "int8":
        return parity.LIMITS[entry["precision"]]
    return {"cosine_min": float(entry.get("calibration", {}).get("target_cosine", 0.99))}


def build_engines(bundle: str | Path, *, modalities: str | Sequence[str] = parity.MODALITIES,
                  precisions: str | Sequence[str] = parity.ENGINE_PRECISIONS, max_batch: int = 4, opt_batch: int = 1,
                  workspace_gb: float = 2.0, allow_drift: bool = False, seed: int | None = None,
                  front_end: bool = True, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Build engines for the bundle's vision graphs of the given modalities and precisions, on GPU 0, and (with
    `front_end`) for its face front-end graphs.

    Each vision engine is run on random inputs (batch up to 2) and the face photograph and compared with ONNX
    Runtime on the FP32 graph of its variant (the graph itself when the bundle has no FP32 one), against the
    limits of its precision; each front-end engine (static shapes, FP32) against ONNX Runtime on its own graph, on
    a random tensor and on what the front end feeds it for the face photograph (`front_end_parity_inputs`). A miss
    fails the build unless `allow_drift`. Engines of an earlier build for the same GPU and TensorRT version are
    replaced. Returns the manifest entries of the new engines. Raises FaceLlavaError for a bundle without vision
    graphs or whose files do not match their hashes, bad arguments, no TensorRT or GPU.
    """
    modalities = parity.parse_choices(modalities, parity.MODALITIES, "modality")
    precisions = parity.parse_choices(precisions, parity.ENGINE_PRECISIONS, "precision")
    if not 1 <= opt_batch <= max_batch:
        raise FaceLlavaError(f"need 1 <= opt batch <= max batch, got {opt_batch} and {max_batch}")
    if not Path(bundle).is_dir() or not (Path(bundle) / contract.MANIFEST_NAME).is_file():
        raise FaceLlavaError(f"{bundle} is not a bundle (no {contract.MANIFEST_NAME}); run `facellava export "
                             "vision` first")
    with BundleWriter.transaction(bundle, create=False) as writer:
        return _build_into(writer, modalities, precisions, max_batch, opt_batch, workspace_gb, allow_drift, seed,
                           front_end, progress)


def _build_into(writer: BundleWriter, modalities: Sequence[str], precisions: Sequence[str], max_batch: int,
                opt_batch: int, workspace_gb: float, allow_drift: bool, seed: int | None, front_end: bool,
                progress: bool) -> dict[str, dict[str, Any]]:
    files = writer.bundle.files
    graphs = [name for name, entry in files.items() if entry.get("kind") == "vision"
              and entry["modality"] in modalities and entry["precision"] in precisions]
    if not graphs:
        raise FaceLlavaError(f"{writer.path} has no vision graphs for {','.join(modalities)} at "
                             f"{','.join(precisions)}; run `facellava export vision` first")
    trt = import_tensorrt()
    gpu = gpu_info(0)
    folder = engine_dir(gpu, trt.__version__)
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    cache_name = f"{folder}/{TIMING_CACHE_NAME}"
    staged_cache = writer.stage(cache_name)
    if cache_name in files:
        shutil.copyfile(writer.bundle.path_of(cache_name), staged_cache)
    entries: dict[str, dict[str, Any]] = {}
    records: dict[str, dict[str, Any]] = {}
    for name in tqdm(graphs, desc="build engines", unit="engine", disable=not progress):
        source = files[name]
        rel = f"{folder}/{engine_name(name)}"
        engine_path = writer.stage(rel)
        details = build_engine(writer.bundle.path_of(name), engine_path, max_batch=max_batch, opt_batch=opt_batch,
                               workspace_bytes=int(workspace_gb * (1 << 30)), timing_cache=staged_cache)
        reference_name = next((n for n, e in files.items() if e.get("kind") == "vision"
                               and e["precision"] == "fp32" and e["modality"] == source["modality"]
                               and e["landmarks"] == source["landmarks"]), name)
        inputs = parity.parity_inputs(source["modality"], source["landmarks"], seed,
                                      random_batch=min(parity.RANDOM_BATCH, max_batch))
        references = parity.run_onnx(writer.bundle.path_of(reference_name), inputs)
        with TensorRTRunner(engine_path) as runner:
            outputs = {key: runner.run(feed)["visual_tokens"] for key, feed in inputs.items()}
        per_input = {key: fidelity.compare(outputs[key], references[key]) for key in inputs}
        records[rel] = {"reference": f"onnxruntime CPUExecutionProvider on {reference_name}", "seed": seed,
                        **parity.parity_record(per_input, _limits(source))}
        entries[rel] = {
            "kind": "engine", "modality": source["modality"], "precision": source["precision"],
            "landmarks": source["landmarks"], "inputs": source["inputs"], "outputs": source["outputs"],
            "source": name, "source_onnx_sha256": source["sha256"], "gpu": gpu.name,
            "compute_capability": gpu.compute_capability, **details}
        _write_details(writer, rel, entries[rel])
    if front_end and has_front_end_graphs(writer.bundle):
        _build_front_end(writer, folder, gpu, staged_cache, int(workspace_gb * (1 << 30)), seed, entries, records,
                         progress)
    misses = [parity.describe_miss(n, r) for n, r in records.items() if not r["passed"]]
    if misses and not allow_drift:
        raise FaceLlavaError(misses[0] + (f" (and {len(misses) - 1} more)" if len(misses) > 1 else ""))
    for rel, entry in entries.items():
        writer.add(rel, parity=records[rel], **entry)
        writer.add(f"{rel}.json", "data", part_of=rel)
    writer.add(cache_name, "timing_cache", tensorrt=trt.__version__, gpu=gpu.name)
    return {rel: writer.manifest.files[rel] for rel in entries}


def front_end_parity_inputs(graphs: FrontEndGraphs, seed: int, photo: str | Path | None = None
                            ) -> dict[str, dict[str, np.ndarray]]:
    """{model: {"random": a tensor uniform in the model's input range, "face_photo": the tensor the front end
    feeds it for the face photograph}}: both detectors get the letterboxed photograph, the mesh the rotated
    region of the photograph's first detection (found by `graphs`). Raises FaceLlavaError when no face is found."""
    from facellava.runtime.face import load_image

    rgb = load_image(Path(photo) if photo is not None else face_photo())
    height, width = rgb.shape[:2]
    rng = np.random.default_rng(seed)
    inputs: dict[str, dict[str, np.ndarray]] = {}
    for model, spec in DETECTORS.items():
        tensor = image_to_tensor(rgb, letterbox_roi(width, height, spec.side), spec.side, DETECTOR_RANGE)
        inputs[model] = {"random": rng.uniform(*DETECTOR_RANGE, tensor.shape).astype(np.float32),
                         "face_photo": tensor}
    found = graphs.detections(rgb, "short_range")
    if not found:
        raise FaceLlavaError("the front end finds no face in the face photograph")
    roi = graphs.mesh_roi(found[0], width, height)
    tensor = image_to_tensor(rgb, roi, MESH_SIDE, MESH_RANGE, MESH_BORDER)
    inputs["mesh"] = {"random": rng.uniform(*MESH_RANGE, tensor.shape).astype(np.float32), "face_photo": tensor}
    return inputs


def _build_front_end(writer: BundleWriter, folder: str, gpu: GpuInfo, timing_cache: Path, workspace_bytes: int,
                     seed: int, entries: dict[str, dict[str, Any]], records: dict[str, dict[str, Any]],
                     progress: bool) -> None:
    """Engines of the three front-end graphs, each checked against ONNX Runtime (CPU) on its own FP32 graph with
    the FP32 limits; adds to `entries` and `records`."""
    files = writer.bundle.files
    paths = {model: writer.bundle.path_of(name) for model, name in FRONT_END_FILES.items()}
    reference = FrontEndGraphs(onnx_networks(paths))
    try:
        inputs = front_end_parity_inputs(reference, seed)
        for model, name in tqdm(FRONT_END_FILES.items(), desc="build front-end engines", unit="engine",
                                disable=not progress):
            source = files[name]
            rel = f"{folder}/{engine_name(name)}"
            engine_path = writer.stage(rel)
            details = build_engine(paths[model], engine_path, max_batch=1, workspace_bytes=workspace_bytes,
                                   timing_cache=timing_cache)
            network = reference.networks[model]
            per_input = {}
            with TensorRTRunner(engine_path) as runner:
                for key, tensor in inputs[model].items():
                    expected = network(tensor)
                    actual = runner.run({runner.input_names[0]: tensor})
                    per_input[key] = fidelity.worst([fidelity.compare(actual[output], value)
                                                     for output, value in expected.items()])
            records[rel] = {"reference": f"onnxruntime CPUExecutionProvider on {name}", "seed": seed,
                            **parity.parity_record(per_input, parity.LIMITS["fp32"])}
            entries[rel] = {"kind": FRONT_END_ENGINE_KIND, "model": source.get("model", model), "source": name,
                            "source_onnx_sha256": source["sha256"], "gpu": gpu.name,
                            "compute_capability": gpu.compute_capability, **details}
            _write_details(writer, rel, entries[rel])
    finally:
        reference.close()
