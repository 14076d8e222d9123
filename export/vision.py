"""Checkpoint -> the vision graph in ONNX (FP32, then FP16), every file checked against PyTorch in ONNX Runtime.

One graph per modality and landmark variant, each a thin `VisionGraph` around the model's own modules, so the
exported computation is `FaceLlava.encode_image` / `encode_video` itself:

    vision_image.onnx        pixel_values [B,3,224,224],   landmarks [B,68,2]   -> visual_tokens [B,256,D]
    vision_video.onnx        pixel_values [B,3,8,224,224], landmarks [B,8,68,2] -> visual_tokens [B,8,257,D]
    vision_image_nolm.onnx   pixel_values only (no FRLP/FRGCA)                  -> visual_tokens [B,256,D]
    vision_video_nolm.onnx   pixel_values only                                  -> visual_tokens [B,8,257,D]

and `<name>.fp16.onnx` beside each. The steps: `torch.onnx.export` (the dynamo exporter) with a dynamic batch
axis, the ONNX checker and strict shape inference, then FP16 from the FP32 graph, then parity of each file in
ONNX Runtime against the PyTorch reference on random inputs and on the shipped face photograph. Everything is
written into a staging directory inside the bundle and only moved into place, with the manifest, once every
file has passed; an error or an interrupt leaves the bundle as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from facellava import contract
from facellava.bundle import BundleWriter
from facellava.errors import FaceLlavaError
from facellava.export import fidelity, parity
from facellava.model.modeling import FaceLlava, FaceLlavaConfig, TowerConfig

MODALITIES, PRECISIONS, OUTPUT_NAME = parity.MODALITIES, parity.PRECISIONS, parity.OUTPUT_NAME
# Opset 18 is what the exporter's torchlib emits natively (no version conversion pass), it has
# LayerNormalization (17+), and it is inside the ONNX parser range of TensorRT 10.3, the version JetPack 6 ships.
OPSET = 18
# Protobuf caps a serialized model at 2 GiB, and onnx/ORT tools that handle a model in memory (the checker, the
# FP16 converter) serialize copies of it; above 1 GiB of weights the weights go to one external data file beside
# the graph (`<name>.onnx.data`). Tests lower it to force that path on the tiny model.
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Ops the FP16 graph keeps in FP32: normalization statistics and softmax sums overflow or lose too much in FP16.
# With these two blocked the tiny model reaches cosine 0.9999998 (the residual adds can stay FP16).
FP16_KEEP_FP32_OPS = ("LayerNormalization", "Softmax")
FP16_SLICE_VALUES = 1 << 22  # FP32 weights converted to FP16 this many values at a time (16 MB)


# --- the graph ----------------------------------------------------------------------------------------------


class VisionGraph(nn.Module):
    """What one exported file computes: `model.encode_image` or `model.encode_video`, with or without landmarks.

    It registers only the modules the graph uses (the tower, the mm projector, and FRLP + FRGCA when landmarks
    are used), so the exporter sees exactly those weights and never the LLM; the forward is the model's own
    method, so the export cannot drift from the reference it is checked against.
    """

    def __init__(self, model: FaceLlava, modality: contract.Modality, with_landmarks: bool):
        super().__init__()
        tower = model.image_tower if modality == "image" else model.video_tower
        if tower is None:
            raise FaceLlavaError(f"{model.no_tower(modality)}, or leave {modality} out of --modalities")
        if with_landmarks and model.landmarks_cross_attn is None:
            raise FaceLlavaError("this checkpoint has no landmark modules (no landmarks_projector_type in its "
                                 "config.json); export with --without-landmarks")
        self.modality = modality
        self.with_landmarks = with_landmarks
        self.tower = tower
        self.mm_projector = model.mm_projector
        if with_landmarks:
            self.landmarks_projector = model.landmarks_projector
            self.global_landmarks_projector = model.global_landmarks_projector
            self.landmarks_cross_attn = model.landmarks_cross_attn
        # a plain attribute (not a submodule): the bound method of the model whose modules are registered above
        self._encode = model.encode_image if modality == "image" else model.encode_video
        self.hidden_size = model.config.hidden_size

    @property
    def input_names(self) -> list[str]:
        return ["pixel_values", "landmarks"] if self.with_landmarks else ["pixel_values"]

    def forward(self, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        return self._encode(pixel_values, landmarks)

    def io_shapes(self) -> tuple[dict[str, list], dict[str, list]]:
        """The contract's input and output shapes, batch as "batch" (DESIGN.md section 2)."""
        size, frames = contract.IMAGE_SIZE, contract.NUM_FRAMES
        if self.modality == "image":
            inputs = {"pixel_values": ["batch", 3, size, size], "landmarks": ["batch", contract.NUM_LANDMARKS, 2]}
            output = ["batch", contract.IMAGE_TOKENS, self.hidden_size]
        else:
            inputs = {"pixel_values": ["batch", 3, frames, size, size],
                      "landmarks": ["batch", frames, contract.NUM_LANDMARKS, 2]}
            output = ["batch", frames, contract.VIDEO_FRAME_TOKENS, self.hidden_size]
        return {name: inputs[name] for name in self.input_names}, {OUTPUT_NAME: output}


