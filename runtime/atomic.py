"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_file_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write` fills a temporary file in the same directory, which then replaces `path` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else new_file_mode())
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """What open() would give a new file under the process umask (mkstemp's files are 0600)."""
    return 0o666 & ~current_umask()


def staging_directory_for(target: Path) -> Path:
    """A fresh hidden sibling of `target` (same filesystem, so the final rename is atomic).

    mkdtemp makes it 0700; it gets the mode mkdir would give, since it becomes the real directory.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    os.chmod(staging, 0o777 & ~current_umask())
    return staging


def replace_directory(source: Path, target: Path) -> None:
    """Move a finished directory into place; the previous one is removed only once the new one is there.

    A crash between the two renames leaves the previous directory at `<target>.old`, never a mix.
    """
    backup = target.with_name(target.name + ".old")
    shutil.rmtree(backup, ignore_errors=True)
    if target.exists():
        target.rename(backup)
    source.rename(target)
    shutil.rmtree(backup, ignore_errors=True)
