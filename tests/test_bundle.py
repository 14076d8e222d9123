"""Bundles: written atomically by BundleWriter, refused by the runtime when missing, altered or foreign."""

from __future__ import annotations

import json
import os

import pytest

from facellava import contract
from facellava.errors import FaceLlavaError
from facellava.export.bundle import BundleWriter
from facellava.runtime.bundle import VERIFIED_CACHE, Bundle


@pytest.fixture
def bundle_dir(tmp_path, tiny_checkpoint):
    writer = BundleWriter(tmp_path / "bundle")
    writer.set_source(tiny_checkpoint, llm={"hidden_size": 256})
    with writer.staged("llm-f32.gguf") as path:
        path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    writer.record("llm-f32.gguf", "llm", type="f32")
    with writer.staged("vision_image.onnx") as path:
        path.write_bytes(b"onnx graph bytes" * 10)
    writer.record("vision_image.onnx", "vision", modality="image", precision="fp32", landmarks=True)
    writer.record_parity("vision_image.onnx", {"cosine": 1.0, "passed": True})
    writer.commit()
    return writer.path


def test_a_whole_bundle_opens_and_verifies(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    assert bundle.find("llm", type="f32") == ["llm-f32.gguf"]
    assert bundle.find("vision", modality="image", landmarks=True) == ["vision_image.onnx"]
    assert bundle.find("vision", modality="video") == []
    assert bundle.path_of("llm-f32.gguf").read_bytes().startswith(b"GGUF")
    manifest = json.loads((bundle_dir / contract.MANIFEST_NAME).read_text())
    assert set(contract.MANIFEST_KEYS) <= set(manifest)
    assert manifest["files"]["llm-f32.gguf"]["sha256"] == contract.file_sha256(bundle_dir / "llm-f32.gguf")
    assert len(manifest["source"]["checkpoint_sha256"]) == 64
    assert not any(p.name.startswith(".") and p.name != VERIFIED_CACHE for p in bundle_dir.iterdir())


def test_an_altered_file_is_refused_even_after_an_earlier_verification(bundle_dir):
    Bundle.open(bundle_dir).path_of("llm-f32.gguf")  # verified and remembered
    path = bundle_dir / "llm-f32.gguf"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, one byte changed
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    with pytest.raises(FaceLlavaError, match="does not match its manifest sha256"):
        Bundle.open(bundle_dir).path_of("llm-f32.gguf")


def test_missing_and_resized_files(bundle_dir):
    (bundle_dir / "vision_image.onnx").unlink()
    with pytest.raises(FaceLlavaError, match="vision_image.onnx is missing"):
        Bundle.open(bundle_dir).path_of("vision_image.onnx")
    with open(bundle_dir / "llm-f32.gguf", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(FaceLlavaError, match="bytes, its manifest says"):
        Bundle.open(bundle_dir).path_of("llm-f32.gguf")


def test_foreign_or_broken_bundles(tmp_path, bundle_dir):
    with pytest.raises(FaceLlavaError, match="does not exist"):
        Bundle.open(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FaceLlavaError, match="not an exported bundle"):
        Bundle.open(empty)
    manifest_path = bundle_dir / contract.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["contract"]["image_tokens"] = 576
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FaceLlavaError, match="other contract values"):
        Bundle.open(bundle_dir)
    manifest["schema_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FaceLlavaError, match="schema version 99"):
        Bundle.open(bundle_dir)


def test_writer_stages_atomically_and_refuses_a_file_path(tmp_path, bundle_dir):
    writer = BundleWriter(bundle_dir)
    with pytest.raises(RuntimeError), writer.staged("vision_video.onnx") as path:
        path.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not (bundle_dir / "vision_video.onnx").exists()
    assert not [p for p in bundle_dir.rglob(".*") if p.name != VERIFIED_CACHE]
    writer.forget(["vision_image.onnx"])
    writer.commit()
    assert not (bundle_dir / "vision_image.onnx").exists()
    assert "vision_image.onnx" not in json.loads((bundle_dir / contract.MANIFEST_NAME).read_text())["files"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FaceLlavaError, match="is a file"):
        BundleWriter(a_file)
