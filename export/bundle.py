"""Writing a bundle directory: files land under temporary names and are renamed when whole, and the manifest
is rewritten atomically after them, so an interrupted export never leaves a bundle that looks whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from facellava import __version__, contract
from facellava.atomic import write_text_atomically
from facellava.errors import FaceLlavaError

TOOL_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "gguf", "llama_cpp_python", "sentencepiece",
                 "tensorrt")


def tool_versions() -> dict[str, str]:
    """Versions of the packages an export may have used (the installed ones only)."""
    versions = {}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def checkpoint_fingerprint(checkpoint_dir: str | Path) -> str:
    """sha256 over the names and sha256s of a checkpoint's config, tokenizer and weight files (LanguageBind
    tower subdirectories included), so a bundle names exactly what it was exported from."""
    root = Path(checkpoint_dir)
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        lines.append(f"{path.relative_to(root).as_posix()} {contract.file_sha256(path)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class BundleWriter:
    """Creates or updates one bundle directory and its `manifest.json`.

    Use `staged(name)` to write a file under a temporary name (renamed to `name` when the block ends cleanly,
    deleted otherwise), `record(name, kind, **details)` to enter it with its sha256, `record_parity(name, ...)`
    for its measured figures, `forget(predicate)` to drop (and delete) entries a re-export replaces, and
    `commit()` to write the manifest.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FaceLlavaError(f"bundle path {self.path} is a file; give a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        manifest_path = self.path / contract.MANIFEST_NAME
        if manifest_path.exists():
            try:
                self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
            except json.JSONDecodeError as error:
                raise FaceLlavaError(f"{manifest_path} is not valid JSON ({error}); remove the bundle and export "
                                     "again") from None
            if self.manifest.get("schema_version") != contract.MANIFEST_SCHEMA_VERSION:
                raise FaceLlavaError(f"{manifest_path} has schema version {self.manifest.get('schema_version')}, "
                                     f"this tool writes {contract.MANIFEST_SCHEMA_VERSION}; export into a new bundle")
        else:
            self.manifest = {"schema_version": contract.MANIFEST_SCHEMA_VERSION, "files": {}, "parity": {}}
        self.manifest["created_by"] = f"facellava-edge {__version__}"
        self.manifest["contract"] = contract.contract_summary()
        self.manifest.setdefault("tools", {}).update(tool_versions())

    def set_source(self, checkpoint_dir: str | Path, **details: Any) -> None:
        """Record the checkpoint the bundle comes from. A bundle holds the exports of one checkpoint: exporting a
        different one into it is a FaceLlavaError."""
        fingerprint = checkpoint_fingerprint(checkpoint_dir)
        known = self.manifest.get("source", {}).get("checkpoint_sha256")
        if known and known != fingerprint and self.manifest.get("files"):
            raise FaceLlavaError(f"{self.path} holds exports of another checkpoint; export into a new bundle")
        source = self.manifest.setdefault("source", {})
        source.update({"checkpoint": str(Path(checkpoint_dir).resolve()), "checkpoint_sha256": fingerprint})
        source.update(details)

    @contextlib.contextmanager
    def staged(self, name: str) -> Iterator[Path]:
        """A temporary path in the bundle for the file `name`; renamed to `name` only if the block succeeds."""
        final = self.path / name
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
        try:
            yield temp
            os.replace(temp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            with contextlib.suppress(OSError):
                temp.parent.rmdir()

    def record(self, name: str, kind: str, **details: Any) -> dict[str, Any]:
        """Enter the (already renamed) file `name` in the manifest with its size and sha256."""
        path = self.path / name
        entry = {"sha256": contract.file_sha256(path), "bytes": path.stat().st_size, "kind": kind, **details}
        self.manifest["files"][name] = entry
        return entry

    def record_parity(self, name: str, figures: dict[str, Any]) -> None:
        self.manifest["parity"][name] = figures

    def forget(self, names: list[str]) -> None:
        """Drop manifest entries (and their files) that a re-export replaces or no longer produces."""
        for name in names:
            self.manifest["files"].pop(name, None)
            self.manifest["parity"].pop(name, None)
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()

    def commit(self) -> Path:
        """Write `manifest.json` atomically and return its path."""
        path = self.path / contract.MANIFEST_NAME
        write_text_atomically(path, json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")
        return path
