"""Face detection rate per face size, on composites of the shipped photograph, for the current front end and for
the front end of an earlier git revision, measured in one run on the same images.

    python benchmarks/face_detection.py                     # against the front end before the all-size detector
    python benchmarks/face_detection.py --baseline HEAD~3 --seeds 2

Scenes (tests/composites.py): faces of 400, 200, 100, 48 and 24 px in 1280x960, faces of 300, 150, 64, 32, 20
and 16 px in 1280x800, each at 0, +-15 and +-30 degrees and several seeds; and tight face chips (256 px images in
which the face is 0.3 to 1.2 of the side). A face counts as found when a detected box has its centre within half
a face side and its size within a factor of 1.6 (`TrueFace.matches`); a detection matching no face is a false
positive. Prints one table: found/total per size for each front end (all angles, and upright only), false
positives and milliseconds per image.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from composites import compose, tight_chip  # noqa: E402

from facellava.runtime import face  # noqa: E402
from facellava.runtime.assets import face_photo  # noqa: E402

BASELINE = "16ba78d"  # --no-face-crop fix: the last front end with the short-range -> full-range cascade
SCENES = [((400, 200, 100, 48, 24), (960, 1280)), ((300, 150, 64, 32, 20, 16), (800, 1280))]
ANGLES = (0, -15, 15, -30, 30)
CHIP_FRACTIONS = (0.3, 0.5, 0.8, 1.0, 1.2)


def load_front_end_module(revision: str):
    """runtime/face.py as it was at `revision`, imported as a module of its own."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:runtime/face.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "face_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("face_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cases(seeds: int):
    photo = face.load_image(face_photo())
    for seed in range(seeds):
        for angle in ANGLES:
            for sides, (height, width) in SCENES:
                image, faces = compose(photo, list(sides), height, width, seed=seed * 7 + 1, angle=angle)
                yield f"composite {angle:+d} deg", image, faces
    for fraction in CHIP_FRACTIONS:
        chip, true_face = tight_chip(photo, fraction)
        yield f"chip {fraction}", chip, [true_face]


def measure(front_end, images) -> tuple[dict, dict, int, float]:
    """({face size or chip: (found, total)} over every angle, the same for upright faces only, false positives,
    milliseconds per image)."""
    found, total = defaultdict(int), defaultdict(int)
    upright_found, upright_total = defaultdict(int), defaultdict(int)
    false_positives, seconds = 0, 0.0
    for label, image, faces in images:
        start = time.perf_counter()
        boxes = front_end.detect(image)
        seconds += time.perf_counter() - start
        matched = set()
        for true_face in faces:
            key = label if label.startswith("chip") else f"{int(true_face.side)} px"
            hits = [i for i, b in enumerate(boxes) if true_face.matches(b.x, b.y, b.width, b.height)]
            total[key] += 1
            found[key] += bool(hits)
            if label.startswith("chip") or " +0 deg" in label:
                upright_total[key] += 1
                upright_found[key] += bool(hits)
            matched.update(hits)
        false_positives += len(boxes) - len(matched)
    rates = {key: (found[key], total[key]) for key in total}
    upright = {key: (upright_found[key], upright_total[key]) for key in upright_total}
    return rates, upright, false_positives, seconds * 1000 / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the front end to compare with")
    parser.add_argument("--seeds", type=int, default=2, help="composites per scene and angle")
    args = parser.parse_args()
    images = list(cases(args.seeds))
    results = {}
    for name, module in (("before", load_front_end_module(args.baseline)), ("after", face)):
        with module.FaceFrontEnd() as front_end:
            results[name] = measure(front_end, images)
    keys = sorted(results["after"][0], key=lambda k: (k.startswith("chip"), float(k.split()[0 if "px" in k else 1])))

    def cell(rates: dict, key: str) -> str:
        hit, count = rates.get(key, (0, 0))
        return f"{hit}/{count} {100 * hit / count:5.1f}%"

    before = f"before ({args.baseline})"
    print(f"{'face':>9} | {before:>16} | {'after':>14} | {'before, upright':>15} | {'after, upright':>14}")
    for key in keys:
        print(f"{key:>9} | {cell(results['before'][0], key):>16} | {cell(results['after'][0], key):>14} | "
              f"{cell(results['before'][1], key):>15} | {cell(results['after'][1], key):>14}")
    for name in ("before", "after"):
        rates, _, false_positives, ms = results[name]
        hit = sum(h for h, _ in rates.values())
        count = sum(c for _, c in rates.values())
        print(f"{name}: {hit}/{count} faces found, {false_positives} false positives, {ms:.1f} ms per image "
              f"({len(images)} images)")

if __name__ == "__main__":
    main()
