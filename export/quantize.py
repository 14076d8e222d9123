"""GGUF -> quantized GGUF with llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python).

The types are llama.cpp's file types (`llama_ftype`), named as its `llama-quantize` tool names them. The ones
that lose too much without an importance matrix (IQ4_XS and below, Q3_K_*, Q2_K) are only offered with one.
An importance matrix is read from either of llama.cpp's file formats: the GGUF one that `llama-imatrix`
writes today (`<tensor>.in_sum2` and `<tensor>.counts` per weight, `imatrix.*` metadata) and the legacy `.dat`
one (entries of name, call count and values). `save_imatrix` writes the GGUF format.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facellava.atomic import atomic_file
from facellava.errors import FaceLlavaError


@dataclass(frozen=True)
class QuantType:
    ftype: str  # the llama_ftype constant's name in llama_cpp
    needs_imatrix: bool
    description: str


# name -> llama.cpp file type. Row sizes must be multiples of 256 for the K and IQ types (LLaMA's are).
QUANT_TYPES: dict[str, QuantType] = {
    "q8_0": QuantType("LLAMA_FTYPE_MOSTLY_Q8_0", False, "8.5 bpw, near-lossless"),
    "q6_k": QuantType("LLAMA_FTYPE_MOSTLY_Q6_K", False, "6.6 bpw"),
    "q5_k_m": QuantType("LLAMA_FTYPE_MOSTLY_Q5_K_M", False, "5.7 bpw mix"),
    "q5_k_s": QuantType("LLAMA_FTYPE_MOSTLY_Q5_K_S", False, "5.5 bpw"),
    "q5_0": QuantType("LLAMA_FTYPE_MOSTLY_Q5_0", False, "5.5 bpw, legacy"),
    "q4_k_m": QuantType("LLAMA_FTYPE_MOSTLY_Q4_K_M", False, "4.8 bpw mix, the usual choice"),
    "q4_k_s": QuantType("LLAMA_FTYPE_MOSTLY_Q4_K_S", False, "4.6 bpw"),
    "q4_0": QuantType("LLAMA_FTYPE_MOSTLY_Q4_0", False, "4.5 bpw, legacy, fast on ARM"),
    "iq4_xs": QuantType("LLAMA_FTYPE_MOSTLY_IQ4_XS", True, "4.25 bpw"),
    "iq4_nl": QuantType("LLAMA_FTYPE_MOSTLY_IQ4_NL", True, "4.5 bpw"),
    "q3_k_l": QuantType("LLAMA_FTYPE_MOSTLY_Q3_K_L", True, "4.3 bpw mix"),
    "q3_k_m": QuantType("LLAMA_FTYPE_MOSTLY_Q3_K_M", True, "3.9 bpw mix"),
    "q3_k_s": QuantType("LLAMA_FTYPE_MOSTLY_Q3_K_S", True, "3.5 bpw"),
    "iq3_m": QuantType("LLAMA_FTYPE_MOSTLY_IQ3_M", True, "3.7 bpw mix"),
    "iq3_s": QuantType("LLAMA_FTYPE_MOSTLY_IQ3_S", True, "3.4 bpw"),
    "iq3_xxs": QuantType("LLAMA_FTYPE_MOSTLY_IQ3_XXS", True, "3.1 bpw"),
    "q2_k": QuantType("LLAMA_FTYPE_MOSTLY_Q2_K", True, "3.0 bpw mix"),
    "q2_k_s": QuantType("LLAMA_FTYPE_MOSTLY_Q2_K_S", True, "2.8 bpw"),
    "iq2_m": QuantType("LLAMA_FTYPE_MOSTLY_IQ2_M", True, "2.7 bpw"),
    "iq2_s": QuantType("LLAMA_FTYPE_MOSTLY_IQ2_S", True, "2.5 bpw"),
    "iq2_xs": QuantType("LLAMA_FTYPE_MOSTLY_IQ2_XS", True, "2.3 bpw"),
    "iq2_xxs": QuantType("LLAMA_FTYPE_MOSTLY_IQ2_XXS", True, "2.1 bpw"),
}

IMATRIX_SUMS_SUFFIX = ".in_sum2"
IMATRIX_COUNTS_SUFFIX = ".counts"
GGUF_MAGIC = b"GGUF"


def check_quant_type(name: str, have_imatrix: bool) -> str:
    """The canonical (lower-case) name of a quantization type. Raises FaceLlavaError for an unknown name (listing
    the valid ones) or for an importance-matrix type without an importance matrix."""
    key = name.strip().lower()
    if key not in QUANT_TYPES:
        raise FaceLlavaError(f"unknown quantization type {name!r}; valid: {', '.join(QUANT_TYPES)}")
    if QUANT_TYPES[key].needs_imatrix and not have_imatrix:
        plain = ", ".join(k for k, t in QUANT_TYPES.items() if not t.needs_imatrix)
        raise FaceLlavaError(f"{key} needs an importance matrix: pass --imatrix FILE, or choose one of {plain}")
    return key


# --- importance matrices ------------------------------------------------------------------------------------


def _read_legacy_imatrix(path: Path) -> dict[str, np.ndarray]:
    """The legacy `.dat` format: int32 count, then per entry int32 name length, name, int32 calls, int32 values,
    float32 values (sums over calls, so each is divided by the call count); an optional dataset trailer."""
    data = path.read_bytes()
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise FaceLlavaError(f"{path} is truncated: not an importance matrix file")
        values = struct.unpack_from(fmt, data, offset)
        offset += size
        return values

    (entries,) = take("<i")
    if entries < 1:
        raise FaceLlavaError(f"{path} holds no importance matrix entries")
    result = {}
    for _ in range(entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise FaceLlavaError(f"{path} is not an importance matrix file (bad entry name length {length})")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        calls, count = take("<ii")
        if count < 1:
            raise FaceLlavaError(f"{path} is not an importance matrix file (entry {name} has {count} values)")
        values = np.array(take(f"<{count}f"), dtype=np.float32)
        result[name] = values / calls if calls > 0 else values
    return result


def _read_gguf_imatrix(path: Path) -> dict[str, np.ndarray]:
    """The GGUF format: per weight, `in_sum2` [experts, n] sums of squared activations and `counts` [experts, 1]
    token counts; the importance is their quotient (1 where a matrix never saw input, as llama.cpp does)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # gguf-py raises ValueError and others for a damaged file
        raise FaceLlavaError(f"cannot read importance matrix {path}: {error}") from None
    tensors = {t.name: t for t in reader.tensors}
    result = {}
    for name, sums in tensors.items():
        if not name.endswith(IMATRIX_SUMS_SUFFIX):
            continue
        weight = name[: -len(IMATRIX_SUMS_SUFFIX)]
        counts = tensors.get(weight + IMATRIX_COUNTS_SUFFIX)
        if counts is None:
            raise FaceLlavaError(f"importance matrix {path} has sums but no counts for {weight}")
        n = int(sums.shape[0])  # GGUF shapes list the row length first
        rows = np.asarray(sums.data, dtype=np.float32).reshape(-1, n)
        per_row = np.asarray(counts.data, dtype=np.float32).reshape(-1)[: len(rows), None]
        with np.errstate(divide="ignore", invalid="ignore"):
            result[weight] = np.where(per_row > 0, rows / per_row, 1.0).astype(np.float32).reshape(-1)
    if not result:
        raise FaceLlavaError(f"{path} holds no importance matrix entries")
    return result


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """An importance matrix file (GGUF or legacy `.dat`) as {GGUF weight name: per-input-column importance}.

    Raises FaceLlavaError when the file is missing, damaged, empty, or holds non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise FaceLlavaError(f"importance matrix file {path} does not exist")
    with path.open("rb") as handle:
        magic = handle.read(4)
    result = _read_gguf_imatrix(path) if magic == GGUF_MAGIC else _read_legacy_imatrix(path)
    for name, values in result.items():
        if not np.isfinite(values).all():
            raise FaceLlavaError(f"importance matrix {path} has non-finite values for {name}")
    return result


def save_imatrix(path: str | Path, sums: Mapping[str, np.ndarray], counts: Mapping[str, float],
                 datasets: Sequence[str] = (), chunk_count: int = 1, chunk_size: int = 512) -> None:
    """Write an importance matrix in llama.cpp's GGUF format.

    `sums` maps each GGUF weight name to the sum over tokens of its squared input activations [n_in]; `counts`
    gives the number of tokens summed for it. `datasets`, `chunk_count` and `chunk_size` describe the
    calibration data, as `llama-imatrix` records them. Written to a temporary name and renamed.
    """
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(None, "imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", list(datasets) or ["unknown"])
    writer.add_uint32("imatrix.chunk_count", chunk_count)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(sums):
        writer.add_tensor(name + IMATRIX_SUMS_SUFFIX, np.asarray(sums[name], dtype=np.float32).reshape(1, -1))
        writer.add_tensor(name + IMATRIX_COUNTS_SUFFIX, np.array([[counts[name]]], dtype=np.float32))
    with atomic_file(path) as partial:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def gguf_matrix_columns(gguf_path: str | Path) -> dict[str, int]:
    """{name: input columns} of the matrices of a GGUF (what an importance matrix has one value per)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    return {t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) >= 2}  # GGUF lists columns first


