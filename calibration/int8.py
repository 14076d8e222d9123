"""INT8 vision graphs with explicit Q/DQ nodes, calibrated on face crops, for TensorRT and ONNX Runtime.

From each FP32 vision graph of a bundle, `calibrate_vision` writes `vision_<modality>[_nolm].int8.onnx`: symmetric
INT8 activations (zero point 0, as TensorRT requires) and symmetric per-channel INT8 weights, in QDQ format, on the
inputs of MatMul, Conv and Gemm only (TensorRT fuses Q/DQ into those; LayerNorm, Softmax, GELU and the residual
adds stay float, which also keeps them accurate).

The quantizer is ONNX Runtime's `quantize_static`. Tried against it (November 2025, pip dry runs on this project's
pins): NVIDIA ModelOpt's ONNX PTQ (`nvidia-modelopt[onnx]` 0.47) would replace onnxruntime by onnxruntime-gpu 1.24,
downgrade onnx to 1.21 and pull cupy-cuda12x, so it does not install cleanly beside the runtime; optimum's
`ORTQuantizer` (TensorRT preset) is a wrapper over this same `quantize_static` that would downgrade transformers to
4.57. `quantize_static` is maintained with ONNX Runtime, which both halves already need, and its calibration cache
(`calibration_cache_path`) lets the sensitivity pass quantize many variants from one calibration run.

The sensitivity pass: the quantizable nodes are grouped by the module they come from (`NODE_GROUPS`, read from
the exporter's name scopes: each tower layer, the patch embedding, the mm projector, FRLP, FRGCA with its attention
and softmax inputs). When the all-INT8 graph misses the target cosine against FP32 on held-out crops, each group is
quantized alone and its damage measured on the calibration crops; then the most damaging groups are kept in FP32
one by one (`nodes_to_exclude`) until the held-out target is met. What stayed FP32, the cosine reached, the
method and the set sizes go into the manifest.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from facellava.bundle import Bundle, BundleWriter
from facellava.calibration.dataset import CalibrationSet, build_calibration_set
from facellava.errors import FaceLlavaError
from facellava.export import fidelity, parity

if TYPE_CHECKING:
    import onnx

METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OP_TYPES = ("MatMul", "Conv", "Gemm")
DEFAULT_TARGET_COSINE = 0.99
HELD_OUT_FRACTION = 0.25
# Which group a quantizable node belongs to, from the module path of its exporter name scope (the
# `pkg.torch.onnx.name_scopes` metadata of the dynamo exporter): the first pattern that matches names the group.
NODE_GROUPS: tuple[tuple[str, str], ...] = (
    (r"^tower\.encoder\.layers\.(\d+)$", "tower.layers.{0}"),
    (r"^tower\.embeddings$", "tower.embeddings"),
    (r"^mm_projector$", "mm_projector"),
    (r"^(global_)?landmarks_projector$", "frlp"),
    (r"^landmarks_cross_attn$", "frgca"),
)
OTHER_GROUP = "other"
# Above this many bytes of FP32 weights the quantizer writes external data; the INT8 graph is saved inline when
# its weights fit under the same threshold the export uses (1 GiB), else beside it in `<name>.data`.
EXTERNAL_DATA_BYTES = 3 << 29
INLINE_WEIGHT_BYTES = 1 << 30


def int8_file_name(fp32_name: str) -> str:
    """`vision_image.onnx` -> `vision_image.int8.onnx`."""
    return fp32_name.removesuffix(".onnx") + ".int8.onnx"


def node_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """{group: names of its MatMul/Conv/Gemm nodes} in graph order, the groups in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OP_TYPES:
            groups.setdefault(_group_of(node), []).append(node.name)
    return groups


def _group_of(node: onnx.NodeProto) -> str:
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if scopes is None:
        return OTHER_GROUP
    try:
        paths = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return OTHER_GROUP
    for path in paths:  # outermost first: the layer, before its attention or MLP
        for pattern, group in NODE_GROUPS:
            match = re.match(pattern, path)
            if match:
                return group.format(*match.groups())
    return OTHER_GROUP