def vision_file_name(modality: str, with_landmarks: bool, precision: str) -> str:
    """The bundle file of one variant: `vision_<modality>[_nolm][.fp16].onnx`."""
    base = f"vision_{modality}" + ("" if with_landmarks else "_nolm")
    return f"{base}.onnx" if precision == "fp32" else f"{base}.{precision}.onnx"


def load_vision_model(checkpoint_dir: str | Path, image_tower: str | Path | None = None,
                      video_tower: str | Path | None = None, towers: Sequence[str] = MODALITIES) -> FaceLlava:
    """The vision half of a checkpoint: the towers named in `towers`, mm projector, FRLP, FRGCA; the LLM is never
    read (it stays on the meta device), so a 7B checkpoint exports its vision graph in a few GB. Raises
    FaceLlavaError like the loader."""
    from facellava.model.loading import load_face_llava

    return load_face_llava(checkpoint_dir, image_tower=image_tower, video_tower=video_tower, llm=False,
                           towers=towers)


def vision_only_model(config: FaceLlavaConfig, image_tower: TowerConfig | None, video_tower: TowerConfig | None,
                      seed: int = 0) -> FaceLlava:
    """A FaceLlava with random vision weights and no LLM weights (it stays on the meta device), built from configs:
    full-size graphs for benchmarks without a 7B allocation. Weights use the tiny checkpoints' scaled init, so
    activations keep a realistic spread through the 23 layers."""
    from facellava.model.tiny import _randomize  # the one place that knows how to scale random weights

    with torch.device("meta"):
        model = FaceLlava(config, image_tower, video_tower)
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_children():
        if name != "llm" and module is not None:
            module.to_empty(device="cpu")
            _randomize(module, generator)
    return model.eval()


# --- one file -----------------------------------------------------------------------------------------------


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * int(np.prod(t.dims))
               for t in model.graph.initializer)


