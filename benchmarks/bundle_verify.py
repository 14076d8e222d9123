"""What the bundle's checks cost at real size: committing a 7B-sized GGUF through the transaction, opening and
verifying it cold (hashed) and warm (remembered), and reading the external-data locations of an ONNX graph the
size of the full-size FP16 image graph (weights inline) and of one with its weights outside.

    python benchmarks/bundle_verify.py [--gguf-gb 13.5] [--onnx-mb 800] [--out DIR]

Each figure is the median of `--repeats` runs in this process; ratios are taken in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_big_file(path: Path, gigabytes: float) -> None:
    block = np.random.default_rng(0).integers(0, 256, 1 << 26, dtype=np.uint8).tobytes()  # 64 MiB
    remaining = int(gigabytes * 1e9)
    with open(path, "wb") as out:
        while remaining > 0:
            out.write(block[: min(len(block), remaining)])
            remaining -= len(block)


def onnx_graph(path: Path, megabytes: int, external: bool) -> int:
    """A MatMul chain with `megabytes` of float32 weights in 4 MB initializers; returns the tensor count."""
    import onnx
    from onnx import TensorProto, helper

    count = max(1, megabytes // 4)
    rng = np.random.default_rng(0)
    initializers, nodes, previous = [], [], "x"
    for i in range(count):
        weights = rng.standard_normal((1024, 1024)).astype(np.float32)
        initializers.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, weights.shape, weights.tobytes(),
                                               raw=True))
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"]))
        previous = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, 1024])], initializers)
    model = helper.make_model(graph)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save_model(model, str(path))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf-gb", type=float, default=13.5, help="size of the GGUF-like file (F16 7B: 13.5)")
    parser.add_argument("--onnx-mb", type=int, default=800, help="weights of the ONNX graph (FP16 image: ~800)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="working directory (default: a temporary one, removed)")
    args = parser.parse_args()

    from facellava.bundle import VERIFIED_CACHE, Bundle, BundleWriter, onnx_external_data

    work = args.out or Path(tempfile.mkdtemp(prefix="bundle-verify-"))
    bundle = work / "bundle"
    try:
        start = time.perf_counter()
        with BundleWriter.transaction(bundle) as tx:
            write_big_file(tx.stage("llm-f16.gguf"), args.gguf_gb)
            written = time.perf_counter() - start
            tx.add("llm-f16.gguf", "llm", type="f16")
            hashed = time.perf_counter() - start - written
        commit = time.perf_counter() - start - written - hashed
        print(f"{args.gguf_gb:.1f} GB GGUF: write {written:.1f} s, sha256 at add {hashed:.1f} s "
              f"({args.gguf_gb / hashed:.2f} GB/s), commit (fsync, journal, rename, manifest) {commit:.2f} s")

        def cold() -> None:
            (bundle / VERIFIED_CACHE).unlink(missing_ok=True)
            Bundle.open(bundle).path_of("llm-f16.gguf")

        def warm() -> None:
            Bundle.open(bundle).path_of("llm-f16.gguf")

        cold_s, warm_s = timed(cold, args.repeats), timed(warm, args.repeats * 10)
        print(f"open + verify: cold {cold_s:.2f} s, warm {warm_s * 1e3:.2f} ms ({cold_s / warm_s:.0f}x)")

        for external in (False, True):
            path = work / f"graph{'_ext' if external else ''}.onnx"
            tensors = onnx_graph(path, args.onnx_mb, external)
            parse = timed(lambda p=path: onnx_external_data(p), args.repeats)
            size = path.stat().st_size + (os.path.getsize(f"{path}.data") if external else 0)
            print(f"ONNX {size / 1e6:.0f} MB, {tensors} tensors, weights {'outside' if external else 'inline'}: "
                  f"external-data locations read in {parse * 1e3:.1f} ms")
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
