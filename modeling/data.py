"""Reading labelled text-classification data: GLUE task files and generic csv/tsv/jsonl files.

GLUE TSVs are read unquoted (sentences contain bare quote characters), with a byte-order mark
tolerated (MRPC starts with one) and columns looked up by header name; CoLA has no header and
gets the column names from its TaskSpec.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pcee.runtime import PceeError

SPLITS = ("train", "validation")


class DataError(PceeError, ValueError):
    """A data file or data option is unusable; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task lays out its files, labels and primary metric."""

    name: str
    directory_names: tuple[str, ...]
    train_file: str
    validation_file: str
    label_names: tuple[str, ...]
    metric: str
    is_pair: bool
    text_column: str
    text_pair_column: str | None
    label_column: str
    headerless_columns: tuple[str, ...] | None = None  # column names for files shipped without a header
    file_labels: tuple[str, ...] | None = (
        None  # how the files write the labels (GLUE's 0/1), when not by name
    )

    @property
    def label_values(self) -> tuple[str, ...]:
        """The labels as the task's files write them, in the order of `label_names`."""
        return self.file_labels or self.label_names

    def split_file(self, split: str) -> str:
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not supported; expected one of {', '.join(SPLITS)}")
        return self.train_file if split == "train" else self.validation_file


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")

# The 0/1 tasks are named as in GLUE's own task descriptions (and the Hugging Face glue dataset).
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "sst2",
            ("SST-2",),
            "train.tsv",
            "dev.tsv",
            ("negative", "positive"),
            "accuracy",
            False,
            "sentence",
            None,
            "label",
            file_labels=_BINARY,
        ),
        TaskSpec(
            "cola",
            ("CoLA",),
            "train.tsv",
            "dev.tsv",
            ("unacceptable", "acceptable"),
            "matthews",
            False,
            "sentence",
            None,
            "label",
            headerless_columns=("source", "label", "original_label_mark", "sentence"),
            file_labels=_BINARY,
        ),
        TaskSpec(
            "mrpc",
            ("MRPC",),
            "train.tsv",
            "dev.tsv",
            ("not_equivalent", "equivalent"),
            "f1",
            True,
            "#1 String",
            "#2 String",
            "Quality",
            file_labels=_BINARY,
        ),
        TaskSpec(
            "qqp",
            ("QQP",),
            "train.tsv",
            "dev.tsv",
            ("not_duplicate", "duplicate"),
            "f1",
            True,
            "question1",
            "question2",
            "is_duplicate",
            file_labels=_BINARY,
        ),
        TaskSpec(
            "mnli",
            ("MNLI",),
            "train.tsv",
            "dev_matched.tsv",
            ("contradiction", "entailment", "neutral"),
            "accuracy",
            True,
            "sentence1",
            "sentence2",
            "gold_label",
        ),
        TaskSpec(
            "qnli",
            ("QNLI",),
            "train.tsv",
            "dev.tsv",
            _ENTAILMENT,
            "accuracy",
            True,
            "question",
            "sentence",
            "label",
        ),
        TaskSpec(
            "rte",
            ("RTE",),
            "train.tsv",
            "dev.tsv",
            _ENTAILMENT,
            "accuracy",
            True,
            "sentence1",
            "sentence2",
            "label",
        ),
    )
}