def _save(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save a model, its weights in `<name>.data` beside it when they pass EXTERNAL_DATA_THRESHOLD. Returns the
    external data file names."""
    if _initializer_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return []
    data_name = f"{path.name}.data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return [data_name]


def _external_data_files(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    names = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return sorted(names)


def _check_onnx(path: Path, graph: VisionGraph) -> None:
    """The ONNX checker (full: with strict shape inference), inferred shapes written into the file, and the
    declared inputs and outputs compared with the contract. Bugs, not user errors, if they fail."""
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True, data_prop=True)
    model = onnx.load(str(path), load_external_data=False)
    expected_inputs, expected_outputs = graph.io_shapes()

    def dims(value: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    found_inputs = {v.name: dims(v) for v in model.graph.input}
    found_outputs = {v.name: dims(v) for v in model.graph.output}
    if found_inputs != expected_inputs or found_outputs != expected_outputs:
        raise RuntimeError(f"{path.name}: graph inputs {found_inputs} / outputs {found_outputs} differ from the "
                           f"contract {expected_inputs} / {expected_outputs}")


def export_onnx(graph: VisionGraph, path: Path, example: dict[str, np.ndarray]) -> dict[str, Any]:
    """Export one VisionGraph to `path` (FP32) with a dynamic batch axis, check it, and return what was done.

    The dynamo exporter (`torch.export`) is used rather than the TorchScript one: on this model it gives a graph
    whose only dynamic dimension is the batch, with static token counts and no Shape/Gather chains (TorchScript
    leaves 180+ Constant and 25 Shape nodes and an unnamed token dimension), and its built-in onnxscript optimizer
    does the constant folding and dead-code removal (462 -> 159 nodes on the tiny image graph; onnxsim and
    onnxslim after it remove only 4-7 more, so neither is used).
    """
    args = tuple(torch.from_numpy(example[name]) for name in graph.input_names)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            graph, args, None, input_names=graph.input_names, output_names=[OUTPUT_NAME],
            dynamic_shapes={name: {0: batch} for name in graph.input_names}, opset_version=OPSET, dynamo=True,
            optimize=True, verbose=False)
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    program.save(str(path), external_data=weights > EXTERNAL_DATA_THRESHOLD)
    del program
    _check_onnx(path, graph)
    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    return {"external_data": _external_data_files(path), "nodes": nodes}


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system. glibc keeps freed blocks below its mmap
    threshold (which grows to 32 MB as large blocks are freed) in the heap: measured at ViT-L size, 2.2 GB of
    an ONNX Runtime session's weights stayed resident after the session was gone, under the next step's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # glibc only; elsewhere nothing to do


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its steps, warns about its own deprecations, and the optimizer logs every skipped
    fold; keep the console to our progress bar."""
    import io
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def convert_fp16(source: Path, target: Path) -> dict[str, Any]:
    """Make the FP16 graph from the (shape-inferred) FP32 graph; inputs and outputs stay float32.

    Converter: ONNX Runtime's `onnxruntime.transformers.float16`. Measured on the tiny image graph against
    onnxconverter-common's `float16` (the code it descends from): the same cosine (0.9999998) and time, but 33
    instead of 43 Cast nodes with LayerNormalization and Softmax blocked, and the blocked ops keep their weights in
    FP32 (onnxconverter-common rounds LayerNorm's scale and bias to FP16 and casts them back); it ships with
    onnxruntime, which the export needs anyway. Its one flaw, input casts appended after their consumers, is
    repaired by a topological sort (TensorRT's parser and the ONNX checker need sorted nodes). ModelOpt AutoCast
    does not install cleanly here (its [onnx] extra needs cppimport, which has no wheel).

    A graph whose weights are external data is converted without loading them: the converter sees a one-value
    stand-in for each (it decides from types and consumers only), then each weight is read from the FP32 data
    file, converted where the converter made it FP16, and written to the FP16 graph's data file, one at a time
    (at ViT-L size the whole graph in memory, plus its converted copy, cost ~3 GB).
    """
    from onnxruntime.transformers import float16

    model = onnx.load(str(source), load_external_data=False)
    external = _external_stand_ins(model)
    block = sorted({*float16.DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32_OPS})
    # shapes were inferred into the FP32 file already; in-memory inference would fail past 2 GB
    model = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                             disable_shape_infer=True)
    _sort_topologically(model.graph)
    # the converter marks every value_info FP16, also those of the weights it kept in FP32: infer them afresh
    model.graph.ClearField("value_info")
    if external:
        data_name = f"{target.name}.data"
        _write_external_data(model, external, source.parent, target.parent / data_name)
        onnx.save_model(model, str(target))  # the graph alone: every weight is in the data file already
        names = [data_name]
    else:
        names = _save(model, target)
    del model
    onnx.checker.check_model(str(target), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(target), str(target), check_type=True, strict_mode=True,
                                           data_prop=True)
    return {"external_data": names, "keep_fp32_ops": list(FP16_KEEP_FP32_OPS),
            "fp16_converter": f"onnxruntime.transformers.float16 {_version('onnxruntime')}"}


