"""The front end's 68 landmarks against dlib's 68-point shape predictor, per region and per augmentation, with a
per-point offset correction fitted on some people and tested on the others (leave one person out).

    pip install dlib-bin face_recognition_models        # for measuring only: never a dependency, never shipped
    python benchmarks/landmarks_vs_dlib.py PHOTO_DIR [PHOTO_DIR ...]

dlib's predictor was trained on data whose licence excludes commercial use: it is a yardstick here, nothing of it
ships. Photos: every image in the folders (and the shipped portrait); the person is the file name's leading
letters (obama2.jpg -> obama). Each photo is augmented (none, rotation +-15/30 degrees, scale 0.5/2, brightness
0.6/1.4, blur, JPEG 20, flip), cropped by the front end, and dlib's predictor runs on the same 256 crop (on the box
of dlib's own detector, else the whole crop). Error: mean distance to dlib's points divided by dlib's outer-eye-
corner distance (NME), per region. The correction: the mean of (dlib - ours) per point, in the face's own frame
(eye axis, eye distance), each person weighing the same, mirror-symmetric, fitted on the other people's samples.
The samples are the plain mapping's (`FaceFrontEnd(landmark_correction=False)`); the offsets it prints, fitted on
everyone, are runtime/face.py's IBUG68_OFFSETS.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import re
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from facellava.contract import IBUG68_MIRROR
from facellava.errors import FaceLlavaError
from facellava.runtime import face
from facellava.runtime.assets import face_photo

REGIONS = {"jaw": slice(0, 17), "brows": slice(17, 27), "nose": slice(27, 36), "eyes": slice(36, 48),
           "mouth": slice(48, 68)}
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def augmentations(rgb: np.ndarray) -> dict[str, np.ndarray]:
    height, width = rgb.shape[:2]

    def turn(angle: float) -> np.ndarray:
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        return cv2.warpAffine(rgb, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE)

    def jpeg(quality: int) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
        return np.asarray(Image.open(buffer).convert("RGB"))

    return {
        "none": rgb, "rot-15": turn(-15), "rot+15": turn(15), "rot-30": turn(-30), "rot+30": turn(30),
        "scale0.5": cv2.resize(rgb, (width // 2, height // 2), interpolation=cv2.INTER_AREA),
        "scale2": cv2.resize(rgb, (width * 2, height * 2), interpolation=cv2.INTER_CUBIC),
        "dark0.6": np.clip(rgb * 0.6, 0, 255).astype(np.uint8),
        "bright1.4": np.clip(rgb * 1.4, 0, 255).astype(np.uint8),
        "blur": cv2.GaussianBlur(rgb, (0, 0), 2.0), "jpeg20": jpeg(20),
        "flip": np.ascontiguousarray(rgb[:, ::-1]),
    }


def face_frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(origin, 2x2 rotation to the face frame, eye distance) from the outer eye corners 36 and 45."""
    left, right = points[36], points[45]
    axis = right - left
    distance = float(np.linalg.norm(axis))
    c, s = axis / distance
    return (left + right) / 2, np.array([[c, s], [-s, c]]), distance