@dataclass
class TextDataset:
    """Texts (and optional second texts) with label indices into `label_names`."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int]
    label_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Iterable[int]) -> TextDataset:
        chosen = [int(index) for index in indices]
        return TextDataset(
            texts=[self.texts[index] for index in chosen],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[index] for index in chosen],
            labels=[self.labels[index] for index in chosen],
            label_names=self.label_names,
            source=self.source,
        )


# ---------------------------------------------------------------- tasks


def _normalize_task_name(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).lower()


_TASK_ALIASES = {
    _normalize_task_name(alias): spec
    for spec in TASKS.values()
    for alias in (spec.name, *spec.directory_names)
}


def get_task(name: str) -> TaskSpec:
    """The TaskSpec for a task name or GLUE directory name, case-insensitive ('SST-2', 'sst2')."""
    spec = _TASK_ALIASES.get(_normalize_task_name(name))
    if spec is None:
        supported = ", ".join(f"{spec.name} ({'/'.join(spec.directory_names)})" for spec in TASKS.values())
        raise DataError(f"unknown task {name!r}; supported tasks: {supported}")
    return spec


# ---------------------------------------------------------------- raw readers

# A raw record: (line number in the file, column name -> value; str except in jsonl files).
_Record = tuple[int, dict[str, object]]


def _require_file(path: Path, advice: str) -> None:
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a data file. {advice}")
    if not path.is_file():
        raise DataError(f"{path}: no such file. {advice}")


def _read_delimited(
    path: Path, delimiter: str, quoting: int, headerless_columns: Sequence[str] | None = None
) -> tuple[list[str], list[_Record]]:
    """Columns and records of a delimited file; the header is the first non-blank row unless given."""
    columns = list(headerless_columns) if headerless_columns else None
    records: list[_Record] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
            for fields in reader:
                if not "".join(fields).strip():
                    continue
                if columns is None:
                    columns = fields
                    continue
                if len(fields) != len(columns):
                    raise DataError(
                        f"{path}, line {reader.line_num}: found {len(fields)} fields, expected {len(columns)} "
                        f"({', '.join(columns)}). Fix or remove the malformed row."
                    )
                records.append((reader.line_num, dict(zip(columns, fields))))
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num}: unreadable row ({error}). Fix the row.") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error}). Re-save the file as UTF-8.") from error
    if columns is None:
        raise DataError(
            f"{path}: the file is empty, expected a header and data rows. Point to a file with data."
        )
    return columns, records


def _text_value(path: Path, line_number: int, column: str, value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{path}, line {line_number}: column {column!r} holds {type(value).__name__} {value!r}, "
        "expected a string or a number. Fix the row."
    )


def _read_jsonl(path: Path) -> tuple[list[str], list[_Record]]:
    """Columns (union of keys, first-seen order) and records of a JSON-lines file."""
    columns: dict[str, None] = {}
    records: list[_Record] = []
    try:
        with path.open(encoding="utf-8-sig") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{path}, line {line_number}: not valid JSON ({error}). Fix the line."
                    ) from error
                if not isinstance(item, dict):
                    raise DataError(
                        f"{path}, line {line_number}: found a JSON {type(item).__name__}, "
                        "expected one JSON object per line. Fix the line."
                    )
                columns.update(dict.fromkeys(item))
                records.append((line_number, item))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error}). Re-save the file as UTF-8.") from error
    if not records:
        raise DataError(
            f"{path}: the file is empty, expected one JSON object per line. Point to a file with data."
        )
    return list(columns), records


_GENERIC_READERS = {
    ".csv": lambda path: _read_delimited(path, ",", csv.QUOTE_MINIMAL),
    ".tsv": lambda path: _read_delimited(path, "\t", csv.QUOTE_NONE),
    ".jsonl": _read_jsonl,
}


# ---------------------------------------------------------------- records -> dataset


@dataclass(frozen=True)
class _Layout:
    """Which columns hold what, and the advice appended to column and label errors."""

    text_column: str
    text_pair_column: str | None
    label_column: str
    label_names: tuple[str, ...] | None  # None: the sorted values found in the file
    advice: str
    file_labels: tuple[str, ...] | None = None  # the labels as the file writes them, when not by name


def _check_columns(path: Path, columns: list[str], layout: _Layout) -> None:
    wanted = [layout.text_column, layout.text_pair_column, layout.label_column]
    for column in filter(None, wanted):
        if column not in columns:
            raise DataError(
                f"{path}: no column {column!r}; available columns: {', '.join(map(repr, columns))}. {layout.advice}"
            )


def _raw_field(path: Path, record: _Record, column: str) -> object:
    line_number, values = record
    if column not in values:
        raise DataError(
            f"{path}, line {line_number}: column {column!r} is missing from this row. Fix the row."
        )
    return values[column]


def _field(path: Path, record: _Record, column: str) -> str:
    return _text_value(path, record[0], column, _raw_field(path, record, column))


def _label_text(path: Path, line_number: int, column: str, value: object) -> str:
    """A label as text: JSON numbers equal as numbers (1, 1.0) share one spelling; true/false keep JSON's."""
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(
                f"{path}, line {line_number}: label {json.dumps(value)} in column {column!r} is not a whole number; "
                "expected class labels (whole numbers or names). Map the values to classes first."
            )
        value = int(value)
    return _text_value(path, line_number, column, value).strip()


