"""Data shipped with the runtime. Importing this loads nothing heavy (no OpenCV, no MediaPipe)."""

from importlib import resources
from pathlib import Path


def face_photo() -> Path:
    """The public-domain portrait the package ships (NASA's Eileen Collins, as scikit-image distributes it): what
    the demo, the parity checks, the bench and the synthetic data use by default."""
    return Path(str(resources.files(__name__) / "astronaut.jpg"))


def face_photo_record() -> dict:
    """What the real face front end made of `face_photo()` (`facellava.export.parity.front_end_record`, shipped as
    astronaut_face.npz so that its users need no MediaPipe): {"photo_sha256": str array, "image_box": int32 [4]
    (x, y, width, height), "image_landmarks": float32 [68, 2] (crop pixels / 256), "video_boxes": [8, 4] and
    "video_landmarks": [8, 68, 2] of the photograph's drifting frames (`export.parity.drifting_frames`)}."""
    import numpy as np

    with np.load(Path(str(resources.files(__name__) / "astronaut_face.npz")), allow_pickle=False) as shipped:
        return {name: shipped[name] for name in shipped.files}
