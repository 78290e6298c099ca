"""Where calibration meets a bundle: its labels, the labelled data, and the manifest update."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcee.modeling.data import DataError, TextDataset, get_task, load_data
from pcee.runtime.manifest import Manifest
from pcee.runtime.policies import OperatingPoint

from .errors import CalibrationError

INITIAL_POINT_NAME = "initial"


def require_labels(manifest: Manifest, bundle_dir: Path) -> list[str]:
    labels = list(manifest.model.labels)
    if len(labels) < 2:
        raise CalibrationError(
            f"bundle {bundle_dir} declares labels {labels}; calibration maps the data's labels to the bundle's by name "
            "and needs at least two. Re-export the bundle from a model trained with pcee-train"
        )
    return labels


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


def merged_points(current: dict, saved: list[dict], new: OperatingPoint) -> list[dict]:
    """The saved points with `new` added (replacing a namesake), and the current point kept under a name."""
    points = [point for point in saved if point.get("name") != new.name]
    if current and current not in saved and current.get("name") != new.name:
        points.append(current if current.get("name") else {**current, "name": INITIAL_POINT_NAME})
    return points + [new.to_dict()]


def record_in_manifest(bundle_dir: Path, point: OperatingPoint, summary: dict) -> Manifest:
    """Make `point` the bundle's operating point, keep the earlier ones by name, in one atomic write."""
    manifest = Manifest.load(bundle_dir, verify_hashes=False)
    manifest.operating_points = merged_points(manifest.operating_point, manifest.operating_points, point)
    manifest.operating_point = point.to_dict()
    manifest.calibration = summary
    manifest.save(bundle_dir)
    return manifest
