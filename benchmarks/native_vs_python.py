"""The native runner against the Python runtime on the same bundle, each side in its own process, one run each.

Both CLIs answer the same question about the same medium with the same options (the face front end on the bundle's
ONNX graphs, `facellava run --front-end graphs`, with the face mesh's landmarks; or `--no-face-crop` and landmarks
from a file or none; greedy, `--max-tokens`), printing their --json answer; from the process and the answer:

- start-up: the process's wall time less the answer's own total (interpreter or loader start, bundle check,
  GGUF load, and for Python the imports and the face front end `facellava run` opens),
- peak resident memory of the process (its rusage ru_maxrss),
- face detection and landmark milliseconds, time to first token and decode tokens/s, as each runtime times them.

The Python CLI runs twice: as it is, and with OMP_WAIT_POLICY=PASSIVE, the OpenMP policy the native CLI sets for
itself (llama.cpp's CPU backend runs on OpenMP; spinning idle threads cost a shared machine dearly).

The two answers' tokens are compared too. The machine may be shared and noisy: read the ratios, one run.

    python benchmarks/native_vs_python.py [BUNDLE] [--video P] [--no-face-crop [--landmarks NPY]] [--no-landmarks]
                                          [--max-tokens 64] [--native build/native/facellava-native]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_with_rusage(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one CLI to its end, reaping it ourselves so that its rusage is known: its --json answer, wall seconds,
    start-up seconds, peak RSS (MiB), time to first token, decode speed and token count."""
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: only stdout is read while the child runs
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, env=env)
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            sys.exit(f"{command[0]} failed ({process.returncode}): {errors.read().decode(errors='replace').strip()}")
    answer = json.loads(stdout)
    total_s = answer["timings"]["total_ms"] / 1000
    return {"answer": answer, "wall_s": wall, "startup_s": wall - total_s, "peak_rss_mib": usage.ru_maxrss / 1024,
            "detect_ms": answer["timings"].get("face_detection_ms") or 0.0,
            "landmarks_ms": answer["timings"].get("landmarks_ms") or 0.0,
            "ttft_ms": answer["timings"]["time_to_first_token_ms"],
            "decode_tps": answer["timings"]["decode_tokens_per_s"], "tokens": len(answer["tokens"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path, help="a bundle (default: the demo's tiny bundle)")
    parser.add_argument("--video", type=Path, help="a video instead of the shipped photograph")
    parser.add_argument("--no-face-crop", action="store_true", help="the whole medium, no face front end")
    parser.add_argument("--landmarks", type=Path, help="an official-format .npy (with --no-face-crop)")
    parser.add_argument("--no-landmarks", action="store_true", help="without FRLP/FRGCA (default with --no-face-crop)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--native", type=Path, default=REPO / "build" / "native" / "facellava-native")
    parser.add_argument("--question", default="What emotion is shown on this face?")
    args = parser.parse_args()
    if not args.native.is_file():
        sys.exit(f"{args.native} is not built: see native/README.md")

    from facellava.bundle import Bundle
    from facellava.demo import demo_bundle
    from facellava.runtime.assets import face_photo
    from facellava.runtime.face_graphs import has_front_end_graphs

    bundle = args.bundle or demo_bundle()
    if not args.no_face_crop and not has_front_end_graphs(Bundle.open(bundle)):
        sys.exit(f"{bundle} has no front-end graphs: add them with `facellava export front-end --bundle {bundle}`, "
                 "or give --no-face-crop")
    if args.landmarks and not args.no_face_crop:
        sys.exit("--landmarks goes with --no-face-crop (the front end finds its own)")
    medium = ["--video", str(args.video)] if args.video else ["--image", str(face_photo())]
    marks = (["--landmarks", str(args.landmarks)] if args.landmarks
             else ["--no-landmarks"] if args.no_landmarks or args.no_face_crop else [])
    crop = ["--no-face-crop"] if args.no_face_crop else []
    common = [str(bundle), *medium, *marks, *crop, "--json", "--max-tokens", str(args.max_tokens), args.question]
    # the native CLI makes OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE) unless told otherwise; the Python
    # CLI leaves libgomp's default (spinning): the third side is the Python CLI with the native side's policy
    plain = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    python = [sys.executable, "-m", "facellava", "run", *([] if args.no_face_crop else ["--front-end", "graphs"]),
              *common]
    sides = {
        "native": run_with_rusage([str(args.native), *common], plain),
        "python": run_with_rusage(python, plain),
        "python passive": run_with_rusage(python, {**plain, "OMP_WAIT_POLICY": "PASSIVE"}),
    }

    native = sides["native"]
    print(f"bundle {bundle}, {'video' if args.video else 'image'}, {' '.join([*crop, *marks]) or 'face front end'}, "
          f"--max-tokens {args.max_tokens}; "
          "one run each, in turn (left to right)")
    print(f"{'':26}" + "".join(f"{name:>16}" for name in sides) + f"{'native/python':>15}{'native/passive':>16}")
    rows = [("start-up (s)", "startup_s", "{:.2f}"), ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
            ("face detection (ms)", "detect_ms", "{:.0f}"), ("landmarks (ms)", "landmarks_ms", "{:.0f}"),
            ("time to first token (ms)", "ttft_ms", "{:.0f}"), ("decode (tokens/s)", "decode_tps", "{:.1f}"),
            ("wall (s)", "wall_s", "{:.2f}")]
    for label, key, form in rows:
        ratios = [native[key] / sides[name][key] if sides[name][key] else float("nan")
                  for name in ("python", "python passive")]
        print(f"{label:26}" + "".join(f"{form.format(side[key]):>16}" for side in sides.values())
              + f"{ratios[0]:>15.2f}{ratios[1]:>16.2f}")
    for name in ("python", "python passive"):
        same = native["answer"]["tokens"] == sides[name]["answer"]["tokens"]
        print(f"tokens: {native['tokens']} native, {sides[name]['tokens']} {name}, identical: {same}")


if __name__ == "__main__":
    main()
