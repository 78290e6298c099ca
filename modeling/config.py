"""The pcee block of a multi-exit model's HF-style `config.json`."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .data import DataError, TaskSpec, get_task
from .errors import ModelDirectoryError

EXIT_POOLINGS = ("cls", "mean")
EXIT_HEADS = ("shared_pooler", "per_exit_pooler")
LOSS_WEIGHTINGS = ("weighted", "uniform")
GENERIC_LABEL_NAME = re.compile(
    r"LABEL_\d+"
)  # what transformers fills id2label with when nobody named the labels


@dataclass
class PceeConfig:
    """Everything about the exits that the backbone's own config does not say."""

    num_labels: int
    label_names: list[str] = field(default_factory=list)
    exit_pooling: str = "cls"
    exit_head: str = "shared_pooler"
    learned_confidence: bool = False
    loss_weighting: str = "weighted"
    classifier_dropout: float = 0.1
    max_seq_len: int = 128
    task: str | None = None
    metric: str = "accuracy"
    sentence_pair: bool = False  # trained on text pairs (set by pcee-train from the data)

    def __post_init__(self) -> None:
        if not self.label_names:
            self.label_names = [str(index) for index in range(self.num_labels)]
        self._check_choice("exit_pooling", EXIT_POOLINGS)
        self._check_choice("exit_head", EXIT_HEADS)
        self._check_choice("loss_weighting", LOSS_WEIGHTINGS)
        if self.num_labels < 2 or len(self.label_names) != self.num_labels:
            raise ModelDirectoryError(
                f"pcee config: num_labels={self.num_labels} with label_names={self.label_names}; "
                "expected at least 2 labels and one name per label"
            )

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ModelDirectoryError(f"pcee config: {name}={value!r}; expected one of {', '.join(allowed)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PceeConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def for_reference_checkpoint(cls, id2label: Mapping[int, str], finetuning_task: str | None) -> PceeConfig:
        """The pcee block a reference PABEE/PCEE checkpoint lacks, from what its config.json says.

        Label names come from id2label unless they are all transformers' LABEL_<i> placeholders. The
        reference code records its GLUE task as finetuning_task ('sst-2', 'mrpc'); a pair task makes a
        pair model, and the task picks the metric. The task itself is not recorded: the checkpoint's
        label names are not the task's, and a recorded task would make calibration expect the latter.
        """
        names = [str(id2label[index]) for index in sorted(id2label)]
        if all(GENERIC_LABEL_NAME.fullmatch(name) for name in names):
            names = []
        task = glue_task_or_none(finetuning_task)
        return cls(
            num_labels=len(id2label),
            label_names=names,
            sentence_pair=task is not None and task.is_pair,
            metric=task.metric if task else "accuracy",
        )


def glue_task_or_none(name: str | None) -> TaskSpec | None:
    """The GLUE TaskSpec a task name stands for; None for no name or a task of the user's own."""
    try:
        return None if name is None else get_task(name)
    except DataError:
        return None


def default_exit_pooling(backbone_dir: str | Path) -> str:
    """'mean' for a sentence-transformers backbone trained with mean pooling, else the reference 'cls'.

    Measured on the MiniLM demo backbone: the reference first-token head leaves exits 1-3 collapsed,
    while masked mean pooling trains them.
    """
    pooling_config = Path(backbone_dir) / "1_Pooling" / "config.json"
    if not pooling_config.is_file():
        return "cls"
    try:
        settings = json.loads(pooling_config.read_text())
    except (OSError, json.JSONDecodeError):
        return "cls"
    return "mean" if settings.get("pooling_mode_mean_tokens") else "cls"
