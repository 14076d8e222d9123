"""The bundle module: one transaction for every writer, a typed manifest read by one reader, hashes checked once
and remembered, dependants removed with what they depend on."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from facellava import contract
from facellava.bundle import JOURNAL, LOCK, STAGING_PREFIX, VERIFIED_CACHE, Bundle, BundleWriter, Manifest
from facellava.errors import FaceLlavaError

BOOKKEEPING = {LOCK, VERIFIED_CACHE}
GGUF_BYTES = b"GGUF" + bytes(range(256)) * 8
ONNX_BYTES = b"onnx graph bytes" * 10


def write_bundle(path, checkpoint=None, **files: bytes):
    """A bundle of made-up files (`name=bytes`, `__` for `/`) in one transaction."""
    with BundleWriter.transaction(path) as tx:
        if checkpoint is not None:
            tx.set_source(checkpoint, llm={"hidden_size": 256})
        for key, data in files.items():
            name = key.replace("__", "/")
            tx.stage(name).write_bytes(data)
            tx.add(name, "data")
    return path


@pytest.fixture
def bundle_dir(tmp_path, tiny_checkpoint):
    with BundleWriter.transaction(tmp_path / "bundle") as tx:
        tx.set_source(tiny_checkpoint, llm={"hidden_size": 256})
        tx.stage("llm-f32.gguf").write_bytes(GGUF_BYTES)
        tx.add("llm-f32.gguf", "llm", type="f32")
        tx.stage("vision_image.onnx").write_bytes(ONNX_BYTES)
        tx.add("vision_image.onnx", "vision", modality="image", precision="fp32", landmarks=True,
               parity={"cosine": 1.0, "passed": True})
    return tmp_path / "bundle"


def names_in(path):
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


def test_a_whole_bundle_opens_and_verifies(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    assert bundle.find("llm", type="f32") == ["llm-f32.gguf"]
    assert bundle.find("vision", modality="image", landmarks=True) == ["vision_image.onnx"]
    assert bundle.find("vision", modality="video") == []
    assert bundle.path_of("llm-f32.gguf").read_bytes() == GGUF_BYTES
    manifest = json.loads((bundle_dir / contract.MANIFEST_NAME).read_text())
    assert set(contract.MANIFEST_KEYS) <= set(manifest)
    assert manifest["files"]["llm-f32.gguf"]["sha256"] == contract.file_sha256(bundle_dir / "llm-f32.gguf")
    assert manifest["parity"]["vision_image.onnx"] == {"cosine": 1.0, "passed": True}
    assert len(manifest["source"]["checkpoint_sha256"]) == 64
    assert names_in(bundle_dir) == {contract.MANIFEST_NAME, "llm-f32.gguf", "vision_image.onnx", *BOOKKEEPING}


def test_an_altered_file_is_refused_even_with_its_size_and_mtime_kept(bundle_dir):
    Bundle.open(bundle_dir).path_of("llm-f32.gguf")  # verified and remembered
    path = bundle_dir / "llm-f32.gguf"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, one byte changed, the same mtime set back: only ctime tells
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(FaceLlavaError, match="does not match its manifest sha256"):
        Bundle.open(bundle_dir).path_of("llm-f32.gguf")


def test_missing_resized_and_unlisted_files(bundle_dir):
    (bundle_dir / "vision_image.onnx").unlink()
    with pytest.raises(FaceLlavaError, match="vision_image.onnx is missing"):
        Bundle.open(bundle_dir).path_of("vision_image.onnx")
    with open(bundle_dir / "llm-f32.gguf", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(FaceLlavaError, match="bytes, its manifest says"):
        Bundle.open(bundle_dir).path_of("llm-f32.gguf")
    with pytest.raises(FaceLlavaError, match="has no file 'other.gguf'"):
        Bundle.open(bundle_dir).path_of("other.gguf")


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
    with pytest.raises(FaceLlavaError, match=r"other contract values \(image_tokens\); export into a new bundle"):
        BundleWriter.transaction(bundle_dir).__enter__()
    manifest["schema_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FaceLlavaError, match="schema version 99"):
        Bundle.open(bundle_dir)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: [], r"the top level must be an object"),
    (lambda m: {**m, "files": "x"}, r"files must be an object"),
    (lambda m: {**m, "files": {"a.gguf": []}}, r"files\['a.gguf'\] must be an object"),
    (lambda m: {**m, "files": {"a.gguf": {"sha256": "0" * 64, "bytes": 1}}}, r"files\['a.gguf'\].kind must be present"),
    (lambda m: {**m, "files": {"a.gguf": {"sha256": "0" * 64, "bytes": -1, "kind": "llm", "type": "f32"}}},
     r"files\['a.gguf'\].bytes must be a non-negative integer"),
    (lambda m: {**m, "files": {"a.gguf": {"sha256": "xyz", "bytes": 1, "kind": "llm", "type": "f32"}}},
     r"files\['a.gguf'\].sha256 must be 64 lower-case hex digits"),
    (lambda m: {**m, "files": {"a.onnx": {"sha256": "0" * 64, "bytes": 1, "kind": "vision", "modality": "audio",
                                          "precision": "fp32", "landmarks": True}}},
     r"files\['a.onnx'\].modality must be image or video"),
    (lambda m: {**m, "files": {"a.onnx": {"sha256": "0" * 64, "bytes": 1, "kind": "vision", "modality": "image",
                                          "precision": "fp32", "landmarks": "yes"}}},
     r"files\['a.onnx'\].landmarks must be true or false"),
    (lambda m: {**m, "files": {"a.onnx": {"sha256": "0" * 64, "bytes": 1, "kind": "data",
                                          "external_data": ["b.data"]}}},
     r"files\['a.onnx'\].external_data must be names of files in the manifest"),
    (lambda m: {**m, "parity": {"a": 3}}, r"parity\['a'\] must be an object"),
    (lambda m: {**m, "source": {"checkpoint": 5}}, r"source.checkpoint must be a path"),
    (lambda m: {**m, "files": {"../x.gguf": {"sha256": "0" * 64, "bytes": 1, "kind": "data"}}},
     r"files key '../x.gguf' is not a plain name inside the bundle"),
    (lambda m: {**m, "files": {"/etc/passwd": {"sha256": "0" * 64, "bytes": 1, "kind": "data"}}},
     r"'/etc/passwd' is not a plain name inside the bundle"),
    (lambda m: {**m, "files": {"a.data": {"sha256": "0" * 64, "bytes": 1, "kind": "data", "part_of": "a/../../b"}}},
     r"part_of 'a/../../b' is not a plain name"),
])
def test_a_malformed_manifest_is_one_line_naming_the_field(bundle_dir, change, message):
    manifest_path = bundle_dir / contract.MANIFEST_NAME
    manifest_path.write_text(json.dumps(change(json.loads(manifest_path.read_text()))))
    with pytest.raises(FaceLlavaError, match=message) as caught:
        Bundle.open(bundle_dir)
    assert "\n" not in str(caught.value)
    with pytest.raises(FaceLlavaError, match=message):  # writers read through the same reader
        BundleWriter.transaction(bundle_dir).__enter__()


@pytest.mark.parametrize("text", [b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"schema_version": NaN}'])
def test_a_manifest_that_is_not_json_is_one_line(bundle_dir, text):
    (bundle_dir / contract.MANIFEST_NAME).write_bytes(text)
    with pytest.raises(FaceLlavaError) as caught:
        Bundle.open(bundle_dir)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_a_failed_transaction_changes_nothing(bundle_dir):
    before = {name: (bundle_dir / name).read_bytes() for name in names_in(bundle_dir) if name != LOCK}
    with pytest.raises(RuntimeError), BundleWriter.transaction(bundle_dir) as tx:
        tx.stage("vision_video.onnx").write_bytes(b"half")
        tx.add("vision_video.onnx", "vision", modality="video", precision="fp32", landmarks=True)
        tx.remove("llm-f32.gguf")
        raise RuntimeError("interrupted")
    assert {name: (bundle_dir / name).read_bytes() for name in names_in(bundle_dir) if name != LOCK} == before


def test_remove_and_replace(bundle_dir, tmp_path):
    with BundleWriter.transaction(bundle_dir) as tx:
        tx.remove("vision_image.onnx")
        tx.stage("llm-f32.gguf").write_bytes(b"GGUF new")
        tx.add("llm-f32.gguf", "llm", type="f32")
    assert names_in(bundle_dir) == {contract.MANIFEST_NAME, "llm-f32.gguf", *BOOKKEEPING}
    opened = Bundle.open(bundle_dir)
    assert opened.path_of("llm-f32.gguf").read_bytes() == b"GGUF new"
    assert set(opened.manifest.parity) == set()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FaceLlavaError, match="is a file"):
        BundleWriter.transaction(a_file).__enter__()
    with pytest.raises(FaceLlavaError, match="not a bundle"):
        BundleWriter.transaction(tmp_path / "new", create=False).__enter__()
    assert not (tmp_path / "new").exists()


def test_dependants_go_with_what_they_depend_on(tmp_path):
    bundle = tmp_path / "bundle"
    engine = "engines/gpu-trt10.3/vision_image.engine"

    def add_graph(tx, data: bytes) -> None:
        tx.stage("vision_image.onnx").write_bytes(data)
        tx.stage("vision_image.onnx.data").write_bytes(b"weights" + data)
        tx.add("vision_image.onnx.data", "data", part_of="vision_image.onnx")
        tx.add("vision_image.onnx", "vision", modality="image", precision="fp32", landmarks=True,
               external_data=["vision_image.onnx.data"])

    with BundleWriter.transaction(bundle) as tx:
        add_graph(tx, b"graph 1")
        tx.stage("vision_image.int8.onnx").write_bytes(b"int8")
        tx.add("vision_image.int8.onnx", "vision", modality="image", precision="int8", landmarks=True,
               source="vision_image.onnx")
        tx.stage(engine).write_bytes(b"engine")
        tx.add(engine, "engine", modality="image", precision="int8", landmarks=True, source="vision_image.int8.onnx")
        tx.stage(f"{engine}.json").write_text("{}")
        tx.add(f"{engine}.json", "data", part_of=engine)
    everything = set(Bundle.open(bundle).files)
    assert len(everything) == 5

    with BundleWriter.transaction(bundle) as tx:  # the same bytes again: nothing that depends on them goes
        add_graph(tx, b"graph 1")
    assert set(Bundle.open(bundle).files) == everything

    with BundleWriter.transaction(bundle) as tx:  # new bytes: the INT8 graph, its engine and sidecar go
        add_graph(tx, b"graph 2")
    assert set(Bundle.open(bundle).files) == {"vision_image.onnx", "vision_image.onnx.data"}
    assert names_in(bundle) == {contract.MANIFEST_NAME, "vision_image.onnx", "vision_image.onnx.data",
                                *BOOKKEEPING}  # the engine folders left empty are gone too

    with BundleWriter.transaction(bundle) as tx:  # removing a graph removes its external data
        tx.remove("vision_image.onnx")
    assert names_in(bundle) == {contract.MANIFEST_NAME, *BOOKKEEPING}


def test_killed_runs_are_cleaned_and_interrupted_commits_finished(bundle_dir):
    stale = bundle_dir / f"{STAGING_PREFIX}killed"
    stale.mkdir()
    (stale / "llm-q8_0.gguf").write_bytes(b"gigabytes")
    with BundleWriter.transaction(bundle_dir):
        pass
    assert not stale.exists()

    # a commit killed after its journal: the next open finishes it
    staging = bundle_dir / f"{STAGING_PREFIX}x"
    staging.mkdir()
    (staging / "llm-q8_0.gguf").write_bytes(b"GGUF q8")
    manifest = json.loads((bundle_dir / contract.MANIFEST_NAME).read_text())
    manifest["files"]["llm-q8_0.gguf"] = {"sha256": contract.file_sha256(staging / "llm-q8_0.gguf"), "bytes": 7,
                                          "kind": "llm", "type": "q8_0"}
    del manifest["files"]["vision_image.onnx"]
    (bundle_dir / JOURNAL).write_text(json.dumps({"staging": staging.name, "moves": ["llm-q8_0.gguf"],
                                                  "deletes": ["vision_image.onnx"], "manifest": manifest}))
    opened = Bundle.open(bundle_dir)
    assert set(opened.files) == {"llm-f32.gguf", "llm-q8_0.gguf"}
    assert opened.verify_all() == ["llm-f32.gguf", "llm-q8_0.gguf"]
    assert names_in(bundle_dir) == {contract.MANIFEST_NAME, "llm-f32.gguf", "llm-q8_0.gguf", *BOOKKEEPING}


def test_one_writer_at_a_time(bundle_dir):
    with BundleWriter.transaction(bundle_dir):
        with pytest.raises(FaceLlavaError, match="another facellava command is writing"):
            BundleWriter.transaction(bundle_dir).__enter__()
        assert set(Bundle.open(bundle_dir).files) == {"llm-f32.gguf", "vision_image.onnx"}  # readers go on


def test_another_checkpoint_is_refused(bundle_dir, tmp_path, tiny_checkpoint):
    other = shutil.copytree(tiny_checkpoint, tmp_path / "other")
    (other / "config.json").write_text((other / "config.json").read_text() + " ")
    with pytest.raises(FaceLlavaError, match="holds exports of another checkpoint"), \
            BundleWriter.transaction(bundle_dir) as tx:
        tx.set_source(other)


def test_the_manifest_round_trips(bundle_dir):
    manifest = Bundle.open(bundle_dir).manifest
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest
