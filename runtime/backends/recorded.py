"""A backend that serves exits recorded earlier: calibration replays policies through it offline.

Running a recording through the same `run_early_exit` loop (`loop.replay`) the live runtime uses (spans,
compaction, the last-layer rule) makes simulated exits the served ones by construction.
"""

from __future__ import annotations

import numpy as np

from ..exits import AllExits, ExitRecord
from ..tokenization import EncodedBatch
from .base import Backend


class RecordedExitsBackend(Backend):
    """Its state is the original index of each row still running; no model runs."""

    name = "recorded"

    def __init__(self, exits: AllExits):
        super().__init__(exits.num_layers)
        self.exits = exits

    @property
    def device(self) -> str:
        return "memory"

    def placeholder_batch(self) -> EncodedBatch:
        """A batch with one row per recorded row: the loop only needs its length."""
        rows = len(self.exits.logits)
        tokens = np.zeros((rows, 1), dtype=np.int64)
        return EncodedBatch(tokens, tokens, tokens, np.zeros(rows, dtype=bool))

    def _begin_impl(self, batch):
        return np.arange(len(batch))

    def _run_layers_impl(self, rows, first_layer, count) -> list[ExitRecord]:
        return [self.exits.layer(layer).select(rows) for layer in range(first_layer, first_layer + count)]

    def _compact_impl(self, rows, keep):
        return rows[keep]
