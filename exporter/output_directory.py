"""Where a bundle is written: the default path, what may be replaced there, staging beside it, and debris of killed exports.

Replacing a directory deletes all of it, so only what is provably a pcee bundle is replaced.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pcee.runtime import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    PceeError,
    backup_directory_for,
    is_bundle_entry,
    report_folders,
    staging_directory_for,
    staging_directory_pattern,
    written_before_this_process,
)

from .errors import CalibratedOutputError, OutputDirectoryError
from .options import DEFAULT_POINT_NAME, DEFAULT_POINT_SOURCE

BUNDLE_SUFFIX = "-pcee"


def default_bundle_dir(model_dir: Path) -> Path:
    model_dir = model_dir.resolve()
    return model_dir.with_name(model_dir.name + BUNDLE_SUFFIX)


def check_output_dir(output_dir: Path, force: bool = False) -> None:
    """The output, and the backup path the swap reuses, must each be absent, empty, or a pcee bundle of bundle files alone.

    Without `force`, the output must also hold nothing of a calibration: no saved point beyond the export
    default, no report.
    """
    check_replaceable(output_dir, f"--output {output_dir}")
    if not force:
        check_nothing_calibrated_is_lost(output_dir)
    backup = backup_directory_for(output_dir)
    check_replaceable(
        backup,
        f"{backup} (the path where pcee-export keeps the previous bundle while it swaps in the new one)",
    )


def check_replaceable(directory: Path, described: str) -> None:
    """Replacing a directory deletes all of it, so only what is provably a bundle is replaced."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise OutputDirectoryError(f"{described} is a file; pass a directory path for the bundle")
    entries = sorted(entry.name for entry in directory.iterdir())
    if not entries:
        return
    advice = f"Pass a new --output, or move {directory} away first."
    if MANIFEST_NAME not in entries:
        raise OutputDirectoryError(
            f"{described} is a non-empty directory without {MANIFEST_NAME}, so it is not a pcee bundle; "
            f"refusing to replace it. {advice}"
        )
    problem = manifest_problem(directory / MANIFEST_NAME)
    if problem is not None:
        raise OutputDirectoryError(
            f"{described} has a {MANIFEST_NAME} that is not a pcee bundle manifest ({problem}); refusing to replace "
            f"the directory, which would delete everything in it. {advice}"
        )
    foreign = [name for name in entries if not is_bundle_entry(name)]
    if foreign:
        raise OutputDirectoryError(
            f"{described} is a pcee bundle but also holds {', '.join(foreign)}, which pcee-export did not write; "
            f"refusing to replace it, which would delete them. Move them out of the bundle, or pass a new --output."
        )


def check_nothing_calibrated_is_lost(output_dir: Path) -> None:
    """A bundle whose calibration replacing it would delete is replaced only when asked to, never silently."""
    if not (output_dir / MANIFEST_NAME).is_file():
        return
    points = saved_points_beyond_the_default(json.loads((output_dir / MANIFEST_NAME).read_text()))
    reports = report_folders(output_dir)
    if not (points or reports):
        return
    losses = []
    if points:
        losses.append(f"its saved operating points {', '.join(points)}")
    if reports:
        losses.append(f"its calibration reports {', '.join(reports)}")
    raise CalibratedOutputError(
        f"--output {output_dir} is a calibrated bundle: replacing it would lose {' and '.join(losses)}. "
        f"To keep them, write the new bundle elsewhere (for example --output {output_dir}-2); to replace the "
        "bundle and lose them, add --force.",
        points,
        reports,
    )


def saved_points_beyond_the_default(manifest: dict) -> list[str]:
    """The names of the manifest's operating points (saved, and the current one) other than the export's default."""
    saved = manifest.get("operating_points")
    entries = [*(saved if isinstance(saved, list) else []), manifest.get("operating_point")]
    names = [
        entry.get("name") or "(the unnamed current point)"
        for entry in entries
        if isinstance(entry, dict) and not is_export_default(entry)
    ]
    return list(dict.fromkeys(names))


def is_export_default(point: dict) -> bool:
    return point.get("name") == DEFAULT_POINT_NAME and point.get("source") == DEFAULT_POINT_SOURCE


def manifest_problem(path: Path) -> str | None:
    """Why `path` is not a pcee bundle manifest; None when it is one, of this format or another pcee's."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        return f"not JSON: {error}"
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    version, producer = data.get("format_version"), data.get("producer")
    if producer != "pcee" or not isinstance(version, int) or isinstance(version, bool):
        return f"producer {producer!r} and format_version {version!r}, where pcee writes producer 'pcee' and an integer format_version"
    if version != FORMAT_VERSION:
        # Another pcee version wrote it (every pcee manifest has carried both marks). Its schema is not
        # this reader's to check, and exporting over an old bundle is how it gets upgraded.
        return None
    try:
        Manifest.from_dict(data, str(path))
    except PceeError as error:
        return str(error)
    return None


def remove_stale_debris(output_dir: Path) -> None:
    """Remove what killed exports to `output_dir` left beside it: staging directories, and a backup bundle.

    Only the exact `.NAME.<random>.partial` siblings that staging_directory_for makes, and only debris whose
    newest write is older than this process: an export running now keeps writing into its own. The backup
    (which check_output_dir found to be a bundle) goes only while the output exists: without the output,
    a kill between the swap's two renames left the backup as the one copy of the previous bundle.
    """
    if not output_dir.parent.is_dir():
        return
    staging_name = staging_directory_pattern(output_dir)
    stale = [
        entry
        for entry in output_dir.parent.iterdir()
        if staging_name.fullmatch(entry.name) and is_stale(entry)
    ]
    backup = backup_directory_for(output_dir)
    if output_dir.is_dir() and is_stale(backup):
        stale.append(backup)
    for directory in stale:
        shutil.rmtree(directory, ignore_errors=True)


def is_stale(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and written_before_this_process(path)


@contextmanager
def staging_directory(output_dir: Path) -> Iterator[Path]:
    """A temporary sibling of output_dir (same filesystem, so the final rename is atomic), removed on failure."""
    staging = staging_directory_for(output_dir)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