def check_imatrix_fits(imatrix: Mapping[str, np.ndarray], columns: Mapping[str, int]) -> int:
    """Check an importance matrix against a model's matrices ({GGUF name: input columns}): each entry that names
    one of them must hold one value per input column. Returns how many matrices it covers. Raises
    FaceLlavaError when an entry does not fit or when it names none of them (computed for another model)."""
    for name, values in imatrix.items():
        if name in columns and len(values) % columns[name]:
            raise FaceLlavaError(f"the importance matrix does not fit this model: {name} has {len(values)} values "
                                 f"for {columns[name]} input columns (was it computed for another model?)")
    covered = sum(1 for name in columns if name in imatrix)
    if covered == 0:
        raise FaceLlavaError("the importance matrix names none of this model's weights (was it computed for "
                             "another model?)")
    return covered


# --- quantization -------------------------------------------------------------------------------------------


def quantize_gguf(source: str | Path, out_path: str | Path, type_name: str,
                  imatrix: Mapping[str, np.ndarray] | None = None, imatrix_source: str = "",
                  threads: int = 0) -> Path:
    """Quantize an F16/F32 GGUF with llama.cpp to the type `type_name` (see QUANT_TYPES).

    `imatrix` (from `load_imatrix`) guides the quantizer; it is required for the importance-matrix types. Like
    `llama-quantize`, the output then records `quantize.imatrix.file` (`imatrix_source`, e.g. the file's name)
    and `quantize.imatrix.entries_count`. `threads` 0 uses every core. The result is written under a temporary
    name beside `out_path` and renamed when whole. Returns `out_path`. Raises FaceLlavaError for an unknown
    type, a missing or ill-fitting imatrix, or when llama.cpp refuses (its last log lines are in the message).
    """
    import llama_cpp

    from facellava.runtime.llm import init_llama_backend, recent_log

    key = check_quant_type(type_name, imatrix is not None)
    source, out_path = Path(source), Path(out_path)
    if not source.is_file():
        raise FaceLlavaError(f"GGUF file {source} does not exist")
    init_llama_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[key].ftype)
    params.nthread = threads
    keep_alive: list[object] = []
    if imatrix:
        check_imatrix_fits(imatrix, gguf_matrix_columns(source))
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: the last one ends it
        for entry, (name, values) in zip(entries[:-1], imatrix.items(), strict=True):
            array = np.ascontiguousarray(values, dtype=np.float32)
            encoded = name.encode()
            keep_alive += [array, encoded]
            entry.name = encoded
            entry.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = array.size
        params.imatrix = entries
        overrides = (llama_cpp.llama_model_kv_override * 3)()  # zeroed: the last one (empty key) ends it
        overrides[0].key, overrides[0].tag = b"quantize.imatrix.file", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        overrides[0].value.val_str = (imatrix_source or "unnamed").encode()[:127]
        overrides[1].key, overrides[1].tag = b"quantize.imatrix.entries_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
        overrides[1].value.val_i64 = len(imatrix)
        params.kv_overrides = overrides
        keep_alive += [entries, overrides]
    with atomic_file(out_path) as partial:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
        if status != 0:
            raise FaceLlavaError(f"llama.cpp could not quantize {source.name} to {key}: {recent_log()}")
    del keep_alive
    return out_path
