"""`facellava demo`: the main job on a built-in default, with no downloads."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TINY_VERSION = "tiny-v1-seed0"  # bump when model/tiny.py changes what it writes


def cache_dir() -> Path:
    """Where the demo keeps what it builds: $FACELLAVA_CACHE, else ~/.cache/facellava."""
    return Path(os.environ.get("FACELLAVA_CACHE", Path.home() / ".cache" / "facellava"))


def tiny_checkpoint() -> Path:
    """The demo's tiny checkpoint, built once and cached."""
    from facellava.model.tiny import make_tiny_checkpoint

    path = cache_dir() / TINY_VERSION
    if not (path / "config.json").is_file():
        print(f"building the tiny checkpoint in {path} ...")
        make_tiny_checkpoint(path, seed=0)
    return path


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo takes no arguments: it is the built-in default."""


def demo(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from facellava.model.cli import inspect

    checkpoint = tiny_checkpoint()
    print("The tiny checkpoint has the real architecture and input contract but RANDOM weights: its answers are "
          "noise. Point the tools at the released checkpoint (chaubeyG/FaceLLaVA, downloaded yourself) with "
          "`facellava inspect DIR --image-tower LanguageBind_Image --video-tower LanguageBind_Video_merge`.\n")
    return inspect(SimpleNamespace(checkpoint=checkpoint, image_tower=None, video_tower=None, json=False))
