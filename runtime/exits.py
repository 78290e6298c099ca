"""The exit data types: what a layer's exit reports per row, and what a batch's rows end up with.

Everything here is host memory (numpy). `select` keeps a subset of rows of any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np


class RowSelect:
    """Row selection for dataclasses whose array fields all have rows on their first axis."""

    def select(self, rows: np.ndarray):
        """The same record restricted to `rows` (an index array or a boolean mask); None fields stay None."""
        return replace(
            self,
            **{
                field.name: getattr(self, field.name)[rows]
                for field in fields(self)
                if getattr(self, field.name) is not None
            },
        )


@dataclass
class ExitRecord(RowSelect):
    """One layer's exit outputs for a set of rows."""

    logits: np.ndarray  # [n, K]
    entropy: np.ndarray  # [n], normalized entropy in [0, 1]
    max_probability: np.ndarray  # [n]
    confidence_score: np.ndarray | None = None  # [n], models trained with a learned confidence only


@dataclass
class AllExits(RowSelect):
    """Every exit's outputs for every row (no early exit): what calibration simulates policies on."""

    logits: np.ndarray  # [N, M, K]
    entropy: np.ndarray  # [N, M]
    max_probability: np.ndarray  # [N, M]
    confidence_score: np.ndarray | None = None  # [N, M]

    @property
    def num_layers(self) -> int:
        return self.logits.shape[1]

    def layer(self, index: int) -> ExitRecord:
        """The 0-based layer `index` of every row."""
        return ExitRecord(
            **{
                field.name: None if getattr(self, field.name) is None else getattr(self, field.name)[:, index]
                for field in fields(self)
            }
        )

    @classmethod
    def stack(cls, records: list[ExitRecord]) -> AllExits:
        """The records of consecutive layers (same rows) as one [rows, layers, ...] recording."""
        return cls(
            **{
                field.name: None
                if getattr(records[0], field.name) is None
                else np.stack([getattr(r, field.name) for r in records], axis=1)
                for field in fields(ExitRecord)
            }
        )

    @classmethod
    def concatenate(cls, parts: list[AllExits]) -> AllExits:
        """Recordings of disjoint row sets, one after another."""
        return cls(
            **{
                field.name: None
                if getattr(parts[0], field.name) is None
                else np.concatenate([getattr(p, field.name) for p in parts])
                for field in fields(cls)
            }
        )


@dataclass
class BatchOutcome:
    """What each row of a batch ended with: its exit layer (1-based), prediction and confidence."""

    exit_layer: np.ndarray  # int64 [n]
    probabilities: np.ndarray  # float32 [n, K]
    confidence: np.ndarray  # float32 [n]

    @classmethod
    def empty(cls, rows: int, num_labels: int) -> BatchOutcome:
        return cls(
            np.zeros(rows, np.int64), np.zeros((rows, num_labels), np.float32), np.zeros(rows, np.float32)
        )

    def record(self, rows: np.ndarray, layer: int, probabilities: np.ndarray, confidence: np.ndarray) -> None:
        self.exit_layer[rows] = layer
        self.probabilities[rows] = probabilities
        self.confidence[rows] = confidence

    def place(self, rows: np.ndarray, part: BatchOutcome) -> None:
        """Put the outcome of a chunk of rows back at their positions in this larger batch."""
        self.record(rows, part.exit_layer, part.probabilities, part.confidence)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def layer_speedup(layers_run: int, rows: int, num_layers: int) -> float:
    """Eq. 4 of the paper, 1 - sum_i m_i / (N * M), as one integer division so exact targets compare exactly."""
    total = rows * num_layers
    return (total - int(layers_run)) / total