def held_out_figures(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> dict[str, float]:
    """The worst of `fidelity.compare`'s figures over the samples (each sample compared on its own), and the mean
    cosine."""
    each = [fidelity.compare(a, b) for a, b in zip(outputs, references, strict=True)]
    return {**fidelity.worst(each), "mean_cosine": float(np.mean([f["cosine"] for f in each]))}


# --- one graph ----------------------------------------------------------------------------------------------


@dataclass
class Int8Graph:
    """What `quantize_graph` made: the figures on the held-out crops, the groups and nodes kept in FP32, the damage
    table of the sensitivity pass (each group's cosine when quantized alone; empty when it was not needed)."""

    figures: dict[str, float]
    fp32_groups: list[str]
    fp32_nodes: list[str]
    quantized_nodes: int
    sensitivity: dict[str, float]


class _Quantizer:
    """quantize_static around one FP32 graph: one calibration (cached in `work`), then any exclusion set."""

    def __init__(self, fp32_path: Path, work: Path, method: str, reader: Any):
        from onnxruntime.quantization import CalibrationMethod

        self.fp32_path, self.work = fp32_path, work
        self.method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}[method]
        self.cache = work / "calibration_ranges.json"
        self.reader = reader
        self.count = 0

    def quantize(self, target: Path, nodes_to_quantize: Sequence[str] | None = None,
                 nodes_to_exclude: Sequence[str] = ()) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        # protobuf's 2 GiB cap: only a graph near it needs its output weights in an external file
        data = Path(f"{self.fp32_path}.data")
        external = self.fp32_path.stat().st_size + (data.stat().st_size if data.exists() else 0) > EXTERNAL_DATA_BYTES
        with _quiet_quantizer():
            quantize_static(
                str(self.fp32_path), str(target), self.reader if not self.cache.exists() else None,
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=list(nodes_to_quantize or []), nodes_to_exclude=list(nodes_to_exclude),
                calibrate_method=self.method, calibration_cache_path=str(self.cache),
                use_external_data_format=external,
                # biases stay float: TensorRT has no INT32 DequantizeLinear for a Gemm's quantized bias
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "CalibTensorRangeSymmetric": True, "QuantizeBias": False})
        self.count += 1


