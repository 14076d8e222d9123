"""MediaPipe's TFLite face models -> ONNX: a small converter for exactly the ops those models use.

The `.tflite` flatbuffer is read with the `tflite` package (a pure-Python parser); weights stored as FP16
(`DEQUANTIZE`) or sparse (`DENSIFY`) are folded to dense FP32 initializers at conversion. Inside the graph 4-D
activations run in NCHW (what ONNX's Conv, MaxPool, Resize and GridSample expect); every other tensor keeps the
TFLite layout, and a Transpose is inserted only where a tensor crosses between the two. The graph's input and
outputs keep the TFLite model's names, NHWC layout and shapes, so a runtime sees the tensors MediaPipe sees.

The attention face mesh's three MediaPipe custom ops are written in standard ONNX ops after their C++ kernels
(mediapipe/util/tflite/operations, version 2 of each): `Landmarks2TransformMatrix` (a rotated box around a
subset of mesh points, as a 4x4 affine), `TransformTensorBilinear` (bilinear resampling of a feature map through
that affine: GridSample with align_corners, zero outside the map) and `TransformLandmarks` (points through it).

    model = convert_tflite(Path("face_detection_short_range.tflite"))   # an onnx.ModelProto
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tflite
from flatbuffers import flexbuffers
from onnx import TensorProto, helper, numpy_helper

from facellava.errors import FaceLlavaError

OPSET = 18  # GridSample (16+), and the opset of the vision graphs (inside TensorRT 10.3's parser range)
NHWC_TO_NCHW = (0, 3, 1, 2)
NCHW_TO_NHWC = (0, 2, 3, 1)

_BUILTIN_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
_NUMPY_TYPES = {tflite.TensorType.FLOAT32: np.float32, tflite.TensorType.FLOAT16: np.float16,
                tflite.TensorType.INT32: np.int32, tflite.TensorType.INT64: np.int64,
                tflite.TensorType.UINT8: np.uint8, tflite.TensorType.INT8: np.int8}
_INDEX_VECTORS = {1: tflite.Int32Vector, 2: tflite.Uint16Vector, 3: tflite.Uint8Vector}  # SparseIndexVector union
_SAME, _VALID = tflite.Padding.SAME, tflite.Padding.VALID


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: Any


def read_tflite(path: Path) -> tflite.Model:
    """The parsed flatbuffer of a `.tflite` file. Raises FaceLlavaError when it is missing or not TFLite."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FaceLlavaError(f"TFLite model {path} does not exist") from None
    except OSError as error:
        raise FaceLlavaError(f"TFLite model {path} cannot be read ({error.strerror})") from None
    if len(data) < 8 or data[4:8] != b"TFL3":  # the flatbuffer file identifier of the TFLite schema
        raise FaceLlavaError(f"{path} is not a TFLite model (no TFL3 flatbuffer identifier)")
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        if model.SubgraphsLength() != 1:
            raise FaceLlavaError(f"{path} has {model.SubgraphsLength()} subgraphs; only one-subgraph models convert")
        model.Subgraphs(0).OperatorsLength()
    except FaceLlavaError:
        raise
    except Exception as error:  # a truncated or corrupt flatbuffer fails anywhere inside the generated reader
        raise FaceLlavaError(f"{path} is not a readable TFLite model ({type(error).__name__})") from None
    return model


def _options(op: tflite.Operator, cls: type) -> Any:
    table = op.BuiltinOptions()
    options = cls()
    options.Init(table.Bytes, table.Pos)
    return options


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's SAME padding of one spatial axis: (before, after), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _index_vector(table: Any, kind: int) -> np.ndarray:
    vector = _INDEX_VECTORS[kind]()
    vector.Init(table.Bytes, table.Pos)
    return vector.ValuesAsNumpy().astype(np.int64)