def _check_one_kind_of_label(path: Path, records: list[_Record], column: str) -> None:
    """Many tools read true as 1, so a column mixing true/false with numbers has no clear classes."""
    first_of_kind: dict[str, tuple[int, object]] = {}
    for line_number, values in records:
        value = values.get(column)
        kind = (
            "true/false" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else None
        )
        if kind is not None:
            first_of_kind.setdefault(kind, (line_number, value))
    if len(first_of_kind) == 2:
        (bool_line, bool_value), (number_line, number_value) = (
            first_of_kind["true/false"],
            first_of_kind["number"],
        )
        raise DataError(
            f"{path}: column {column!r} mixes true/false labels (line {bool_line}: {json.dumps(bool_value)}) "
            f"with number labels (line {number_line}: {json.dumps(number_value)}); expected one kind of label. "
            "Write every label the same way."
        )


def _label_values(path: Path, records: list[_Record], column: str) -> list[str]:
    _check_one_kind_of_label(path, records, column)
    return [_label_text(path, record[0], column, _raw_field(path, record, column)) for record in records]


def _infer_label_names(labels: Iterable[str]) -> tuple[str, ...]:
    unique = set(labels)
    try:
        return tuple(sorted(unique, key=int))
    except ValueError:
        return tuple(sorted(unique))


def _label_index(path: Path, line_number: int, value: str, file_labels: tuple[str, ...], advice: str) -> int:
    try:
        return file_labels.index(value)
    except ValueError:
        raise DataError(
            f"{path}, line {line_number}: label {value!r} is not one of {', '.join(map(repr, file_labels))}. {advice}"
        ) from None


def _build_dataset(path: Path, columns: list[str], records: list[_Record], layout: _Layout) -> TextDataset:
    _check_columns(path, columns, layout)
    if not records:
        raise DataError(f"{path}: a header but no data rows. Point to a file with data.")
    label_values = _label_values(path, records, layout.label_column)
    file_labels = layout.file_labels or layout.label_names or _infer_label_names(label_values)
    pair_column = layout.text_pair_column
    return TextDataset(
        texts=[_field(path, record, layout.text_column) for record in records],
        text_pairs=None if pair_column is None else [_field(path, record, pair_column) for record in records],
        labels=[
            _label_index(path, line_number, value, file_labels, layout.advice)
            for (line_number, _), value in zip(records, label_values)
        ],
        label_names=layout.label_names or file_labels,
        source=str(path),
    )


# ---------------------------------------------------------------- public loaders


def load_glue_file(task: str, path: str | Path) -> TextDataset:
    """One train/dev file in the GLUE format of `task`."""
    spec = get_task(task)
    path = Path(path)
    _require_file(
        path,
        f"Expected a {spec.name} GLUE file such as .../{spec.directory_names[0]}/{spec.validation_file}.",
    )
    columns, records = _read_delimited(path, "\t", csv.QUOTE_NONE, spec.headerless_columns)
    layout = _Layout(
        text_column=spec.text_column,
        text_pair_column=spec.text_pair_column,
        label_column=spec.label_column,
        label_names=spec.label_names,
        file_labels=spec.label_values,
        advice=f"Check that this is a {spec.name} ({spec.directory_names[0]}) train/dev file and that the task is right.",
    )
    return _build_dataset(path, columns, records, layout)


