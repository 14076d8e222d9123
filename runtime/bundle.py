"""Reading an exported bundle on the device: the manifest, its contract, and the files' hashes.

A bundle is refused, with one clear line, when its manifest is missing or from another schema, when it was
exported against different contract constants, or when a file it uses is missing or does not match its sha256.
Hashing a multi-GB GGUF takes seconds, so a verified file's (size, mtime, sha256) is remembered in
`.verified.json` beside the manifest, and only files that changed since are hashed again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facellava import contract
from facellava.errors import FaceLlavaError

VERIFIED_CACHE = ".verified.json"


@dataclass
class Bundle:
    """An opened bundle: its directory and manifest. Files are verified when first used (`path_of`)."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Open a bundle directory. Raises FaceLlavaError when it is not a bundle this runtime can use."""
        directory = Path(path)
        if not directory.is_dir():
            raise FaceLlavaError(f"bundle {directory} does not exist or is not a directory")
        manifest_path = directory / contract.MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise FaceLlavaError(f"{directory} has no {contract.MANIFEST_NAME}: not an exported bundle "
                                 "(run `facellava export vision` / `facellava export llm` into it)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FaceLlavaError(f"{manifest_path} is not valid JSON ({error}); export the bundle again") from None
        if manifest.get("schema_version") != contract.MANIFEST_SCHEMA_VERSION:
            raise FaceLlavaError(f"{manifest_path} has schema version {manifest.get('schema_version')}, this runtime "
                                 f"reads {contract.MANIFEST_SCHEMA_VERSION}; export the bundle again")
        summary = contract.contract_summary()
        differing = sorted(k for k, v in summary.items() if manifest.get("contract", {}).get(k) != v)
        if differing:
            raise FaceLlavaError(f"{manifest_path} was exported with other contract values "
                                 f"({', '.join(differing)}); export the bundle again with this version")
        return cls(directory, manifest)

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("files", {})

    def find(self, kind: str, **fields: Any) -> list[str]:
        """Names of the files of this kind whose manifest entries have all the given field values."""
        return sorted(name for name, entry in self.files.items()
                      if entry.get("kind") == kind and all(entry.get(k) == v for k, v in fields.items()))

    def path_of(self, name: str) -> Path:
        """The path of a manifest file, verified against its sha256 (and its external data files, if any).
        Raises FaceLlavaError when it is missing or altered."""
        entry = self.files.get(name)
        if entry is None:
            raise FaceLlavaError(f"{self.path} has no file {name} in its manifest")
        self._verify(name, entry)
        for extra in entry.get("external_data", []) or []:
            extra_entry = self.files.get(extra)
            if extra_entry is not None:
                self._verify(extra, extra_entry)
        return self.path / name

    def _verify(self, name: str, entry: dict[str, Any]) -> None:
        path = self.path / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise FaceLlavaError(f"bundle file {name} is missing from {self.path}; export the bundle again") from None
        if stat.st_size != entry.get("bytes"):
            raise FaceLlavaError(f"bundle file {name} has {stat.st_size} bytes, its manifest says "
                                 f"{entry.get('bytes')}: the bundle was altered or damaged; export it again")
        cache = self._read_cache()
        key = [stat.st_size, stat.st_mtime_ns, entry.get("sha256")]
        if cache.get(name) == key:
            return
        if contract.file_sha256(path) != entry.get("sha256"):
            raise FaceLlavaError(f"bundle file {name} does not match its manifest sha256: the bundle was altered or "
                                 "damaged; export it again")
        cache[name] = key
        self._write_cache(cache)

    def _read_cache(self) -> dict[str, Any]:
        try:
            cache = json.loads((self.path / VERIFIED_CACHE).read_text())
            return cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_cache(self, cache: dict[str, Any]) -> None:
        # best effort: a bundle on read-only media is simply verified each time
        temp = self.path / f".{VERIFIED_CACHE}.{os.getpid()}"
        try:
            temp.write_text(json.dumps(cache))
            os.replace(temp, self.path / VERIFIED_CACHE)
        except OSError:
            temp.unlink(missing_ok=True)
