"""Where calibration meets a bundle: its labels, the labelled data, and the manifest update."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from pcee.modeling.data import DataError, TextDataset, get_task, load_data
from pcee.runtime import Manifest, OperatingPoint

from .errors import CalibrationError

INITIAL_POINT_NAME = "initial"
MANIFEST_LOCK = ".manifest.lock"


def load_labelled_data(
    data: str | Path,
    manifest: Manifest,
    task: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
) -> TextDataset:
    """The three --data forms. Without --task, a GLUE directory's name gives the task, else the bundle's own task does."""
    uses_columns = any(option is not None for option in (text_column, text_pair_column, label_column))
    if task is None and not uses_columns and not names_glue_task(Path(data)):
        task = manifest.model.task
    return load_data(data, task, text_column, text_pair_column, label_column)


def names_glue_task(path: Path) -> bool:
    try:
        get_task(path.name)
    except DataError:
        return False
    return path.is_dir()


def bundle_label_indices(dataset: TextDataset, bundle_labels: list[str]) -> np.ndarray:
    """Each row's label as an index into the bundle's labels, matched by name."""
    labels = np.asarray(dataset.labels, dtype=np.int64)
    used_names = [dataset.label_names[index] for index in np.unique(labels)]
    unknown = [name for name in used_names if name not in bundle_labels]
    if unknown:
        raise CalibrationError(
            f"{dataset.source}: labels {unknown} are not labels of this bundle, which knows {bundle_labels}. "
            "Use data of the task the model was trained on (for GLUE files, check --task), or relabel the file"
        )
    position = {name: index for index, name in enumerate(bundle_labels)}
    mapping = np.array([position.get(name, -1) for name in dataset.label_names], dtype=np.int64)
    return mapping[labels]


def merged_points(
    current: OperatingPoint, saved: list[OperatingPoint], new: OperatingPoint
) -> list[OperatingPoint]:
    """The saved points with `new` added (replacing a namesake), and the current point kept under a name."""
    points = [point for point in saved if point.name != new.name]
    if current not in saved and current.name != new.name:
        points.append(current if current.name else replace(current, name=INITIAL_POINT_NAME))
    return points + [new]


def record_in_manifest(bundle_dir: Path, point: OperatingPoint, summary: dict) -> Manifest:
    """Make `point` the bundle's operating point, keep the earlier ones by name, in one atomic write.

    The read-merge-write holds the bundle's manifest lock, so concurrent calibrations all keep their points.
    """
    with manifest_lock(bundle_dir):
        manifest = Manifest.load(bundle_dir, verify_hashes=False)
        manifest.operating_points = merged_points(manifest.operating_point, manifest.operating_points, point)
        manifest.operating_point = point
        manifest.calibration = summary
        manifest.save(bundle_dir)
    return manifest


@contextmanager
def manifest_lock(bundle_dir: Path) -> Iterator[None]:
    """An exclusive lock between processes (flock on BUNDLE/.manifest.lock), released when the file closes,
    also when the process dies."""
    with open(Path(bundle_dir) / MANIFEST_LOCK, "ab") as lock_file:  # "a": create it, never truncate it
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield
