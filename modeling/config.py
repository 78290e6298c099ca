"""The pcee block of a multi-exit model's HF-style `config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ModelDirectoryError

EXIT_POOLINGS = ("cls", "mean")
EXIT_HEADS = ("shared_pooler", "per_exit_pooler")
LOSS_WEIGHTINGS = ("weighted", "uniform")


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
    def from_dict(cls, data: dict) -> "PceeConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


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
