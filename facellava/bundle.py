"""The bundle: one directory, its `manifest.json`, and the only code that reads or changes either.

The bundle is the project's security boundary: every tool that runs on a device trusts it, and a stranger may
have touched it. So:

- **Names.** A manifest names files by plain relative names (`llm-q4_k_m.gguf`, `engines/<gpu>-trt<v>/x.plan`):
  no absolute paths, no `..` or `.` parts, no backslashes or NULs. Every path is resolved (symlinks included) and
  checked to lie inside the bundle before it is hashed, opened or deleted; an ONNX graph's external-data
  locations must be files its manifest entry declares, checked before ONNX Runtime or TensorRT sees the graph.
- **The manifest** is read by one reader (`Manifest.read`) that checks its schema and names the bad field.
- **Hashes.** A file is used only after its sha256 matches the manifest (`Bundle.path_of`). A verified file is
  remembered by (device, inode, size, mtime, ctime) in `.verified.json` when the bundle is ours and writable,
  else in a per-user cache directory, else in memory, so a multi-GB GGUF is hashed once.
- **Writing** happens in one transaction (`BundleWriter.transaction`): new files are staged in a hidden directory
  inside the bundle; the commit writes a journal (`.commit.json`: the new manifest, the moves, the deletions),
  which is the commit point, then moves the new files in, swaps the manifest, and only then deletes replaced
  files and their dependants (external data, derived graphs, engines). A kill before the journal leaves the old
  bundle; a kill after it is rolled forward by the next command that opens the bundle. Stale staging of killed
  runs is removed by the next transaction. One writer at a time (an advisory lock).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from stat import S_ISDIR
from typing import Any

from facellava import __version__, contract
from facellava.atomic import write_text_atomically
from facellava.errors import FaceLlavaError

MANIFEST_NAME = contract.MANIFEST_NAME
VERIFIED_CACHE = ".verified.json"
JOURNAL = ".commit.json"
LOCK = ".lock"
STAGING_PREFIX = ".staging-"
BOOKKEEPING = (LOCK, VERIFIED_CACHE)  # files a bundle may hold besides its manifest and the files it lists
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes; refuse to parse a giant one
FILE_KINDS = ("vision", "llm", "engine", "data", "timing_cache", "front_end", "front_end_engine")
PRECISIONS = ("fp32", "fp16", "int8")
MODALITIES = ("image", "video")
TOOL_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "gguf", "llama_cpp_python", "sentencepiece",
                 "tensorrt")


# --- names and paths ----------------------------------------------------------------------------------------


def shown(name: Any, limit: int = 80) -> str:
    """A name for an error message: its repr, cut at `limit` characters (a manifest may hold names of any length,
    and an error stays one short line)."""
    if isinstance(name, str) and len(name) > limit:
        return f"{name[:limit]!r}... ({len(name)} characters)"
    return repr(name)[: limit + 2]


def check_name(name: Any, what: str = "file name") -> str:
    """A manifest file name, checked to be a plain relative name (parts joined by `/`, none empty, `.` or `..`,
    no backslash or NUL, not absolute). Returns it; raises FaceLlavaError naming it otherwise."""
    if not isinstance(name, str) or not name:
        raise FaceLlavaError(f"{what} {shown(name)} is not a file name")
    parts = name.split("/")
    if ("\\" in name or "\0" in name or name.startswith("/") or len(name) > 1024
            or any(part in ("", ".", "..") for part in parts) or name[1:2] == ":"):
        raise FaceLlavaError(f"{what} {shown(name)} is not a plain name inside the bundle")
    return name


def _is_inside(root: Path, path: str) -> bool:
    return os.path.commonpath([str(root), path]) == str(root)


def resolve_inside(root: Path, name: str) -> Path:
    """The real path (symlinks resolved) of the bundle file `name`, checked to lie inside the bundle `root` (a
    real path). Raises FaceLlavaError for a bad name or one that leads outside."""
    check_name(name)
    real = os.path.realpath(root / name)
    if not _is_inside(root, real) or real == str(root):
        raise FaceLlavaError(f"bundle file {name} leads outside the bundle (through a symlink); the bundle was "
                             "tampered with: export it again")
    return Path(real)


def _parent_inside(root: Path, name: str) -> Path:
    """`root / name` with its parent directory resolved and checked inside the bundle, the last part not followed:
    the path to unlink or rename onto, so a symlink is replaced or removed itself, never its target."""
    check_name(name)
    parent = os.path.realpath((root / name).parent)
    if not _is_inside(root, parent):
        raise FaceLlavaError(f"bundle file {name} leads outside the bundle (through a symlink); the bundle was "
                             "tampered with: export it again")
    return Path(parent) / Path(name).name


# --- the manifest -------------------------------------------------------------------------------------------


def _hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _name_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# field -> (check, what it must be); names in `_NAME_FIELDS` are also checked with `check_name`
_ENTRY_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "sha256": (_hex64, "64 lower-case hex digits"),
    "bytes": (_count, "a non-negative integer"),
    "kind": (lambda v: v in FILE_KINDS, f"one of {', '.join(FILE_KINDS)}"),
    "modality": (lambda v: v in MODALITIES, "image or video"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "landmarks": (lambda v: isinstance(v, bool), "true or false"),
    "type": (lambda v: isinstance(v, str) and v.isidentifier(), "a GGUF type name"),
    "external_data": (_name_list, "a list of file names"),
    "part_of": (lambda v: isinstance(v, str), "a file name"),
    "source": (lambda v: isinstance(v, str), "a file name"),
    "source_sha256": (_hex64, "64 lower-case hex digits"),
    "source_onnx_sha256": (_hex64, "64 lower-case hex digits"),
    "inputs": (lambda v: v is None or isinstance(v, dict), "an object"),
    "outputs": (lambda v: v is None or isinstance(v, dict), "an object"),
    "gpu": (lambda v: isinstance(v, str), "a string"),
    "tensorrt": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, str) and v.isidentifier(), "a front-end model name"),
}
_REQUIRED_FIELDS = ("sha256", "bytes", "kind")
_REQUIRED_BY_KIND = {"vision": ("modality", "precision", "landmarks"), "engine": ("modality", "precision",
                     "landmarks", "source"), "llm": ("type",), "front_end_engine": ("model", "source")}
_NAME_FIELDS = ("part_of", "source")


@dataclass
class Manifest:
    """A bundle's `manifest.json`, its schema checked (see `contract.MANIFEST_KEYS`).

    `files` maps each file name to its entry: `sha256`, `bytes`, `kind` and the kind's details (vision graphs and
    engines: `modality`, `precision`, `landmarks`; GGUFs: `type`; `external_data`, `part_of`, `source` name other
    files). `parity` holds the measured figures by file name.
    """

    schema_version: int = contract.MANIFEST_SCHEMA_VERSION
    created_by: str = f"facellava-edge {__version__}"
    source: dict[str, Any] = field(default_factory=dict)
    contract: dict[str, Any] = field(default_factory=contract.contract_summary)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        """A Manifest from parsed JSON. Raises FaceLlavaError naming the first bad field."""

        def bad(path: str, must: str) -> FaceLlavaError:
            return FaceLlavaError(f"{where}: {path} must be {must}; the bundle is damaged or was tampered with, "
                                  "export it again")

        if not isinstance(data, dict):
            raise bad("the top level", "an object")
        version = data.get("schema_version")
        if version != contract.MANIFEST_SCHEMA_VERSION:
            found = version if isinstance(version, int | str) and len(str(version)) < 20 else type(version).__name__
            raise FaceLlavaError(f"{where} has schema version {found}, this tool reads "
                                 f"{contract.MANIFEST_SCHEMA_VERSION}; export the bundle again")
        for key in ("source", "contract", "files", "parity", "tools"):
            if not isinstance(data.get(key, {}), dict):
                raise bad(key, "an object")
        if not isinstance(data.get("created_by", ""), str):
            raise bad("created_by", "a string")
        files = data.get("files", {})
        for name, entry in files.items():
            check_name(name, f"{where}: files key")
            if not isinstance(entry, dict):
                raise bad(f"files[{shown(name)}]", "an object")
            kind = entry.get("kind")
            for key in (*_REQUIRED_FIELDS, *_REQUIRED_BY_KIND.get(kind if isinstance(kind, str) else "", ())):
                if key not in entry:
                    raise bad(f"files[{shown(name)}].{key}", "present")
            for key, value in entry.items():
                check, must = _ENTRY_FIELDS.get(key, (lambda v: True, ""))
                if not check(value):
                    raise bad(f"files[{shown(name)}].{key}", must)
                if key in _NAME_FIELDS:
                    check_name(value, f"{where}: files[{shown(name)}].{key}")
            for extra in entry.get("external_data", []):
                check_name(extra, f"{where}: files[{shown(name)}].external_data")
                if extra not in files:
                    raise bad(f"files[{shown(name)}].external_data", "names of files in the manifest")
        parity = data.get("parity", {})
        for name, figures in parity.items():
            check_name(name, f"{where}: parity key")
            if not isinstance(figures, dict):
                raise bad(f"parity[{shown(name)}]", "an object")
        source = data.get("source", {})
        if not isinstance(source.get("checkpoint", ""), str):
            raise bad("source.checkpoint", "a path")
        if "checkpoint_sha256" in source and not _hex64(source["checkpoint_sha256"]):
            raise bad("source.checkpoint_sha256", "64 lower-case hex digits")
        tools = data.get("tools", {})
        if not all(isinstance(v, str) for v in tools.values()):
            raise bad("tools", "an object of version strings")
        return cls(schema_version=version, created_by=data.get("created_by", ""), source=source,
                   contract=data.get("contract", {}), files=files, parity=parity, tools=tools)

    @classmethod
    def read(cls, root: Path) -> Manifest | None:
        """The manifest of the bundle directory `root` (a real path); None when it has none. Raises
        FaceLlavaError for one that leads outside, is too large, not JSON, or of the wrong shape."""
        path = _parent_inside(root, MANIFEST_NAME)
        if not os.path.lexists(path):
            return None
        path = resolve_inside(root, MANIFEST_NAME)
        try:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_MANIFEST_BYTES + 1)
        except OSError as error:
            raise FaceLlavaError(f"{path} cannot be read ({error.strerror})") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise FaceLlavaError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MB: not a manifest")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            raise FaceLlavaError(f"{path} is not valid JSON ({reason}); export the bundle again") from None
        return cls.from_json(data, str(path))

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "created_by": self.created_by, "source": self.source,
                "contract": self.contract, "files": self.files, "parity": self.parity, "tools": self.tools}

    def contract_differences(self) -> list[str]:
        """The contract constants on which this manifest differs from this version's contract."""
        summary = contract.contract_summary()
        return sorted(k for k, v in summary.items() if self.contract.get(k) != v)

    def find(self, kind: str, **fields: Any) -> list[str]:
        """Names of the files of this kind whose entries have all the given field values."""
        return sorted(name for name, entry in self.files.items()
                      if entry.get("kind") == kind and all(entry.get(k) == v for k, v in fields.items()))