@dataclass
class _ExternalTensor:
    """Where an external initializer's bytes lie, and its shape (the graph holds a one-value stand-in)."""

    dims: list[int]
    location: str
    offset: int
    length: int


def _external_stand_ins(model: onnx.ModelProto) -> dict[str, _ExternalTensor]:
    """Replace every external-data initializer of a graph loaded without its data by a one-value stand-in of
    the same type (raw bytes of one element); returns where each one's data lies."""
    found = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        length = int(info.get("length", itemsize * int(np.prod(tensor.dims))))
        found[tensor.name] = _ExternalTensor(list(tensor.dims), info["location"], int(info.get("offset", 0)), length)
        tensor.ClearField("external_data")
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.dims[:]
        tensor.dims.append(1)
        tensor.raw_data = bytes(itemsize)
    return found


def _write_external_data(model: onnx.ModelProto, external: dict[str, _ExternalTensor], source_dir: Path,
                         data_path: Path) -> None:
    """Fill in the stand-ins of `_external_stand_ins` after the FP16 conversion: each weight read from its FP32
    data file, converted to FP16 where the converter made its stand-in FP16 (with the converter's own clamping),
    appended to `data_path` (page-aligned, so ONNX Runtime can map it) and referenced from the graph."""
    from onnxruntime.transformers import float16

    with data_path.open("wb") as out:
        for tensor in model.graph.initializer:
            where = external.get(tensor.name)
            if where is None:
                continue
            source_type = onnx.TensorProto.FLOAT if tensor.data_type == onnx.TensorProto.FLOAT16 else tensor.data_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(source_type)
            out.seek(-out.tell() % 4096, os.SEEK_CUR)
            offset = out.tell()
            count = where.length // dtype.itemsize
            # in slices: the converter's clamping makes several temporary copies of what it is given
            for start in range(0, count, FP16_SLICE_VALUES):
                values = np.fromfile(source_dir / where.location, dtype=dtype,
                                     count=min(FP16_SLICE_VALUES, count - start),
                                     offset=where.offset + start * dtype.itemsize)
                if tensor.data_type != source_type:
                    values = float16.convert_np_to_float16(values)
                out.write(values.data)
            tensor.ClearField("raw_data")
            del tensor.dims[:]
            tensor.dims.extend(where.dims)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)),
                               ("length", str(out.tell() - offset))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            del external[tensor.name]
    if external:
        raise RuntimeError(f"the FP16 converter dropped the initializers {sorted(external)}")


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` so that every node comes after the producers of its inputs (stable otherwise)."""
    available = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise RuntimeError(f"the graph has a cycle or a dangling input at node {waiting[0].name}")
        pending = waiting
    graph.ClearField("node")
    graph.node.extend(ordered)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


# --- the bundle ---------------------------------------------------------------------------------------------


@dataclass
class VisionExport:
    """What `export_vision` wrote: the manifest entries of the new files, their parity records, and how long each
    step took (seconds, by file and step: export, fp16, parity)."""

    files: dict[str, dict[str, Any]]
    parity: dict[str, dict[str, Any]]
    seconds: dict[str, dict[str, float]]


def export_vision(checkpoint_dir: str | Path, bundle: str | Path, *, image_tower: str | Path | None = None,
                  video_tower: str | Path | None = None, modalities: str | Sequence[str] = MODALITIES,
                  precisions: str | Sequence[str] = PRECISIONS, landmarks: bool | None = None,
                  allow_drift: bool = False, face_photo: str | Path | None = None, seed: int | None = None,
                  front_end: bool = True, progress: bool = True) -> VisionExport:
    """Export the vision graphs of a checkpoint into a bundle and record them in its manifest.

    Takes the checkpoint directory (official layout), optional LanguageBind tower directories, the bundle
    directory (created or updated), the modalities and precisions ("image,video", "fp32,fp16"), and which
    landmark variants: None for both when the checkpoint has FRLP/FRGCA (else only the no-landmark one), False for
    only the no-landmark graphs, True for only the landmark graphs. `allow_drift` keeps files that miss their
    parity threshold; `face_photo` replaces the shipped photograph; `seed` fixes the random parity inputs (fresh
    otherwise, and recorded); `front_end` adds the face front end's graphs (`export front-end`) in the same
    transaction when the bundle lacks them, so that a device needs no MediaPipe. Returns what was written (the
    vision graphs). Raises FaceLlavaError for a bundle path that is a file, an unknown modality or precision, a
    checkpoint without the needed tower or landmark modules, or a parity miss; then the bundle is left as it was.

    Memory: one modality at a time, its model holds only that modality's tower and is released before the
    FP16 conversion and the ONNX Runtime parity of its graphs (`export_vision_model` with a loader).
    """
    modalities = parity.parse_choices(modalities, MODALITIES, "modality")
    precisions = parity.parse_choices(precisions, PRECISIONS, "precision")
    if Path(bundle).exists() and not Path(bundle).is_dir():
        raise FaceLlavaError(f"bundle path {bundle} is a file; give a directory")

    def load(towers: Sequence[str]) -> FaceLlava:
        return load_vision_model(checkpoint_dir, image_tower=image_tower, video_tower=video_tower, towers=towers)

    model = load(modalities)  # every tower found and its weights checked (not yet read) before any work
    variants = _variants(model, modalities, landmarks)  # raises before the bundle is touched
    vision = {"hidden_size": model.config.hidden_size, "cross_attn_type": model.config.cross_attn_type,
              "branch_scale": model.config.branch_scale}
    del model
    release_memory()
    with BundleWriter.transaction(bundle) as writer:
        writer.set_source(checkpoint_dir, vision=vision)
        result = export_vision_model(lambda modality: load((modality,)), writer, variants=variants,
                                     precisions=precisions, allow_drift=allow_drift, face_photo=face_photo,
                                     seed=seed, progress=progress)
        if front_end:
            from facellava.export.front_end import add_front_end_if_missing

            add_front_end_if_missing(writer, progress=progress)
        return result


def _variants(model: FaceLlava, modalities: Sequence[str], landmarks: bool | None) -> list[tuple[str, bool]]:
    if landmarks is None:
        options = [True, False] if model.landmarks_cross_attn is not None else [False]
    else:
        options = [landmarks]
    variants = [(modality, with_landmarks) for modality in modalities for with_landmarks in options]
    for modality, with_landmarks in variants:
        VisionGraph(model, modality, with_landmarks)  # checks the tower and landmark modules exist
    return variants


def export_vision_model(model: FaceLlava | Callable[[str], FaceLlava], writer: BundleWriter, *,
                        variants: Sequence[tuple[str, bool]], precisions: Sequence[str] = PRECISIONS,
                        allow_drift: bool = False, face_photo: str | Path | None = None, seed: int | None = None,
                        progress: bool = True) -> VisionExport:
    """Export `variants` [(modality, with_landmarks)] at `precisions` into the writer's bundle; see
    `export_vision`. `model` is a loaded model, or a function that loads one for a modality: each modality's
    model is then loaded for its PyTorch references and FP32 exports only, and released before its graphs'
    FP16 conversion and ONNX Runtime parity (one session at a time), so torch weights, exporter and ONNX Runtime
    never hold memory together. The manifest's vision entries (and engines built from graphs this export
    replaces) are replaced as a whole: files of an earlier export that this one does not produce are deleted."""
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    steps = len(variants) * (2 + len(precisions) + ("fp16" in precisions))
    staging = writer.staging
    entries: dict[str, dict[str, Any]] = {}
    records: dict[str, dict[str, Any]] = {}
    seconds: dict[str, dict[str, float]] = {}
    with tqdm(total=steps, desc="export vision", unit="step", disable=not progress) as bar:
        for modality in dict.fromkeys(m for m, _ in variants):
            exported = []  # (variant, its parity inputs, PyTorch's outputs, io shapes, export details)
            loaded = model(modality) if callable(model) and not isinstance(model, nn.Module) else model
            for with_landmarks in [w for m, w in variants if m == modality]:
                graph = VisionGraph(loaded, modality, with_landmarks).eval()
                inputs = parity.parity_inputs(modality, with_landmarks, seed, face_photo)
                bar.set_postfix_str(f"{modality}{'' if with_landmarks else ' no landmarks'}: PyTorch reference")
                with torch.no_grad():
                    references = {name: graph(*(torch.from_numpy(feed[n]) for n in graph.input_names)).numpy()
                                  for name, feed in inputs.items()}
                bar.update()
                fp32_name = vision_file_name(modality, with_landmarks, "fp32")
                bar.set_postfix_str(f"{fp32_name}: export")
                start = time.perf_counter()
                details = export_onnx(graph, staging / fp32_name, inputs["random"])
                seconds[fp32_name] = {"export": time.perf_counter() - start}
                bar.update()
                exported.append((with_landmarks, inputs, references, graph.io_shapes(), details))
                del graph
            del loaded
            release_memory()  # the exporter leaves reference cycles that hold graph-sized buffers
            for with_landmarks, inputs, references, (input_shapes, output_shapes), details in exported:
                fp32_name = vision_file_name(modality, with_landmarks, "fp32")
                for precision in precisions:
                    name = vision_file_name(modality, with_landmarks, precision)
                    seconds.setdefault(name, {})
                    if precision == "fp16":
                        bar.set_postfix_str(f"{name}: convert")
                        start = time.perf_counter()
                        details16 = convert_fp16(staging / fp32_name, staging / name)
                        seconds[name]["fp16"] = time.perf_counter() - start
                        bar.update()
                        entry_details = {**details16, "source": fp32_name}
                    else:
                        entry_details = {"external_data": details["external_data"], "nodes": details["nodes"]}
                    bar.set_postfix_str(f"{name}: parity")
                    start = time.perf_counter()
                    outputs = parity.run_onnx(staging / name, inputs)
                    per_input = {key: fidelity.compare(outputs[key], references[key]) for key in inputs}
                    del outputs
                    release_memory()  # the session's weights, before the next step
                    seconds[name]["parity"] = time.perf_counter() - start
                    bar.update()
                    records[name] = {
                        "reference": f"FaceLlava.encode_{modality}",
                        "runtime": f"onnxruntime {_version('onnxruntime')} CPUExecutionProvider",
                        "seed": seed, "random_batch": parity.RANDOM_BATCH,
                        **parity.parity_record(per_input, parity.LIMITS[precision])}
                    entries[name] = {
                        "kind": "vision", "modality": modality, "precision": precision, "landmarks": with_landmarks,
                        "inputs": {n: {"dtype": "float32", "shape": s} for n, s in input_shapes.items()},
                        "outputs": {n: {"dtype": "float32", "shape": s} for n, s in output_shapes.items()},
                        "opset": OPSET, "exporter": f"torch.onnx dynamo {_version('torch')}, onnxscript optimizer "
                                                    f"{_version('onnxscript')}", **entry_details}
                if "fp32" not in precisions:  # the FP16 graph's source, not asked for
                    for leftover in [fp32_name, *details["external_data"]]:
                        (staging / leftover).unlink()
    misses = [parity.describe_miss(name, record) for name, record in records.items() if not record["passed"]]
    if misses and not allow_drift:
        raise FaceLlavaError(misses[0] + (f" (and {len(misses) - 1} more)" if len(misses) > 1 else ""))
    _publish(writer, entries, records)
    return VisionExport(files={n: writer.manifest.files[n] for n in entries}, parity=records, seconds=seconds)


def _publish(writer: BundleWriter, entries: dict[str, dict[str, Any]], records: dict[str, dict[str, Any]]) -> None:
    """Replace the bundle's vision graphs by the staged ones as a whole: every earlier vision entry goes (graphs of
    an earlier export that this one does not produce too); engines and INT8 graphs of a graph whose bytes change
    go with it at commit."""
    for name in writer.manifest.find("vision"):
        writer.remove(name)
    for name, entry in entries.items():
        for data_name in entry["external_data"]:
            writer.add(data_name, "data", part_of=name)
        writer.add(name, **entry, parity=records[name])
