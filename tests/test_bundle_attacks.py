"""The bundle as a security boundary, tried as an attacker would: a manifest, a symlink, an ONNX graph or a
journal that points outside; a bundle on read-only media or owned by another user. Each test asserts that
nothing in a sentinel directory outside the bundle was opened, written or deleted, and that the error is one
line that leaks nothing of the files outside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from facellava import contract
from facellava.bundle import JOURNAL, LOCK, VERIFIED_CACHE, Bundle, onnx_external_data
from facellava.cli import main
from facellava.errors import FaceLlavaError

QUESTION = "What emotion is shown in the picture?"
def entry_of(path: Path) -> dict:
    return {"sha256": contract.file_sha256(path), "bytes": path.stat().st_size}


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / contract.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rename_entry(manifest: dict, old: str, new: str, **fields) -> None:
    manifest["files"][new] = {**manifest["files"].pop(old), **fields}
    manifest["parity"].pop(old, None)


@pytest.fixture
def victim(tmp_path, tiny_bundle, make_sentinel):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    return bundle, make_sentinel(tmp_path / "outside", bundle)


def graph_with_external_data(source: Path, target: Path, location: str, data_file: Path) -> None:
    """`source` (weights inline) written to `target` with its weights moved into `data_file`, every tensor naming
    `location` as its external data."""
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(source))
    with open(data_file, "wb") as data:
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < 64:
                continue
            offset = data.tell()
            data.write(tensor.raw_data)
            set_external_data(tensor, location=location, offset=offset, length=len(tensor.raw_data))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
    target.write_bytes(model.SerializeToString())


def expect_refused(bundle: Path, capsys, pattern: str, sentinel, *extra: str) -> str:
    import re

    with sentinel:
        rc = main(["run", str(bundle), "--image", str(contract_photo()), *extra, QUESTION])
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert "SECRET" not in err and str((sentinel.path / "victim.gguf").stat().st_size) not in err
    return err


def contract_photo() -> Path:
    from facellava.runtime.assets import face_photo

    return face_photo()


# --- names in the manifest ----------------------------------------------------------------------------------


def test_a_name_that_climbs_out_is_refused(victim, capsys):
    bundle, sentinel = victim
    stats = entry_of(sentinel.path / "victim.gguf")
    edit_manifest(bundle, lambda m: rename_entry(m, "llm-f32.gguf", "../outside/victim.gguf", **stats))
    expect_refused(bundle, capsys, r"'\.\./outside/victim\.gguf' is not a plain name inside the bundle", sentinel)


def test_an_absolute_name_is_refused(victim, capsys):
    bundle, sentinel = victim
    target = str(sentinel.path / "victim.gguf")
    edit_manifest(bundle, lambda m: rename_entry(m, "llm-f32.gguf", target, **entry_of(Path(target))))
    expect_refused(bundle, capsys, r"is not a plain name inside the bundle", sentinel)


def test_a_symlinked_file_is_refused(victim, capsys):
    bundle, sentinel = victim
    (bundle / "llm-f32.gguf").unlink()
    (bundle / "llm-f32.gguf").symlink_to(sentinel.path / "victim.gguf")
    edit_manifest(bundle, lambda m: m["files"]["llm-f32.gguf"].update(entry_of(sentinel.path / "victim.gguf")))
    expect_refused(bundle, capsys, r"llm-f32\.gguf leads outside the bundle", sentinel)


def test_a_symlinked_folder_is_refused(victim, capsys):
    bundle, sentinel = victim
    (bundle / "sub").symlink_to(sentinel.path)
    edit_manifest(bundle, lambda m: rename_entry(m, "llm-f32.gguf", "sub/victim.gguf",
                                                 **entry_of(sentinel.path / "victim.gguf")))
    expect_refused(bundle, capsys, r"sub/victim\.gguf leads outside the bundle", sentinel)


def test_a_symlinked_manifest_is_refused(victim, capsys):
    bundle, sentinel = victim
    shutil.copyfile(bundle / contract.MANIFEST_NAME, bundle / "copy.json")
    (bundle / contract.MANIFEST_NAME).unlink()
    sentinel_manifest = Path(tempfile.mkdtemp(dir=bundle.parent)) / "manifest.json"
    shutil.move(bundle / "copy.json", sentinel_manifest)
    (bundle / contract.MANIFEST_NAME).symlink_to(sentinel_manifest)
    expect_refused(bundle, capsys, r"manifest\.json leads outside the bundle", sentinel)


def test_a_symlink_inside_the_bundle_is_followed(victim):
    bundle, _ = victim
    (bundle / "store").mkdir()
    shutil.move(bundle / "llm-f32.gguf", bundle / "store" / "llm-f32.gguf")
    (bundle / "llm-f32.gguf").symlink_to("store/llm-f32.gguf")
    assert Bundle.open(bundle).path_of("llm-f32.gguf") == Path(os.path.realpath(bundle / "store" / "llm-f32.gguf"))


# --- ONNX external data --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["climbs", "absolute", "symlink", "undeclared"])
def test_external_data_outside_or_undeclared_is_refused(victim, capsys, where):
    bundle, sentinel = victim
    graph = bundle / "vision_image.onnx"
    data = sentinel.path / "victim.onnx.data"
    location = {"climbs": "../outside/victim.onnx.data", "absolute": str(data),
                "symlink": "vision_image.onnx.data", "undeclared": "stray.data"}[where]
    graph_with_external_data(sentinel.path / "victim.onnx", graph, location, data)
    sentinel.before = sentinel.snapshot()
    declared: list[str] = []
    if where == "symlink":
        (bundle / "vision_image.onnx.data").symlink_to(data)
        declared = ["vision_image.onnx.data"]
    if where == "undeclared":
        shutil.copyfile(data, bundle / "stray.data")

    def change(manifest):
        manifest["files"]["vision_image.onnx"].update(entry_of(graph), external_data=declared)
        if declared:
            manifest["files"]["vision_image.onnx.data"] = {**entry_of(data), "kind": "data",
                                                           "part_of": "vision_image.onnx"}

    edit_manifest(bundle, change)
    pattern = "leads outside the bundle" if where == "symlink" else "names external data .* does not declare"
    expect_refused(bundle, capsys, pattern, sentinel)


def test_declared_external_data_inside_the_bundle_works(tmp_path, tiny_bundle):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    graph = bundle / "vision_image.onnx"
    graph_with_external_data(graph, graph, "vision_image.onnx.data", bundle / "vision_image.onnx.data")

    def change(manifest):
        manifest["files"]["vision_image.onnx"].update(entry_of(graph), external_data=["vision_image.onnx.data"])
        manifest["files"]["vision_image.onnx.data"] = {**entry_of(bundle / "vision_image.onnx.data"),
                                                       "kind": "data", "part_of": "vision_image.onnx"}

    edit_manifest(bundle, change)
    assert onnx_external_data(graph) and set(onnx_external_data(graph)) == {"vision_image.onnx.data"}
    assert Bundle.open(bundle).path_of("vision_image.onnx") == graph.resolve()
    result = subprocess.run([sys.executable, "-m", "facellava", "run", str(bundle), "--image", str(contract_photo()),
                             "--max-tokens", "3", "--json", QUESTION], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_a_garbage_graph_with_a_matching_hash_is_one_line(victim, capsys):
    bundle, sentinel = victim
    graph = bundle / "vision_image.onnx"
    graph.write_bytes(b"\xff" * 1000)
    edit_manifest(bundle, lambda m: m["files"]["vision_image.onnx"].update(entry_of(graph)))
    expect_refused(bundle, capsys, r"vision_image\.onnx is not an ONNX graph", sentinel)


# --- writers ------------------------------------------------------------------------------------------------


def test_a_journal_that_points_outside_is_refused(victim, capsys):
    bundle, sentinel = victim
    manifest = json.loads((bundle / contract.MANIFEST_NAME).read_text())
    (bundle / JOURNAL).write_text(json.dumps({"staging": ".staging-x", "moves": [],
                                              "deletes": ["../outside/victim.gguf"], "manifest": manifest}))
    expect_refused(bundle, capsys, r"\.commit\.json is damaged", sentinel)


def test_export_replaces_a_symlinked_graph_without_touching_its_target(victim, tiny_checkpoint):
    from facellava.export.vision import export_vision

    bundle, sentinel = victim
    (bundle / "vision_image.onnx").unlink()
    (bundle / "vision_image.onnx").symlink_to(sentinel.path / "victim.onnx")
    with sentinel:
        export_vision(tiny_checkpoint, bundle, modalities="image", precisions="fp32", landmarks=True,
                      progress=False, seed=1)
    assert not (bundle / "vision_image.onnx").is_symlink()
    assert Bundle.open(bundle).verify_all()


# --- read-only bundles and other users' bundles -------------------------------------------------------------


def _world_readable_copy(tiny_bundle: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix="facellava-ro-"))
    root.chmod(0o755)
    bundle = Path(shutil.copytree(tiny_bundle, root / "bundle", ignore=shutil.ignore_patterns(VERIFIED_CACHE, LOCK)))
    for path in [bundle, *bundle.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return bundle


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as another user")
def test_a_bundle_the_user_cannot_write_runs_and_is_left_unchanged(tiny_bundle):
    bundle = _world_readable_copy(tiny_bundle)
    home = Path(tempfile.mkdtemp(prefix="facellava-home-"))
    (home / ".cache").mkdir()
    for folder in (home, home / ".cache"):  # the child imports as root (which makes caches here), then drops root
        folder.chmod(0o777)
    before = sorted(p.name for p in bundle.rglob("*"))
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    env.pop("FACELLAVA_CACHE", None)
    # the interpreter lives under /root, which the other user cannot read: import everything, then drop root
    child = ("import os, sys, facellava.cli, facellava.runtime.cli, facellava.runtime.pipeline, llama_cpp, "
             "onnxruntime, mediapipe, cv2, PIL.Image, json, encodings.idna; os.setgroups([]); os.setgid(65534); "
             "os.setuid(65534); sys.exit(facellava.cli.main(sys.argv[1:]))")
    command = [sys.executable, "-c", child, "run", str(bundle), "--image", str(contract_photo()),
               "--max-tokens", "3", "--json", QUESTION]
    try:
        for _ in range(2):  # the second run finds the hashes in the user's cache
            result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
            assert result.returncode == 0, result.stderr
            assert "Traceback" not in result.stderr
        assert sorted(p.name for p in bundle.rglob("*")) == before
        assert list((home / ".cache" / "facellava" / "verified").glob("*.json")), [str(p) for p in home.rglob("*")]
    finally:
        shutil.rmtree(bundle.parent, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the bundle to another user")
def test_a_bundle_owned_by_another_user_gets_nothing_written_into_it(tiny_bundle, tmp_path, monkeypatch):
    bundle = _world_readable_copy(tiny_bundle)
    monkeypatch.setenv("FACELLAVA_CACHE", str(tmp_path / "cache"))
    try:
        for path in [bundle, *bundle.rglob("*")]:
            os.chown(path, 65534, 65534)
        before = sorted(p.name for p in bundle.rglob("*"))
        opened = Bundle.open(bundle)
        assert opened.verify_all()
        assert sorted(p.name for p in bundle.rglob("*")) == before
        assert list((tmp_path / "cache" / "verified").glob("*.json"))
        # an unfinished commit in someone else's bundle is not ours to finish
        (bundle / JOURNAL).write_text("{}")
        with pytest.raises(FaceLlavaError, match="unfinished commit"):
            Bundle.open(bundle)
    finally:
        shutil.rmtree(bundle.parent, ignore_errors=True)


def _read_only_mount(source: Path, target: Path) -> bool:
    target.mkdir()
    steps = [["mount", "--bind", str(source), str(target)], ["mount", "-o", "remount,ro,bind", str(target)]]
    for step in steps:
        if shutil.which(step[0]) is None or subprocess.run(step, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True)
            return False
    return True


def test_a_read_only_mount_runs(tiny_bundle, tmp_path, monkeypatch):
    bundle = tmp_path / "ro"
    if os.geteuid() != 0 or not _read_only_mount(tiny_bundle, bundle):
        pytest.skip("a read-only bind mount needs root and mount permission in this sandbox")
    monkeypatch.setenv("FACELLAVA_CACHE", str(tmp_path / "cache"))
    try:
        assert Bundle.open(bundle).verify_all()
        with pytest.raises(OSError):
            (bundle / "probe").write_text("x")
    finally:
        subprocess.run(["umount", str(bundle)], capture_output=True)