def densify(values: np.ndarray, shape: tuple[int, ...], sparsity: tflite.SparsityParameters) -> np.ndarray:
    """The dense array of a TFLite sparse tensor: `values` stored in traversal order, each dimension dense (every
    index) or CSR (segments and indices), block dimensions after the tensor's own (TFLite's sparsity format)."""
    order = [int(v) for v in sparsity.TraversalOrderAsNumpy()]
    block_map = [] if sparsity.BlockMapIsNone() else [int(v) for v in sparsity.BlockMapAsNumpy()]
    positions = np.zeros(1, np.int64)
    coords = np.zeros((1, len(order)), np.int64)
    for level in range(len(order)):
        meta = sparsity.DimMetadata(level)
        if meta.Format() == tflite.DimensionType.DENSE:
            size = meta.DenseSize()
            counts = np.full(len(positions), size)
            children = (positions[:, None] * size + np.arange(size)).ravel()
            local = np.tile(np.arange(size), len(positions))
        else:
            segments = _index_vector(meta.ArraySegments(), meta.ArraySegmentsType())
            indices = _index_vector(meta.ArrayIndices(), meta.ArrayIndicesType())
            counts = segments[positions + 1] - segments[positions]
            firsts = np.repeat(segments[positions], counts)
            children = firsts + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            local = indices[children]
        coords = np.repeat(coords, counts, axis=0)
        coords[:, level] = local
        positions = children
    dense = np.zeros(shape, values.dtype)
    index = []
    for dim in range(len(shape)):
        coordinate = coords[:, order.index(dim)]
        if dim in block_map:
            block_level = order.index(len(shape) + block_map.index(dim))
            block_size = sparsity.DimMetadata(block_level).DenseSize()
            coordinate = coordinate * block_size + coords[:, block_level]
        index.append(coordinate)
    dense[tuple(index)] = values.reshape(-1)[positions]
    return dense