# --- ONNX external data -------------------------------------------------------------------------------------

# Where an ONNX model holds TensorProtos, by protobuf field number (onnx.proto): the messages to descend into.
_TENSOR = "tensor"
_ONNX_MESSAGES: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: _TENSOR, 15: "sparse"},
    "node": {5: "attribute"},
    "function": {7: "node"},
    "attribute": {5: _TENSOR, 6: "graph", 10: _TENSOR, 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: _TENSOR, 2: _TENSOR},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14


class _NotProtobuf(Exception):
    pass


def _varint(buffer: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotProtobuf
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(buffer: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field of the message in buffer[pos:end]."""
    while pos < end:
        key, pos = _varint(buffer, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _NotProtobuf
        if wire == 0:
            value, pos = _varint(buffer, pos, end)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buffer, pos, end)
            if pos + length > end:
                raise _NotProtobuf
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _NotProtobuf
        else:
            raise _NotProtobuf  # groups (3, 4) are not in onnx.proto


def _external_locations(buffer: memoryview, kind: str, pos: int, end: int, depth: int, found: list[str]) -> None:
    if depth > 64:
        raise _NotProtobuf
    if kind == _TENSOR:
        location, external = None, False
        for number, wire, start, stop in _fields(buffer, pos, end):
            if number == _TENSOR_DATA_LOCATION and wire == 0:
                external = start == 1
            elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
                entry = {n: bytes(buffer[a:b]) for n, w, a, b in _fields(buffer, start, stop) if w == 2}
                if entry.get(1) == b"location":
                    location = entry.get(2, b"").decode("utf-8", "replace")
        if external or location is not None:
            found.append(location or "")
        return
    children = _ONNX_MESSAGES[kind]
    for number, wire, start, stop in _fields(buffer, pos, end):
        if wire == 2 and number in children:
            _external_locations(buffer, children[number], start, stop, depth + 1, found)


def onnx_external_data(path: str | Path) -> list[str]:
    """The external-data locations an ONNX model's tensors name (`location` of each tensor stored outside the
    file), read from the protobuf without loading weights. Raises FaceLlavaError when the file is not ONNX."""
    path = Path(path)
    found: list[str] = []
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise FaceLlavaError(f"{path.name} is empty, not an ONNX graph; export the bundle again")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                _external_locations(view, "model", 0, size, 0, found)
            except _NotProtobuf:
                raise FaceLlavaError(f"{path.name} is not an ONNX graph (its bytes are not a protobuf model); "
                                     "export the bundle again") from None
            finally:
                view.release()
    return found


# --- the verified-hash cache ---------------------------------------------------------------------------------


def user_cache_dir() -> Path:
    """The per-user cache directory (`$FACELLAVA_CACHE`, else `$XDG_CACHE_HOME/facellava`, else
    `~/.cache/facellava`)."""
    if os.environ.get("FACELLAVA_CACHE"):
        return Path(os.environ["FACELLAVA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "facellava"


def _stat_key(stat: os.stat_result, sha256: str) -> list[Any]:
    # ctime cannot be set by a user, and changes with every write or rename of the file
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, sha256]


class _VerifiedCache:
    """Which files were already hashed: `.verified.json` in a bundle that belongs to this user and is writable;
    else a file per bundle in the user's cache directory; else memory only (a read-only bundle on read-only
    media is then hashed once per process)."""

    def __init__(self, root: Path):
        self.root = root
        owned = os.stat(root).st_uid == os.geteuid() and os.access(root, os.W_OK)
        if owned:
            self.path: Path | None = root / VERIFIED_CACHE
        else:
            digest = hashlib.sha256(str(root).encode()).hexdigest()[:32]
            self.path = user_cache_dir() / "verified" / f"{digest}.json"
        self.entries = self._load()

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as handle:
                data = json.loads(handle.read(MAX_MANIFEST_BYTES))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError, RecursionError):
            return {}

    def known(self, name: str, stat: os.stat_result, sha256: str) -> bool:
        return self.entries.get(name) == _stat_key(stat, sha256)

    def remember(self, name: str, stat: os.stat_result, sha256: str) -> None:
        self.entries[name] = _stat_key(stat, sha256)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.path, json.dumps(self.entries))
        except OSError:  # read-only bundle or cache: keep it in memory
            if self.path.parent != self.root:
                self.path = None
                return
            digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:32]
            self.path = user_cache_dir() / "verified" / f"{digest}.json"
            self.remember(name, stat, sha256)


# --- reading ------------------------------------------------------------------------------------------------


def _bundle_root(path: str | Path) -> Path:
    directory = Path(path)
    try:
        is_directory = S_ISDIR(directory.stat().st_mode)
    except FileNotFoundError:
        is_directory = False
    except OSError as error:  # a folder on the way this user may not enter, a name too long, ...
        raise FaceLlavaError(f"bundle {directory} cannot be reached: {error.strerror}") from None
    if not is_directory:
        raise FaceLlavaError(f"bundle {directory} does not exist or is not a directory")
    return Path(os.path.realpath(directory))


class Bundle:
    """An opened bundle: its directory (a real path) and checked manifest. Files are verified against their
    sha256 when first used (`path_of`)."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self._cache: _VerifiedCache | None = None

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Open a bundle directory, finishing a commit that a killed writer left. Raises FaceLlavaError when it
        is not a bundle this tool can use (no or bad manifest, another schema or contract)."""
        root = _bundle_root(path)
        _finish_interrupted_commit(root, wait=True)
        manifest = Manifest.read(root)
        if manifest is None:
            raise FaceLlavaError(f"{root} has no {MANIFEST_NAME}: not an exported bundle (run `facellava export "
                                 "vision` / `facellava export llm` into it)")
        differing = manifest.contract_differences()
        if differing:
            raise FaceLlavaError(f"{root / MANIFEST_NAME} was exported with other contract values "
                                 f"({', '.join(differing)}); export the bundle again with this version")
        return cls(root, manifest)

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest.files

    def find(self, kind: str, **fields: Any) -> list[str]:
        """Names of the files of this kind whose manifest entries have all the given field values."""
        return self.manifest.find(kind, **fields)

    def path_of(self, name: str) -> Path:
        """The real path of a manifest file, checked inside the bundle and against its sha256, with its external
        data files (for an ONNX graph, every external-data location it names must be one of them). Raises
        FaceLlavaError when it is not in the manifest, leads outside, is missing or altered."""
        entry = self.files.get(name)
        if entry is None:
            raise FaceLlavaError(f"{self.path} has no file {shown(name)} in its manifest")
        path = self.verify(name)
        declared = {str(self.verify(extra)): extra for extra in entry.get("external_data", [])}
        if name.endswith(".onnx"):
            for location in onnx_external_data(path):
                target = os.path.realpath(path.parent / location) if location else ""
                if not location or os.path.isabs(location) or target not in declared:
                    raise FaceLlavaError(f"bundle file {name} names external data {shown(location)} that its "
                                         "manifest entry does not declare; the bundle was tampered with: export "
                                         "it again")
        return path

    def verify(self, name: str) -> Path:
        """Check one manifest file (inside the bundle, size, sha256) and return its real path."""
        entry = self.files[name]
        path = resolve_inside(self.path, name)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FaceLlavaError(f"bundle file {name} is missing from {self.path}; export the bundle again") from None
        if not os.path.isfile(path):
            raise FaceLlavaError(f"bundle file {name} is not a regular file; export the bundle again")
        if stat.st_size != entry["bytes"]:
            raise FaceLlavaError(f"bundle file {name} has {stat.st_size} bytes, its manifest says {entry['bytes']}: "
                                 "the bundle was altered or damaged; export it again")
        if self._cache is None:
            self._cache = _VerifiedCache(self.path)
        if self._cache.known(name, stat, entry["sha256"]):
            return path
        if contract.file_sha256(path) != entry["sha256"]:
            raise FaceLlavaError(f"bundle file {name} does not match its manifest sha256: the bundle was altered or "
                                 "damaged; export it again")
        self._cache.remember(name, stat, entry["sha256"])
        return path

    def verify_all(self) -> list[str]:
        """Verify every file of the manifest (ONNX external data included); return their names."""
        for name in self.files:
            self.path_of(name)
        return sorted(self.files)


# --- writing ------------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def _writer_lock(root: Path, wait: bool) -> Iterator[None]:
    """The bundle's advisory write lock; FaceLlavaError when another command holds it and `wait` is False."""
    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise FaceLlavaError(f"cannot write to bundle {root} ({error.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise FaceLlavaError(f"another facellava command is writing {root}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_empty_parents(root: Path, name: str) -> None:
    for parent in Path(name).parents:
        if str(parent) == ".":
            return
        with contextlib.suppress(OSError):
            os.rmdir(_parent_inside(root, parent.as_posix()))


def _roll_forward(root: Path, journal: dict[str, Any]) -> None:
    """Carry out a written journal: move the staged files in, swap the manifest, delete what it replaced. Every
    step may already have happened (a killed roll-forward is rolled forward again)."""
    staging = root / check_name(journal["staging"], "staging directory")
    for name in journal["moves"]:
        source = staging / check_name(name)
        if os.path.lexists(source):
            target = _parent_inside(root, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, _parent_inside(root, name))
    write_text_atomically(_parent_inside(root, MANIFEST_NAME), json.dumps(journal["manifest"], indent=2) + "\n")
    _fsync_path(root)
    for name in journal["deletes"]:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            os.unlink(_parent_inside(root, check_name(name)))
        _remove_empty_parents(root, name)
    shutil.rmtree(staging, ignore_errors=True)
    os.unlink(root / JOURNAL)
    _fsync_path(root)


def _read_journal(root: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(root / JOURNAL, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        raise FaceLlavaError(f"{root / JOURNAL} is not a regular file: the bundle was tampered with") from None
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(MAX_MANIFEST_BYTES + 1)
    try:
        journal = json.loads(raw)
        Manifest.from_json(journal["manifest"], str(root / JOURNAL))
        if not (isinstance(journal["staging"], str) and journal["staging"].startswith(STAGING_PREFIX)
                and _name_list(journal["moves"]) and _name_list(journal["deletes"])):
            raise ValueError
        for name in [journal["staging"], *journal["moves"], *journal["deletes"]]:
            check_name(name)
    except (ValueError, KeyError, TypeError, RecursionError, FaceLlavaError):
        raise FaceLlavaError(f"{root / JOURNAL} is damaged: the bundle was tampered with; export it again") from None
    return journal


def _finish_interrupted_commit(root: Path, wait: bool) -> None:
    """Roll forward the commit a killed writer left (a journal without its staging is a finished one)."""
    if not os.path.lexists(root / JOURNAL):
        return
    if os.stat(root).st_uid != os.geteuid() or not os.access(root, os.W_OK):
        raise FaceLlavaError(f"{root} holds an unfinished commit of a killed export; open it once as its owner, "
                             "with write access, to finish it")
    with _writer_lock(root, wait):
        journal = _read_journal(root)
        if journal is not None:
            _roll_forward(root, journal)


class BundleWriter:
    """One transaction on a bundle; make it with `BundleWriter.transaction(path)`.

    `stage(name)` gives a path to write the new file `name` into (inside the staging directory); `add(name, kind,
    parity=..., **details)` enters it with its sha256; `remove(name)` drops a file; `set_source(...)` records the
    checkpoint; `bundle` is the bundle as it was when the transaction began, for reading its files. The commit
    happens when the `with` block ends without an exception; otherwise nothing of the bundle changes.
    """

    def __init__(self, root: Path, manifest: Manifest, staging: Path):
        self.path = root
        self.bundle = Bundle(root, copy.deepcopy(manifest))
        self.manifest = manifest
        self.staging = staging
        self._added: dict[str, None] = {}

    @classmethod
    @contextlib.contextmanager
    def transaction(cls, path: str | Path, *, create: bool = True) -> Iterator[BundleWriter]:
        """Begin a transaction on the bundle `path` (made when `create` and missing). Raises FaceLlavaError for a
        path that is a file, no bundle when `create` is False, a bundle of another schema or contract, or one
        another command is writing."""
        directory = Path(path)
        if directory.exists() and not directory.is_dir():
            raise FaceLlavaError(f"bundle path {directory} is a file; give a directory")
        made = not directory.exists()
        if made and not create:
            raise FaceLlavaError(f"{directory} is not a bundle; export into it first")
        directory.mkdir(parents=True, exist_ok=True)
        root = Path(os.path.realpath(directory))
        try:
            with _writer_lock(root, wait=False):
                journal = _read_journal(root)
                if journal is not None:
                    _roll_forward(root, journal)
                for leftover in root.glob(f"{STAGING_PREFIX}*"):  # killed runs' staging: nobody else writes now
                    if leftover.is_dir() and not leftover.is_symlink():
                        shutil.rmtree(leftover, ignore_errors=True)
                manifest = Manifest.read(root)
                if manifest is None:
                    if not create:
                        raise FaceLlavaError(f"{root} has no {MANIFEST_NAME}: not an exported bundle")
                    manifest = Manifest()
                differing = manifest.contract_differences()
                if differing:
                    raise FaceLlavaError(f"{root} was exported with other contract values ({', '.join(differing)});"
                                         " export into a new bundle")
                staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
                writer = cls(root, manifest, staging)
                try:
                    yield writer
                    writer._commit()
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            if made:  # a bundle directory this transaction made and could not fill
                shutil.rmtree(root, ignore_errors=True)
            raise

    def set_source(self, checkpoint_dir: str | Path, **details: Any) -> None:
        """Record the checkpoint the bundle comes from. A bundle holds the exports of one checkpoint: exporting a
        different one into it is a FaceLlavaError."""
        fingerprint = checkpoint_fingerprint(checkpoint_dir)
        known = self.manifest.source.get("checkpoint_sha256")
        if known and known != fingerprint and self.manifest.files:
            raise FaceLlavaError(f"{self.path} holds exports of another checkpoint; export into a new bundle")
        self.manifest.source.update({"checkpoint": str(Path(checkpoint_dir).resolve()),
                                     "checkpoint_sha256": fingerprint, **details})

    def stage(self, name: str) -> Path:
        """The staging path for the new file `name` (its parent directories made). Files staged but never
        `add`ed are discarded with the staging directory."""
        path = self.staging / check_name(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, name: str, kind: str, parity: dict[str, Any] | None = None, **details: Any) -> dict[str, Any]:
        """Enter the staged file `name` (written at `stage(name)`) with its size and sha256, replacing an entry of
        that name at commit; `parity` records its measured figures. Returns the entry."""
        path = self.staging / check_name(name)
        if not path.is_file() or {"sha256", "bytes"} & details.keys():
            raise ValueError(f"{name} was not staged, or its details name sha256/bytes")  # a bug in the caller
        entry = {"sha256": contract.file_sha256(path), "bytes": path.stat().st_size, "kind": kind, **details}
        self.manifest.files[name] = entry
        if parity is not None:
            self.manifest.parity[name] = parity
        self._added[name] = None
        return entry

    def remove(self, name: str) -> None:
        """Drop the file `name` (and, at commit, what depends on it) from the bundle."""
        self.manifest.files.pop(name, None)
        self.manifest.parity.pop(name, None)
        self._added.pop(name, None)

    def _dependants(self, old: dict[str, dict[str, Any]]) -> set[str]:
        """Entries that depend (by `part_of` or `source`) on a file that this transaction removes or changes and
        that it did not add itself, transitively."""
        files = self.manifest.files
        changed = {n for n, e in old.items() if n not in files or files[n]["sha256"] != e["sha256"]}
        doomed: set[str] = set()
        while True:
            more = {n for n, e in files.items() if n not in self._added and n not in doomed
                    and (e.get("part_of") in changed | doomed or e.get("source") in changed | doomed)}
            if not more:
                return doomed
            doomed |= more

    def _commit(self) -> None:
        old = self.bundle.files
        for name in self._dependants(old):
            self.remove(name)
        self.manifest.created_by = f"facellava-edge {__version__}"
        self.manifest.tools.update(tool_versions())
        data = self.manifest.to_json()
        Manifest.from_json(copy.deepcopy(data), "the new manifest")  # never commit what no reader accepts
        for name in self._added:
            _fsync_path(self.staging / name)
        deletes = sorted(n for n in old if n not in self.manifest.files)
        journal = {"staging": self.staging.name, "moves": list(self._added), "deletes": deletes, "manifest": data}
        write_text_atomically(self.path / JOURNAL, json.dumps(journal))  # the commit point
        _fsync_path(self.path)
        _roll_forward(self.path, journal)
        cache = _VerifiedCache(self.path)
        for name in self._added:
            with contextlib.suppress(OSError):
                cache.remember(name, os.stat(resolve_inside(self.path, name)), self.manifest.files[name]["sha256"])