@contextlib.contextmanager
def _quiet_quantizer():
    """quantize_static logs a pre-processing hint on every call; keep the console to our progress bar."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _save_as(source: Path, target: Path) -> None:
    """Re-save a graph under its final name: inline, or with its weights in `<name>.data` when they are large
    (external data files are named inside the graph, so they cannot simply be renamed)."""
    if not Path(f"{source}.data").exists():
        shutil.move(str(source), str(target))
        return
    import onnx

    model = onnx.load(str(source))
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    if weights <= INLINE_WEIGHT_BYTES:
        onnx.save_model(model, str(target))
    else:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{target.name}.data", size_threshold=1024)


def _run(path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [session.run([parity.OUTPUT_NAME], feed)[0] for feed in feeds]


def quantize_graph(fp32_path: str | Path, out_path: str | Path, data: CalibrationSet, modality: str,
                   with_landmarks: bool, *, method: str = "minmax", target_cosine: float = DEFAULT_TARGET_COSINE,
                   keep_fp32: Sequence[str] = (), held_out: float = HELD_OUT_FRACTION, seed: int = 0,
                   progress: bool = True) -> Int8Graph:
    """Quantize one FP32 vision graph to Q/DQ INT8 at `out_path`, keeping groups in FP32 until the target is met.

    `data` supplies the crops of `modality`, split into calibration and held-out rows (`held_out` fraction, `seed`);
    `keep_fp32` names groups (see `node_groups`) that stay FP32 whatever their damage. Returns the result; the
    graph is written even when the target is missed with every group but one in FP32, so the caller judges it
    (`fidelity.judge` against `cosine_min`). Raises FaceLlavaError for an unknown method or group, or too few samples.
    """
    if method not in METHODS:
        raise FaceLlavaError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    import onnx

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    groups = node_groups(onnx.load(str(fp32_path), load_external_data=False))
    unknown = [g for g in keep_fp32 if g not in groups]
    if unknown:
        raise FaceLlavaError(f"unknown node group(s) {', '.join(unknown)} in --keep-fp32; this graph has "
                             f"{', '.join(groups)}")
    calib_rows, held_rows = data.split(modality, held_out, seed)
    calib_feeds = data.feeds(modality, with_landmarks, calib_rows)
    held_feeds = data.feeds(modality, with_landmarks, held_rows)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out_path.parent) as work_dir:
        work = Path(work_dir)
        quantizer = _Quantizer(fp32_path, work, method, data.reader(modality, with_landmarks, calib_rows))
        bar = tqdm(desc=f"int8 {fp32_path.name}", unit="graph", disable=not progress)
        held_reference, calib_reference = _run(fp32_path, held_feeds), None
        trial = work / "trial.onnx"

        def excluded_nodes(excluded: Sequence[str]) -> list[str]:
            return [n for g in excluded for n in groups[g]]

        def attempt(excluded: list[str]) -> dict[str, float]:
            bar.set_postfix_str(f"{len(excluded)} group(s) in FP32")
            quantizer.quantize(trial, nodes_to_exclude=excluded_nodes(excluded))
            bar.update()
            return held_out_figures(_run(trial, held_feeds), held_reference)

        excluded = list(keep_fp32)
        figures, sensitivity = attempt(excluded), {}
        final_in_trial = True
        if figures["cosine"] < target_cosine:
            calib_reference = _run(fp32_path, calib_feeds)
            for group in (g for g in groups if g not in excluded):
                bar.set_postfix_str(f"sensitivity: {group}")
                quantizer.quantize(trial, nodes_to_quantize=groups[group])
                final_in_trial = False
                bar.update()
                sensitivity[group] = held_out_figures(_run(trial, calib_feeds), calib_reference)["mean_cosine"]
            # most damaging first; the last group is never excluded, or the graph would hold no INT8 at all
            for group in sorted(sensitivity, key=sensitivity.get)[:-1]:
                excluded.append(group)
                figures, final_in_trial = attempt(excluded), True
                if figures["cosine"] >= target_cosine:
                    break
        if not final_in_trial:  # the trial file holds the last single-group graph of the sensitivity pass
            quantizer.quantize(trial, nodes_to_exclude=excluded_nodes(excluded))
        bar.close()
        _save_as(trial, out_path)
    fp32_nodes = excluded_nodes(excluded)
    quantized = sum(len(v) for v in groups.values()) - len(fp32_nodes)
    return Int8Graph(figures=figures, fp32_groups=excluded, fp32_nodes=fp32_nodes, quantized_nodes=quantized,
                     sensitivity=sensitivity)


# --- the bundle ---------------------------------------------------------------------------------------------


def calibrate_vision(bundle: str | Path, data: str | Path | CalibrationSet, *, method: str = "minmax",
                     target_cosine: float = DEFAULT_TARGET_COSINE, modalities: str | Sequence[str] | None = None,
                     limit: int | None = None, seed: int = 0, keep_fp32: Sequence[str] = (),
                     held_out: float = HELD_OUT_FRACTION, allow_drift: bool = False,
                     cache: str | Path | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Write INT8 Q/DQ graphs of a bundle's FP32 vision graphs, calibrated on `data`, into the bundle's manifest.

    `data`: a folder of face photos/videos, a Face-LLaVA data JSON, or a CalibrationSet; `method`: minmax, entropy
    or percentile; `target_cosine`: the worst held-out crop's cosine against FP32 that each graph must reach;
    `modalities`: None for every modality with an FP32 graph and at least 2 samples; `limit`, `seed`, `cache`: see
    `build_calibration_set`; `keep_fp32`: groups always kept FP32; `allow_drift`: keep graphs that miss the target.
    Returns {file name: manifest entry}. Raises FaceLlavaError for a bundle without FP32 vision graphs, a modality
    without graphs or samples, unusable data, or a missed target (then the bundle is left as it was).
    """
    if not 0.0 < target_cosine <= 1.0:
        raise FaceLlavaError(f"--target-cosine must be in (0, 1], got {target_cosine}")
    if method not in METHODS:
        raise FaceLlavaError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    opened = Bundle.open(bundle)
    graphs = {name: entry for name, entry in opened.files.items()
              if entry.get("kind") == "vision" and entry.get("precision") == "fp32"}
    if not graphs:
        raise FaceLlavaError(f"{opened.path} has no FP32 vision graph to calibrate; run `facellava export vision "
                             "--precision fp32` into it first")
    have = sorted({e["modality"] for e in graphs.values()}, key=parity.MODALITIES.index)
    asked = parity.parse_choices(modalities, parity.MODALITIES, "modality") if modalities else tuple(have)
    missing = [m for m in asked if m not in have]
    if missing:
        raise FaceLlavaError(f"{opened.path} has no FP32 {' or '.join(missing)} vision graph; export it first or "
                             f"leave it out of --modalities")
    if not isinstance(data, CalibrationSet):
        data = build_calibration_set(data, modalities=asked, limit=limit, seed=seed, cache=cache, progress=progress)
    if modalities:
        empty = [m for m in asked if data.count(m) == 0]
        if empty:
            raise FaceLlavaError(f"the calibration data has no {' or '.join(empty)} sample "
                                 f"({data.skipped_summary()}); add some or leave it out of --modalities")
    # unasked, a modality with a single sample is left out (it cannot be split); asked, `split` refuses it
    todo = sorted(name for name, e in graphs.items() if e["modality"] in asked
                  and (data.count(e["modality"]) >= 2 or (modalities and data.count(e["modality"]) > 0)))
    if not todo:
        raise FaceLlavaError(f"the calibration data has fewer than 2 samples of each of the bundle's modalities "
                             f"({', '.join(have)}; {data.skipped_summary()}): add files")

    entries: dict[str, dict[str, Any]] = {}
    records: dict[str, dict[str, Any]] = {}
    with BundleWriter.transaction(opened.path, create=False) as writer:
        for fp32_name in todo:
            source, name = graphs[fp32_name], int8_file_name(fp32_name)
            start = time.perf_counter()
            result = quantize_graph(writer.bundle.path_of(fp32_name), writer.stage(name), data, source["modality"],
                                    source["landmarks"], method=method, target_cosine=target_cosine,
                                    keep_fp32=keep_fp32, held_out=held_out, seed=seed, progress=progress)
            calib_rows, held_rows = data.split(source["modality"], held_out, seed)
            calibration = {
                "method": method, "target_cosine": target_cosine, "calibration_samples": len(calib_rows),
                "held_out_samples": len(held_rows), "seed": seed, "fp32_groups": result.fp32_groups,
                "fp32_nodes": result.fp32_nodes, "quantized_nodes": result.quantized_nodes,
                "sensitivity": result.sensitivity, "seconds": round(time.perf_counter() - start, 1),
                "data": data.request.get("source"), "skipped_files": len(data.skipped)}
            records[name] = {
                "reference": f"{fp32_name} in onnxruntime (FP32)",
                "runtime": f"onnxruntime {_version('onnxruntime')} CPUExecutionProvider",
                **result.figures, "inputs": {"held_out": result.figures}, "calibration": calibration}
            fidelity.judge(records[name], {"cosine_min": target_cosine})
            if not records[name]["passed"] and not allow_drift:
                raise FaceLlavaError(parity.describe_miss(name, records[name]).replace(
                    "rerun with", "even with every node group but one in FP32; lower --target-cosine, try another "
                    "--method, or rerun with"))
            entries[name] = {
                "kind": "vision", "modality": source["modality"], "precision": "int8", "landmarks": source["landmarks"],
                "inputs": source.get("inputs"), "outputs": source.get("outputs"), "opset": source.get("opset"),
                "source": fp32_name, "source_sha256": source["sha256"], "external_data": [],
                "quantizer": f"onnxruntime.quantization.quantize_static {_version('onnxruntime')} (QDQ, symmetric "
                             "int8 activations, symmetric per-channel int8 weights, MatMul/Conv/Gemm)",
                "calibration": calibration}
            if writer.stage(f"{name}.data").exists():
                entries[name]["external_data"] = [f"{name}.data"]
        for name, entry in entries.items():  # replacing an earlier INT8 graph drops its engines at commit
            for data_name in entry["external_data"]:
                writer.add(data_name, "data", part_of=name)
            writer.add(name, parity=records[name], **entry)
    return {name: writer.manifest.files[name] for name in entries}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"