class _Converter:
    """One TFLite subgraph -> one ONNX graph. Constants (weights, shapes) are folded in NumPy; each activation is
    an ONNX value in NHWC (the TFLite layout) and/or NCHW, made on demand."""

    def __init__(self, model: tflite.Model, where: str):
        self.model, self.where = model, where
        self.graph = model.Subgraphs(0)
        self.tensors = [self._tensor(i) for i in range(self.graph.TensorsLength())]
        self.constants: dict[int, np.ndarray] = {}
        self.nhwc: dict[int, str] = {}  # tensor index -> ONNX value in the TFLite layout (any rank)
        self.nchw: dict[int, str] = {}  # tensor index -> ONNX value in NCHW (4-D activations only)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names = 0

    def _tensor(self, index: int) -> _Tensor:
        t = self.graph.Tensors(index)
        return _Tensor(t.Name().decode(), tuple(int(v) for v in t.ShapeAsNumpy()) if t.ShapeLength() else (),
                       _NUMPY_TYPES.get(t.Type()))

    def _buffer(self, index: int) -> np.ndarray | None:
        t = self.graph.Tensors(index)
        buffer = self.model.Buffers(t.Buffer())
        if buffer is None or buffer.DataLength() == 0:
            return None
        dtype = _NUMPY_TYPES.get(t.Type())
        if dtype is None:
            raise FaceLlavaError(f"{self.where}: tensor {self.tensors[index].name} has TFLite type {t.Type()}, "
                                 "which this converter does not read")
        data = np.frombuffer(buffer.DataAsNumpy().tobytes(), dtype)
        if t.Sparsity() is not None:
            return densify(data, self.tensors[index].shape, t.Sparsity())
        return data.reshape(self.tensors[index].shape)

    # --- ONNX building blocks

    def fresh(self, hint: str) -> str:
        self._names += 1
        return f"{hint}_{self._names}"

    def const(self, array: Any, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values: Any, hint: str = "i") -> str:
        return self.const(np.asarray(values, np.int64), hint)

    def floats(self, values: Any, hint: str = "f") -> str:
        return self.const(np.asarray(values, np.float32), hint)

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs: Any) -> str:
        output = self.fresh(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def value(self, index: int) -> np.ndarray | None:
        """The constant behind tensor `index` (a stored buffer, or one folded here), or None."""
        if index not in self.constants:
            data = self._buffer(index)
            if data is None:
                return None
            self.constants[index] = data
        return self.constants[index]

    def weight(self, index: int) -> np.ndarray:
        data = self.value(index)
        if data is None:
            raise FaceLlavaError(f"{self.where}: {self.tensors[index].name} is computed, not a constant weight")
        return data.astype(np.float32)

    def as_nhwc(self, index: int) -> str:
        if index not in self.nhwc:
            if index in self.nchw:
                self.nhwc[index] = self.node("Transpose", [self.nchw[index]], "nhwc", perm=list(NCHW_TO_NHWC))
            else:
                self.nhwc[index] = self.const(self.weight(index), "w")
        return self.nhwc[index]

    def as_nchw(self, index: int) -> str:
        if index not in self.nchw:
            if len(self.tensors[index].shape) != 4:
                raise FaceLlavaError(f"{self.where}: {self.tensors[index].name} is not 4-D")
            if index in self.nhwc:
                self.nchw[index] = self.node("Transpose", [self.nhwc[index]], "nchw", perm=list(NHWC_TO_NCHW))
            else:
                self.nchw[index] = self.const(self.weight(index).transpose(NHWC_TO_NCHW), "w")
        return self.nchw[index]

    def activation(self, name: str, function: int) -> str:
        if function == tflite.ActivationFunctionType.NONE:
            return name
        if function == tflite.ActivationFunctionType.RELU:
            return self.node("Relu", [name])
        if function == tflite.ActivationFunctionType.RELU6:
            return self.node("Clip", [name, self.floats(0.0), self.floats(6.0)])
        if function == tflite.ActivationFunctionType.RELU_N1_TO_1:
            return self.node("Clip", [name, self.floats(-1.0), self.floats(1.0)])
        if function == tflite.ActivationFunctionType.TANH:
            return self.node("Tanh", [name])
        raise FaceLlavaError(f"{self.where}: fused activation {function} is not supported")

    # --- the conversion

    def convert(self) -> onnx.ModelProto:
        graph = self.graph
        for i in range(graph.InputsLength()):
            self.nhwc[graph.Inputs(i)] = self.tensors[graph.Inputs(i)].name
        for position in range(graph.OperatorsLength()):
            op = graph.Operators(position)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == tflite.BuiltinOperator.CUSTOM:
                name = code.CustomCode().decode()
                handler = _CUSTOM.get((name, code.Version()))
            else:
                name = _BUILTIN_NAMES.get(builtin, str(builtin))
                handler = _BUILTIN.get(name)
            if handler is None:
                raise FaceLlavaError(f"{self.where}: operator {name} (version {code.Version()}) is not supported by "
                                     "this converter (it covers MediaPipe's face detection and face mesh models)")
            inputs = [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
            outputs = [int(i) for i in op.OutputsAsNumpy()]
            handler(self, op, inputs, outputs)
        graph_inputs, graph_outputs = [], []
        for i in range(graph.InputsLength()):
            index = graph.Inputs(i)
            tensor = self.tensors[index]
            graph_inputs.append(helper.make_tensor_value_info(tensor.name, TensorProto.FLOAT, list(tensor.shape)))
        for i in range(graph.OutputsLength()):
            index = graph.Outputs(i)
            tensor = self.tensors[index]
            self.nodes.append(helper.make_node("Identity", [self.as_nhwc(index)], [tensor.name]))
            graph_outputs.append(helper.make_tensor_value_info(tensor.name, TensorProto.FLOAT, list(tensor.shape)))
        onnx_graph = helper.make_graph(self.nodes, Path(self.where).stem, graph_inputs, graph_outputs,
                                       self.initializers)
        model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="facellava-edge tflite_onnx")
        onnx.checker.check_model(model, full_check=True)
        return model


# --- builtin operators: handler(converter, op, inputs, outputs) -------------------------------------------------


def _fold(function: Callable[[_Converter, tflite.Operator, list[int]], np.ndarray]) -> Callable[..., None]:
    def handler(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
        c.constants[outputs[0]] = function(c, op, inputs)
    return handler


@_fold
def _dequantize(c: _Converter, op: tflite.Operator, inputs: list[int]) -> np.ndarray:
    data = c.value(inputs[0])
    tensor = c.graph.Tensors(inputs[0])
    if data is None:
        raise FaceLlavaError(f"{c.where}: DEQUANTIZE of a computed tensor is not supported")
    if data.dtype == np.float16:
        return data.astype(np.float32)
    quantization = tensor.Quantization()
    if quantization is None or quantization.ScaleLength() != 1:
        raise FaceLlavaError(f"{c.where}: DEQUANTIZE of per-axis or unscaled {data.dtype} weights is not supported")
    return ((data.astype(np.float32) - quantization.ZeroPoint(0)) * quantization.Scale(0)).astype(np.float32)


@_fold
def _densify(c: _Converter, op: tflite.Operator, inputs: list[int]) -> np.ndarray:
    data = c.value(inputs[0])
    if data is None:
        raise FaceLlavaError(f"{c.where}: DENSIFY of a computed tensor is not supported")
    return data  # `_buffer` densified it when it read the sparse buffer


def _conv(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int], depthwise: bool) -> None:
    options = _options(op, tflite.DepthwiseConv2DOptions if depthwise else tflite.Conv2DOptions)
    _, height, width, channels = c.tensors[inputs[0]].shape
    kernel = c.weight(inputs[1])  # Conv: [O, KH, KW, I]; depthwise: [1, KH, KW, C * multiplier]
    if depthwise:
        weight, group = kernel.transpose(3, 0, 1, 2), channels
    else:
        weight, group = kernel.transpose(0, 3, 1, 2), channels // kernel.shape[3]
    stride = (options.StrideH(), options.StrideW())
    dilation = (options.DilationHFactor(), options.DilationWFactor())
    pads = [0, 0, 0, 0]
    if options.Padding() == _SAME:
        top, bottom = _same_pads(height, kernel.shape[1], stride[0], dilation[0])
        left, right = _same_pads(width, kernel.shape[2], stride[1], dilation[1])
        pads = [top, left, bottom, right]
    args = [c.as_nchw(inputs[0]), c.const(weight, "kernel")]
    if len(inputs) > 2 and inputs[2] >= 0:
        args.append(c.const(c.weight(inputs[2]), "bias"))
    out = c.node("Conv", args, "conv", strides=list(stride), dilations=list(dilation), pads=pads, group=group,
                 kernel_shape=list(kernel.shape[1:3]))
    c.nchw[outputs[0]] = c.activation(out, options.FusedActivationFunction())


def _max_pool(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
    options = _options(op, tflite.Pool2DOptions)
    _, height, width, _ = c.tensors[inputs[0]].shape
    kernel = (options.FilterHeight(), options.FilterWidth())
    stride = (options.StrideH(), options.StrideW())
    pads = [0, 0, 0, 0]
    if options.Padding() == _SAME:  # padded cells never win a max, as in TFLite
        top, bottom = _same_pads(height, kernel[0], stride[0], 1)
        left, right = _same_pads(width, kernel[1], stride[1], 1)
        pads = [top, left, bottom, right]
    out = c.node("MaxPool", [c.as_nchw(inputs[0])], "pool", kernel_shape=list(kernel), strides=list(stride),
                 pads=pads)
    c.nchw[outputs[0]] = c.activation(out, options.FusedActivationFunction())


def _pad(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
    paddings = c.value(inputs[1]).astype(np.int64)  # [rank, 2] in the TFLite layout
    fill = c.floats(c.weight(inputs[2]).reshape(())) if len(inputs) > 2 else c.floats(0.0)
    if len(paddings) == 4:
        paddings = paddings[list(NHWC_TO_NCHW)]
        c.nchw[outputs[0]] = c.node("Pad", [c.as_nchw(inputs[0]), c.ints(paddings.T.reshape(-1)), fill], "pad")
    else:
        c.nhwc[outputs[0]] = c.node("Pad", [c.as_nhwc(inputs[0]), c.ints(paddings.T.reshape(-1)), fill], "pad")


def _operand(c: _Converter, index: int, nchw: bool) -> str:
    """An elementwise operand: an activation in the chosen layout, or a constant broadcast the same way."""
    data = c.value(index)
    if data is None:
        return c.as_nchw(index) if nchw else c.as_nhwc(index)
    data = data.astype(np.float32)
    if nchw:
        data = data.reshape((1,) * (4 - data.ndim) + data.shape).transpose(NHWC_TO_NCHW)
    return c.floats(data)


def _binary(onnx_op: str, options_class: type) -> Callable[..., None]:
    def handler(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
        nchw = len(c.tensors[outputs[0]].shape) == 4
        out = c.node(onnx_op, [_operand(c, i, nchw) for i in inputs[:2]], onnx_op.lower())
        out = c.activation(out, _options(op, options_class).FusedActivationFunction())
        (c.nchw if nchw else c.nhwc)[outputs[0]] = out
    return handler


def _unary(onnx_op: str) -> Callable[..., None]:
    def handler(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
        nchw = inputs[0] in c.nchw
        out = c.node(onnx_op, [c.nchw[inputs[0]] if nchw else c.as_nhwc(inputs[0])], onnx_op.lower())
        (c.nchw if nchw else c.nhwc)[outputs[0]] = out
    return handler


def _prelu(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
    nchw = len(c.tensors[outputs[0]].shape) == 4
    out = c.node("PRelu", [_operand(c, inputs[0], nchw), _operand(c, inputs[1], nchw)], "prelu")
    (c.nchw if nchw else c.nhwc)[outputs[0]] = out


def _reshape(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
    shape = c.tensors[outputs[0]].shape  # static in these models
    c.nhwc[outputs[0]] = c.node("Reshape", [c.as_nhwc(inputs[0]), c.ints(shape)], "reshape")


def _concatenation(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
    options = _options(op, tflite.ConcatenationOptions)
    rank = len(c.tensors[outputs[0]].shape)
    axis = options.Axis() % rank
    if rank == 4:
        out = c.node("Concat", [_operand(c, i, True) for i in inputs], "concat", axis=NHWC_TO_NCHW.index(axis))
        c.nchw[outputs[0]] = c.activation(out, options.FusedActivationFunction())
    else:
        out = c.node("Concat", [_operand(c, i, False) for i in inputs], "concat", axis=axis)
        c.nhwc[outputs[0]] = c.activation(out, options.FusedActivationFunction())


def _resize_bilinear(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
    options = _options(op, tflite.ResizeBilinearOptions)
    batch, height, width, channels = c.tensors[outputs[0]].shape
    mode = ("align_corners" if options.AlignCorners() else
            "half_pixel" if options.HalfPixelCenters() else "asymmetric")
    c.nchw[outputs[0]] = c.node("Resize", [c.as_nchw(inputs[0]), "", "", c.ints([batch, channels, height, width])],
                                "resize", mode="linear", coordinate_transformation_mode=mode)


def _depth_to_space(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
    block = _options(op, tflite.DepthToSpaceOptions).BlockSize()
    # TensorFlow's NHWC order of the channel blocks ((row, column, channel)) is ONNX's DCR mode
    c.nchw[outputs[0]] = c.node("DepthToSpace", [c.as_nchw(inputs[0])], "d2s", blocksize=block, mode="DCR")


def _strided_slice(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
    options = _options(op, tflite.StridedSliceOptions)
    if options.EllipsisMask() or options.NewAxisMask() or options.Offset():
        raise FaceLlavaError(f"{c.where}: STRIDED_SLICE with ellipsis/new-axis masks or offset is not supported")
    shape = c.tensors[inputs[0]].shape
    begin, end, strides = (c.value(i).astype(np.int64) for i in inputs[1:4])
    for axis in range(len(shape)):
        if options.BeginMask() >> axis & 1:
            begin[axis] = 0 if strides[axis] > 0 else shape[axis] - 1
        if options.EndMask() >> axis & 1:
            end[axis] = shape[axis] if strides[axis] > 0 else -shape[axis] - 1
        if options.ShrinkAxisMask() >> axis & 1:
            end[axis] = begin[axis] + 1
    out = c.node("Slice", [c.as_nhwc(inputs[0]), c.ints(begin), c.ints(end), c.ints(range(len(shape))),
                           c.ints(strides)], "slice")
    c.nhwc[outputs[0]] = c.node("Reshape", [out, c.ints(c.tensors[outputs[0]].shape)], "reshape")


_BUILTIN: dict[str, Callable[..., None]] = {
    "DEQUANTIZE": _dequantize,
    "DENSIFY": _densify,
    "CONV_2D": lambda c, op, i, o: _conv(c, op, i, o, depthwise=False),
    "DEPTHWISE_CONV_2D": lambda c, op, i, o: _conv(c, op, i, o, depthwise=True),
    "MAX_POOL_2D": _max_pool,
    "PAD": _pad,
    "PADV2": _pad,
    "ADD": _binary("Add", tflite.AddOptions),
    "MUL": _binary("Mul", tflite.MulOptions),
    "RELU": _unary("Relu"),
    "LOGISTIC": _unary("Sigmoid"),
    "TANH": _unary("Tanh"),
    "PRELU": _prelu,
    "RESHAPE": _reshape,
    "CONCATENATION": _concatenation,
    "RESIZE_BILINEAR": _resize_bilinear,
    "DEPTH_TO_SPACE": _depth_to_space,
    "STRIDED_SLICE": _strided_slice,
}


# --- MediaPipe's custom operators (mediapipe/util/tflite/operations, version 2) ---------------------------------


def _custom_options(op: tflite.Operator) -> dict[str, Any]:
    return flexbuffers.Loads(bytes(op.CustomOptionsAsNumpy())) if op.CustomOptionsLength() else {}


def _affine_rows(c: _Converter, matrix: str) -> str:
    """[1, 3, 2] = [[m00, m10], [m01, m11], [m03, m13]] of a [1, 4, 4] transform: (x, y, 1) @ it = the first two
    rows of the transform applied to (x, y, 0, 1)."""
    top = c.node("Slice", [matrix, c.ints([0]), c.ints([2]), c.ints([1])], "rows")
    picked = c.node("Gather", [top, c.ints([0, 1, 3])], "cols", axis=2)
    return c.node("Transpose", [picked], "affine", perm=[0, 2, 1])


def _landmarks_to_transform_matrix(c: _Converter, op: tflite.Operator, inputs: list[int],
                                   outputs: list[int]) -> None:
    """The affine from an output grid (output_width x output_height) to the box around the `subset_idxs` points,
    rotated so the line left_rotation_idx -> right_rotation_idx lies at target_rotation_radians, scaled by
    scale_x/scale_y."""
    p = _custom_options(op)
    landmarks = c.as_nhwc(inputs[0])  # [1, N, 3]
    xy = c.node("Slice", [landmarks, c.ints([0]), c.ints([2]), c.ints([2])], "xy")  # [1, N, 2]
    left = c.node("Gather", [xy, c.ints(p["left_rotation_idx"])], "left", axis=1)  # [1, 2]
    right = c.node("Gather", [xy, c.ints(p["right_rotation_idx"])], "right", axis=1)
    delta = c.node("Sub", [right, left])
    direction = c.node("Div", [delta, c.node("ReduceL2", [delta, c.ints([1])], keepdims=1)])  # (cos a, sin a)
    # rotation r = target - a: (cos r, sin r) = (cos a, sin a) @ [[cos t, sin t], [sin t, -cos t]]
    t = float(p.get("target_rotation_radians", 0.0))
    cos_sin = c.node("MatMul", [direction, c.floats([[np.cos(t), np.sin(t)], [np.sin(t), -np.cos(t)]])])
    cos_r = c.node("Slice", [cos_sin, c.ints([0]), c.ints([1]), c.ints([1])], "cos")  # [1, 1]
    sin_r = c.node("Slice", [cos_sin, c.ints([1]), c.ints([2]), c.ints([1])], "sin")
    neg_sin = c.node("Neg", [sin_r])
    # points rotated by r: (x, y) @ [[cos, sin], [-sin, cos]]
    rotate = c.node("Reshape", [c.node("Concat", [cos_r, sin_r, neg_sin, cos_r], axis=1), c.ints([1, 2, 2])])
    subset = np.asarray(p["subset_idxs"], np.int64).reshape(-1)
    points = c.node("MatMul", [c.node("Gather", [xy, c.ints(subset)], "subset", axis=1), rotate])  # [1, K, 2]
    high = c.node("ReduceMax", [points, c.ints([1])], keepdims=0)  # [1, 2]
    low = c.node("ReduceMin", [points, c.ints([1])], keepdims=0)
    size = c.node("Sub", [high, low])  # (width, height) in the rotated frame
    middle = c.node("Mul", [c.node("Add", [high, low]), c.floats(0.5)])
    # the middle rotated back by -r: (x, y) @ [[cos, -sin], [sin, cos]]
    unrotate = c.node("Reshape", [c.node("Concat", [cos_r, neg_sin, sin_r, cos_r], axis=1), c.ints([1, 2, 2])])
    centre = c.node("MatMul", [c.node("Unsqueeze", [middle, c.ints([1])]), unrotate])  # [1, 1, 2]
    centre = c.node("Reshape", [centre, c.ints([1, 2])])
    out_w, out_h = float(p["output_width"]), float(p["output_height"])
    scale = c.node("Mul", [size, c.floats([[p["scale_x"] / out_w, p["scale_y"] / out_h]])])  # (sx, sy)
    sx = c.node("Slice", [scale, c.ints([0]), c.ints([1]), c.ints([1])], "sx")
    sy = c.node("Slice", [scale, c.ints([1]), c.ints([2]), c.ints([1])], "sy")
    # shift(centre) . rotate(-r) . scale(sx, sy) . shift(-out_w / 2, -out_h / 2)
    m00, m01 = c.node("Mul", [cos_r, sx]), c.node("Mul", [sin_r, sy])
    m10, m11 = c.node("Mul", [neg_sin, sx]), c.node("Mul", [cos_r, sy])
    linear = c.node("Reshape", [c.node("Concat", [m00, m10, m01, m11], axis=1), c.ints([1, 2, 2])])  # columns
    half = c.floats([[[-out_w / 2, -out_h / 2]]])
    shift = c.node("Add", [c.node("Reshape", [c.node("MatMul", [half, linear]), c.ints([1, 2])]), centre])
    m03 = c.node("Slice", [shift, c.ints([0]), c.ints([1]), c.ints([1])], "m03")
    m13 = c.node("Slice", [shift, c.ints([1]), c.ints([2]), c.ints([1])], "m13")
    zero, one = c.floats([[0.0]]), c.floats([[1.0]])
    entries = [m00, m01, zero, m03, m10, m11, zero, m13, zero, zero, one, zero, zero, zero, zero, one]
    c.nhwc[outputs[0]] = c.node("Reshape", [c.node("Concat", entries, axis=1), c.ints([1, 4, 4])], "transform")


def _transform_tensor_bilinear(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
    """Output pixel (x, y) reads the input bilinearly at the transform of (x + 0.5, y + 0.5) minus 0.5 (version
    2's pixel-centre correction); a point outside [0, W-1] x [0, H-1] reads 0 in every channel."""
    _, out_h, out_w, _ = c.tensors[outputs[0]].shape
    _, in_h, in_w, _ = c.tensors[inputs[0]].shape
    ys, xs = np.meshgrid(np.arange(out_h, dtype=np.float32), np.arange(out_w, dtype=np.float32), indexing="ij")
    base = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5, np.ones(out_h * out_w, np.float32)], axis=1)[None]
    at = c.node("Sub", [c.node("MatMul", [c.floats(base), _affine_rows(c, c.as_nhwc(inputs[1]))]),
                        c.floats(0.5)], "sample_at")  # [1, out_h * out_w, 2] input pixel coordinates
    grid = c.node("Sub", [c.node("Mul", [at, c.floats([2.0 / (in_w - 1), 2.0 / (in_h - 1)])]), c.floats(1.0)])
    grid = c.node("Reshape", [grid, c.ints([1, out_h, out_w, 2])], "grid")
    sampled = c.node("GridSample", [c.as_nchw(inputs[0]), grid], "sampled", align_corners=1, mode="bilinear",
                     padding_mode="zeros")
    inside = c.node("And", [c.node("GreaterOrEqual", [at, c.floats([0.0, 0.0])]),
                            c.node("LessOrEqual", [at, c.floats([in_w - 1.0, in_h - 1.0])])])
    inside = c.node("Cast", [c.node("ReduceMin", [c.node("Cast", [inside], to=TensorProto.INT32), c.ints([2])],
                                    keepdims=0)], to=TensorProto.FLOAT)
    mask = c.node("Reshape", [inside, c.ints([1, 1, out_h, out_w])], "inside")
    c.nchw[outputs[0]] = c.node("Mul", [sampled, mask], "transformed")


def _transform_landmarks(c: _Converter, op: tflite.Operator, inputs: list[int], outputs: list[int]) -> None:
    """Points [1, N, 2 or 3] through the transform's first two rows; z (when present) passes unchanged."""
    _, count, dims = c.tensors[inputs[0]].shape
    points = c.as_nhwc(inputs[0])
    xy = c.node("Slice", [points, c.ints([0]), c.ints([2]), c.ints([2])], "xy") if dims == 3 else points
    homogeneous = c.node("Concat", [xy, c.floats(np.ones((1, count, 1)))], axis=2)
    moved = c.node("MatMul", [homogeneous, _affine_rows(c, c.as_nhwc(inputs[1]))], "moved")
    if dims == 3:
        z = c.node("Slice", [points, c.ints([2]), c.ints([3]), c.ints([2])], "z")
        moved = c.node("Concat", [moved, z], axis=2)
    c.nhwc[outputs[0]] = moved


_CUSTOM: dict[tuple[str, int], Callable[..., None]] = {
    ("Landmarks2TransformMatrix", 2): _landmarks_to_transform_matrix,
    ("TransformTensorBilinear", 2): _transform_tensor_bilinear,
    ("TransformLandmarks", 2): _transform_landmarks,
}


def convert_tflite(path: Path) -> onnx.ModelProto:
    """The ONNX graph (opset 18, FP32 weights) of a MediaPipe face model `.tflite`: the same input and output
    names, NHWC input and output shapes. Raises FaceLlavaError for a missing or non-TFLite file or an operator
    outside the set these models use."""
    return _Converter(read_tflite(path), Path(path).name).convert()
