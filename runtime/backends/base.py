"""The backend interface: one small runner per engine kind, in the spirit of Polygraphy's runners.

A backend runs the embeddings graph on a batch, then layers on the rows still running. The hidden
state stays in the backend's own memory (numpy on CPU, device buffers on a GPU); only the per-row
exit outputs (`ExitRecord`: logits, entropy, max probability, learned score) come back to the host.
Public methods check their arguments and call the `_impl` methods that each backend overrides.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..errors import BackendError
from ..exits import ExitRecord
from ..tokenization import EncodedBatch


class Backend(ABC):
    name: str = "abstract"
    only_full_point: bool = False  # it has the last exit only (the single graph): no early exit
    use_single_row_graph: bool = True  # False: single rows run through the chain too (to compare the two)

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    @property
    @abstractmethod
    def device(self) -> str:
        """Where the graphs actually run, e.g. 'cpu' or 'cuda:0 (NVIDIA H200)'."""

    @property
    def max_rows(self) -> int | None:
        """The most rows `begin` takes at once (TensorRT: the engines' profile); None for no limit."""
        return None

    def begin(self, batch: EncodedBatch) -> object:
        """Run the embeddings graph; returns this call's state (hidden state and attention bias)."""
        if len(batch) == 0:
            raise BackendError("begin() needs at least one row")
        return self._begin_impl(batch)

    def run_layers(self, state: object, first_layer: int, count: int) -> list[ExitRecord]:
        """Run layers first_layer..first_layer+count-1 (0-based) back to back; one host sync at the end."""
        if count < 1 or first_layer < 0 or first_layer + count > self.num_layers:
            raise BackendError(f"cannot run {count} layers from layer {first_layer} of {self.num_layers}")
        return self._run_layers_impl(state, first_layer, count)

    def compact(self, state: object, keep: np.ndarray) -> object:
        """Keep only the rows where `keep` is true, so later layers compute only those."""
        if keep.dtype != bool:
            raise BackendError("compact() needs a boolean row mask")
        return state if keep.all() else self._compact_impl(state, keep)

    def finish(self, state: object) -> None:
        """The call is over: give back what `begin` took (a GPU backend's execution contexts)."""
        self._finish_impl(state)

    def close(self) -> None:
        """Free what this backend created."""

    def single_row_graph(self):
        """The compiled single-row early-exit graphs (runtime/single_row.py) if this backend has them, else None."""
        return None

    def _finish_impl(self, state: object) -> None:
        """Nothing to give back by default: the state is plain memory."""

    @abstractmethod
    def _begin_impl(self, batch: EncodedBatch) -> object: ...

    @abstractmethod
    def _run_layers_impl(self, state: object, first_layer: int, count: int) -> list[ExitRecord]: ...

    @abstractmethod
    def _compact_impl(self, state: object, keep: np.ndarray) -> object: ...