def nme(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-point distance divided by the reference's outer-eye-corner distance."""
    return np.linalg.norm(ours - reference, axis=1) / np.linalg.norm(reference[36] - reference[45])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help="folders of face photos (file name = person)")
    args = parser.parse_args()
    # the model file is found without importing face_recognition_models (its __init__ needs pkg_resources)
    models = importlib.util.find_spec("face_recognition_models")
    try:
        import dlib
    except ImportError:
        dlib = None
    if dlib is None or models is None:
        sys.exit("this benchmark needs dlib and its 68-point model: pip install dlib-bin face_recognition_models")
    model = Path(models.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(model))

    photos = [("collins", face_photo())]
    for folder in args.folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in SUFFIXES:
                photos.append((re.match(r"[a-zA-Z]+", path.stem).group(0).lower(), path))

    samples = []  # (person, augmentation, ours [68, 2] without the shipped correction, dlib [68, 2]) in crop pixels
    with face.FaceFrontEnd(landmark_correction=False) as front_end:
        for person, path in photos:
            for name, image in augmentations(face.load_image(path)).items():
                try:
                    found = front_end.process_image(image)
                except FaceLlavaError:
                    print(f"{path.name} {name}: no face found", file=sys.stderr)
                    continue
                if found.landmarks is None:
                    continue
                rects = detector(found.crop, 1)
                rect = max(rects, key=lambda r: r.area()) if len(rects) else dlib.rectangle(0, 0, 255, 255)
                shape = predictor(found.crop, rect)
                reference = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
                samples.append((person, name, found.landmarks.astype(np.float64) * 256, reference))
    people = sorted({s[0] for s in samples})
    print(f"{len(samples)} samples of {len(people)} people: " +
          ", ".join(f"{p} {sum(s[0] == p for s in samples)}" for p in people))

    mirror = list(IBUG68_MIRROR)

    def offsets(train: list) -> np.ndarray:
        """The mean residual per point in the face frame (each person weighing the same, whatever their number
        of photos), made mirror-symmetric (point i and its mirror image share one offset, x negated), as the face
        mesh mapping is."""
        per_person = defaultdict(list)
        for person, _, ours, reference in train:
            _, rotation, distance = face_frame(ours)
            per_person[person].append((reference - ours) @ rotation.T / distance)
        mean = np.mean([np.mean(residuals, axis=0) for residuals in per_person.values()], axis=0)
        return (mean + mean[mirror] * np.array([-1.0, 1.0])) / 2

    def corrected(ours: np.ndarray, offset: np.ndarray) -> np.ndarray:
        _, rotation, distance = face_frame(ours)
        return ours + (offset * distance) @ rotation

    before, after = defaultdict(list), defaultdict(list)
    for held_out in people:
        offset = offsets([s for s in samples if s[0] != held_out])
        for person, name, ours, reference in samples:
            if person != held_out:
                continue
            for table, points in ((before, ours), (after, corrected(ours, offset))):
                error = nme(points, reference)
                table[("all", name)].append(error.mean())
                table[("person", person)].append(error.mean())
                for region, part in REGIONS.items():
                    table[(region, "all")].append(error[part].mean())
    everyone = offsets(samples)
    print("the offsets fitted on all of them (x, y per point, face frame):")
    print(",\n".join(f"    ({x:+.4f}, {y:+.4f})" for x, y in everyone))
    chin = defaultdict(list)  # how far below dlib's the lowest jaw point lies, in eye distances
    for person, _, ours, reference in samples:
        distance = np.linalg.norm(reference[36] - reference[45])
        chin[person].append(((ours[:17, 1].max() - reference[:17, 1].max()) / distance,
                             (corrected(ours, offsets([s for s in samples if s[0] != person]))[:17, 1].max()
                              - reference[:17, 1].max()) / distance))
    print("lowest jaw point below dlib's (% of the eye distance), before -> after, held out: " + ", ".join(
        f"{p} {100 * np.mean([a for a, _ in v]):+.1f} -> {100 * np.mean([b for _, b in v]):+.1f}"
        for p, v in sorted(chin.items())))
    print("\nNME (% of the outer-eye-corner distance), leave one person out: before -> after the offset")
    print("regions: " + ", ".join(
        f"{region} {100 * np.mean(before[(region, 'all')]):.1f} -> {100 * np.mean(after[(region, 'all')]):.1f}"
        for region in REGIONS))
    mean_before = np.mean([v for k, vs in before.items() if k[0] == "all" for v in vs])
    mean_after = np.mean([v for k, vs in after.items() if k[0] == "all" for v in vs])
    print(f"all points: {100 * mean_before:.1f} -> {100 * mean_after:.1f}")
    print("per person: " + ", ".join(
        f"{p} {100 * np.mean(before[('person', p)]):.1f} -> {100 * np.mean(after[('person', p)]):.1f}"
        for p in people))
    print("per augmentation: " + ", ".join(
        f"{k[1]} {100 * np.mean(v):.1f} -> {100 * np.mean(after[k]):.1f}" for k, v in before.items()
        if k[0] == "all"))


if __name__ == "__main__":
    main()
