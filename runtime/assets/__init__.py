"""Data shipped with the runtime. Importing this loads nothing heavy (no OpenCV, no MediaPipe)."""

from importlib import resources
from pathlib import Path


def face_photo() -> Path:
    """The public-domain portrait the package ships (NASA's Eileen Collins, as scikit-image distributes it): what
    the demo, the parity checks, the bench and the synthetic data use by default."""
    return Path(str(resources.files(__name__) / "astronaut.jpg"))
