"""The README's first command's main job, `facellava demo`, from an empty cache, as a new user runs it."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_from_an_empty_cache_and_then_from_the_cache(tmp_path):
    env = {**os.environ, "FACELLAVA_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "facellava", "demo", "--max-tokens", "6"]
    first = subprocess.run(command, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    out = first.stdout
    assert "RANDOM weights" in out and "\nA: " in out
    assert "landmarks: face mesh; vision backend: onnxruntime" in out and "time to first token" in out
    for name in ("llm-f32.gguf", "llm-q8_0.gguf", "vision_image.onnx", "vision_video_nolm.onnx"):
        assert f"  {name}: " in out and out.split(f"  {name}: ")[1].split("\n")[0].endswith("passed True"), name
    assert "Traceback" not in first.stderr
    again = subprocess.run(command, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "exporting" not in again.stdout  # the bundle is reused
    assert again.stdout.split("\nA: ")[1].split("\n")[0] == out.split("\nA: ")[1].split("\n")[0]

    # a bundle cached before the front end's graphs existed gets them added, and answers alike
    from facellava.bundle import Bundle, BundleWriter
    from facellava.demo import TINY_VERSION
    from facellava.runtime.face_graphs import FRONT_END_FILES, has_front_end_graphs

    bundle = tmp_path / "cache" / f"{TINY_VERSION}-bundle"
    with BundleWriter.transaction(bundle) as writer:
        for name in FRONT_END_FILES.values():
            writer.remove(name)
    assert not has_front_end_graphs(Bundle.open(bundle))
    old = subprocess.run(command, capture_output=True, text=True, env=env)
    assert old.returncode == 0 and "adding the face front end's graphs" in old.stdout, old.stderr[-2000:]
    assert has_front_end_graphs(Bundle.open(bundle))
    assert old.stdout.split("\nA: ")[1].split("\n")[0] == out.split("\nA: ")[1].split("\n")[0]