def load_glue_split(task: str, data_dir: str | Path, split: str) -> TextDataset:
    """The 'train' or 'validation' split of a GLUE task directory such as .../glue/SST-2."""
    spec = get_task(task)
    data_dir = Path(data_dir)
    file_name = spec.split_file(split)
    if not data_dir.is_dir():
        raise DataError(
            f"{data_dir}: no such directory. Expected the {spec.name} GLUE directory "
            f"(.../{spec.directory_names[0]}) holding {spec.train_file} and {spec.validation_file}."
        )
    path = data_dir / file_name
    if not path.is_file():
        present = ", ".join(sorted(child.name for child in data_dir.iterdir())) or "nothing"
        raise DataError(
            f"{path}: no such file (the directory holds: {present}). The {split} split of {spec.name} "
            f"is read from {file_name}; add that file or choose another split."
        )
    return load_glue_file(spec.name, path)


def load_generic_file(
    path: str | Path,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """A .csv, .tsv (unquoted) or .jsonl file with named text and label columns.

    Labels are read as strings (JSON numbers equal as numbers, 1 and 1.0, are one label "1");
    without `label_names` they are the sorted unique values (numerically sorted when all are integers).
    """
    path = Path(path)
    reader = _GENERIC_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported extension {path.suffix!r}; expected one of {', '.join(_GENERIC_READERS)}. "
            "Convert the file or rename it to match its format."
        )
    _require_file(path, "Check the path.")
    if label_names is not None:
        label_names = tuple(str(name) for name in label_names)
        if len(set(label_names)) != len(label_names):
            raise DataError(f"label_names {label_names} repeat a name; give each label once.")
    columns, records = reader(path)
    layout = _Layout(
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        label_names=label_names,
        advice="Choose the column and label options to match the file.",
    )
    return _build_dataset(path, columns, records, layout)


def load_data(
    data: str | Path,
    task: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    split: str = "validation",
) -> TextDataset:
    """Load the data a CLI points to: a GLUE task directory, one GLUE-format file, or a generic file.

    A directory needs `task` or a GLUE directory name; a GLUE file needs `task`; a csv/tsv/jsonl
    file needs `text_column` and `label_column` (not `task`). `split` applies to directories only.
    """
    path = Path(data)
    column_options = (text_column, text_pair_column, label_column)
    uses_columns = any(option is not None for option in column_options)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory. Check the data path.")
    if path.is_dir():
        if uses_columns:
            raise DataError(
                f"{path} is a directory, but column options were given; those apply to a single csv/tsv/jsonl "
                "file. Point to the file, or drop the column options to read a GLUE task directory."
            )
        dataset = load_glue_split(task or _task_from_directory(path), path, split)
    elif uses_columns:
        if task is not None:
            raise DataError(
                f"{path}: both task {task!r} and column options were given; give the task for a GLUE-format "
                "file or the column options for a generic csv/tsv/jsonl file, not both."
            )
        if text_column is None or label_column is None:
            raise DataError(f"{path}: a generic file needs both text_column and label_column; give both.")
        return load_generic_file(path, text_column, label_column, text_pair_column, label_names)
    elif task is not None:
        dataset = load_glue_file(task, path)
    else:
        raise DataError(
            f"{path}: cannot tell how to read this file. Give the task for a GLUE-format file, "
            "or text_column and label_column for a generic csv/tsv/jsonl file."
        )
    _check_label_names(dataset, label_names)
    return dataset


def _task_from_directory(path: Path) -> str:
    try:
        return get_task(path.name).name
    except DataError:
        raise DataError(
            f"{path}: cannot infer the GLUE task from the directory name {path.name!r}; "
            f"give the task (one of {', '.join(TASKS)})."
        ) from None


def _check_label_names(dataset: TextDataset, label_names: Sequence[str] | None) -> None:
    if label_names is not None and tuple(label_names) != dataset.label_names:
        raise DataError(
            f"{dataset.source}: the task's labels are {list(dataset.label_names)}, but label_names "
            f"{list(label_names)} were given. Drop label_names or use a model trained on this task."
        )
