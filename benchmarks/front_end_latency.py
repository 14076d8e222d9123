"""Face front-end latency per image on this CPU: the ONNX graphs (runtime/face_graphs.py on ONNX Runtime) against
MediaPipe, measured in one run, interleaved, on the same images.

    python benchmarks/front_end_latency.py                       # graphs converted from the mediapipe wheel
    python benchmarks/front_end_latency.py --bundle BUNDLE       # the graphs of a bundle (export front-end)

Images: the shipped photograph (one face, 512 x 512) and a group composite of it (four faces of 30-120 px in
640 x 480, tests/composites.py). Each repeat runs `process_image` (detection at every size, the official crop, the
face mesh on the crop and the 68 landmarks) on both front ends in turn; the table gives the median milliseconds
of detection (with the crop) and of landmarks for each, and the graphs' time over MediaPipe's. Needs MediaPipe
(the `dev` extra) for the reference.

Measured on this shared 2-core machine (load average about 9 from other work), the tiny bundle's graphs, 7 runs:
photograph graphs 728 ms (detection 690, landmarks 51) against MediaPipe 670 ms (620, 40), 1.09x; group 721 ms
against 665 ms, 1.08x. Detection dominates: the search at every size runs the detectors on tens of tiles. The
graphs run on one ONNX Runtime thread each (face_graphs.onnx_networks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from composites import compose  # noqa: E402

from facellava.runtime.assets import face_photo  # noqa: E402
from facellava.runtime.face import FaceFrontEnd, load_image  # noqa: E402
from facellava.runtime.face_graphs import FRONT_END_FILES, FrontEndGraphs  # noqa: E402

TFLITE = {"short_range": "face_detection/face_detection_short_range.tflite",
          "full_range": "face_detection/face_detection_full_range_sparse.tflite",
          "mesh": "face_landmark/face_landmark_with_attention.tflite"}


def graph_paths(bundle: Path | None, folder: Path) -> dict[str, Path]:
    """The front-end graphs: a bundle's (verified), or converted from the mediapipe wheel into `folder`."""
    if bundle is not None:
        from facellava.bundle import Bundle

        opened = Bundle.open(bundle)
        return {model: opened.path_of(name) for model, name in FRONT_END_FILES.items()}
    import mediapipe as mp
    import onnx

    from facellava.export.tflite_onnx import convert_tflite

    modules = Path(mp.__file__).parent / "modules"
    paths = {}
    for model, name in FRONT_END_FILES.items():
        onnx.save(convert_tflite(modules / TFLITE[model]), folder / name)
        paths[model] = folder / name
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle with front-end graphs (default: convert them)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    photo = load_image(face_photo())
    images = {"photograph (1 face, 512x512)": photo,
              "group (4 faces, 640x480)": compose(photo, [30, 60, 90, 120], 480, 640, seed=1)[0]}
    with tempfile.TemporaryDirectory() as folder:
        front_ends = {"graphs": FaceFrontEnd(graphs=FrontEndGraphs.from_files(graph_paths(args.bundle,
                                                                                          Path(folder)))),
                      "mediapipe": FaceFrontEnd()}
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for name, image in images.items():
            for front_end in front_ends.values():  # warm-up: first-call allocations stay out of the figures
                front_end.process_image(image)
            for _ in tqdm(range(args.repeats), desc=name, leave=False):
                for backend, front_end in front_ends.items():
                    start = time.perf_counter()
                    result = front_end.process_image(image)
                    total = (time.perf_counter() - start) * 1000
                    times.setdefault((name, backend), []).append((result.detect_ms, result.landmarks_ms, total))
        for front_end in front_ends.values():
            front_end.close()

    print(f"median of {args.repeats} runs, milliseconds per image (detection with crop | landmarks | total)")
    print(f"{'image':32} {'graphs (ONNX Runtime)':>26} {'MediaPipe':>26} {'graphs / MediaPipe':>20}")
    for name in images:
        row = {}
        for backend in front_ends:
            runs = times[(name, backend)]
            row[backend] = [statistics.median(run[i] for run in runs) for i in range(3)]
        cells = [f"{d:7.1f} | {m:6.1f} | {t:7.1f}" for d, m, t in (row["graphs"], row["mediapipe"])]
        print(f"{name:32} {cells[0]:>26} {cells[1]:>26} {row['graphs'][2] / row['mediapipe'][2]:>20.2f}")


if __name__ == "__main__":
    main()
