"""Writing files so that a reader never sees half of one, and recognising what a killed write left behind."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# A leftover written before this moment belongs to a run that is no longer going. pcee.runtime is
# imported before any export or calibration writes, so this is (a moment after) the process start.
PROCESS_STARTED = time.time()


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
    backup = backup_directory_for(target)
    shutil.rmtree(backup, ignore_errors=True)
    if target.exists():
        target.rename(backup)
    source.rename(target)
    shutil.rmtree(backup, ignore_errors=True)


def backup_directory_for(target: Path) -> Path:
    """Where replace_directory keeps the previous directory while it swaps in the new one."""
    return target.with_name(target.name + ".old")


def staging_directory_pattern(target: Path) -> re.Pattern:
    """The names staging_directory_for gives `target`'s staging directories: `.NAME.<random>.partial`."""
    return re.compile(re.escape(f".{target.name}.") + r"[^.]+" + re.escape(".partial"))


def temporary_file_pattern(name: str) -> re.Pattern:
    """The names write_file_atomically gives `name`'s temporary files: mkstemp's `.NAME.` and 8 random characters."""
    return re.compile(re.escape(f".{name}.") + r"[a-z0-9_]{8}")


def written_before_this_process(path: Path) -> bool:
    """Whether `path` (and everything under it) was last written before this process started."""
    try:
        return max(entry.lstat().st_mtime for entry in (path, *path.rglob("*"))) < PROCESS_STARTED
    except OSError:  # removed or rewritten while we looked: someone is at work in it
        return False
