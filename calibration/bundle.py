"""Where calibration meets a bundle: its labels and the labelled data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcee.modeling.data import DataError, TextDataset, get_task, load_data
from pcee.runtime import Manifest

from .errors import CalibrationError


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
