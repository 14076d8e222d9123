"""Writing whole or not at all, outside bundles (bundles are changed only through `facellava.bundle`'s
transaction): a single file is written to a temporary name beside it and renamed into place (`atomic_file`); a
directory is filled under a temporary name and renamed when complete (`staged_directory`). An interrupted run
leaves the previous state, never a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside `path` to write the file into; when the block succeeds it is flushed to disk and
    renamed onto `path` (with permissions `mode`), else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temp, mode)  # mkstemp makes it private
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_file`."""
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def staged_directory(final: str | Path) -> Iterator[Path]:
    """An empty temporary directory beside `final`, renamed to `final` when the block succeeds (replacing what
    was there) and removed when it fails."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
