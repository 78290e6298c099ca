"""The early-exit loop: one batch through the chain of layers, rows leaving as their policy says.

`run_early_exit` is the one loop: the runtime serves with it, and calibration replays recordings
through it (`replay`), so simulated and served exits agree by construction. Large inputs are cut
into length-sorted chunks (`run_in_chunks`, `record_every_exit`) so that each chunk pads little.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .backends.base import Backend
from .backends.recorded import RecordedExitsBackend
from .errors import PolicyError
from .exits import AllExits, BatchOutcome, ExitRecord, softmax
from .policies import ExitPolicy, PolicyState
from .tokenization import EncodedBatch

DEFAULT_BATCH_SIZE = 32


def length_sorted_chunks(batch: EncodedBatch, batch_size: int) -> list[np.ndarray]:
    """Row indices sorted by length, cut into chunks of batch_size, so each chunk pads little."""
    order = np.argsort(batch.attention_mask.sum(axis=1), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(batch), batch_size)]


def run_in_chunks(
    backend: Backend, policy: ExitPolicy, batch: EncodedBatch, num_labels: int, batch_size: int
) -> BatchOutcome:
    """Early exit over any number of rows, `batch_size` at a time; results in input order."""
    if len(batch) <= batch_size:  # one chunk: already padded to its own longest row
        return run_early_exit(backend, policy, batch, num_labels)
    outcome = BatchOutcome.empty(len(batch), num_labels)
    for rows in length_sorted_chunks(batch, batch_size):
        outcome.place(rows, run_early_exit(backend, policy, batch.select(rows), num_labels))
    return outcome


def run_early_exit(
    backend: Backend, policy: ExitPolicy, batch: EncodedBatch, num_labels: int
) -> BatchOutcome:
    """One batch through the chain: rows exit independently and leave the batch (compaction).

    A single row goes through the backend's compiled single-row graph where it has one: one call,
    the same exit (runtime/single_row.py).
    """
    if len(batch) == 1:
        compiled = backend.single_row_graph()
        outcome = None if compiled is None else compiled.outcome(policy, batch, num_labels)
        if outcome is not None:
            return outcome
    outcome = BatchOutcome.empty(len(batch), num_labels)
    policy_state = policy.start(len(batch), num_labels)
    active = np.arange(len(batch))
    layers_done = 0
    state = backend.begin(batch)
    try:
        while active.size:
            span = policy.layers_until_possible_exit(policy_state, layers_done)
            records = backend.run_layers(state, layers_done, span)
            exited = settle_span(policy, policy_state, records, layers_done, outcome, active)
            layers_done += span
            if not exited.any():  # nobody left: nothing to compact (the common case between exits)
                continue
            keep = ~exited
            if keep.any():
                state = backend.compact(state, keep)
                policy_state = policy_state.select(keep)
            active = active[keep]
    finally:
        backend.finish(state)
    return outcome


def settle_span(
    policy: ExitPolicy,
    policy_state: PolicyState,
    records: list[ExitRecord],
    layers_done: int,
    outcome: BatchOutcome,
    active: np.ndarray,
) -> np.ndarray:
    """Step the policy through a span's layers; record the rows that exit at its last layer; return their mask.

    No row can exit before a span's last layer (what `layers_until_possible_exit` promises), so the
    layers before it only advance the policy's state: at batch 1 every array operation skipped counts.
    """
    last_layer = layers_done + len(records)
    for layer, record in enumerate(records[:-1], start=layers_done + 1):
        policy.step(policy_state, layer, record)
    record = records[-1]
    leaving = policy.step(policy_state, last_layer, record)
    if leaving.any():
        rows = np.flatnonzero(leaving)
        outcome.record(
            active[rows],
            last_layer,
            policy.exit_probabilities(policy_state, record, rows),
            policy.exit_confidence(record, rows),
        )
    if last_layer == policy.num_layers and not leaving.all():
        # Never satisfied: the row takes the last exit's prediction.
        rows = np.flatnonzero(~leaving)
        outcome.record(
            active[rows], last_layer, softmax(record.logits[rows]), policy.exit_confidence(record, rows)
        )
        return np.ones(active.size, dtype=bool)
    return leaving


def run_every_exit(backend: Backend, batch: EncodedBatch) -> AllExits:
    """Every layer's exit for every row of one batch, padded as given (no early exit, no compaction)."""
    state = backend.begin(batch)
    try:
        return AllExits.stack(backend.run_layers(state, 0, backend.num_layers))
    finally:
        backend.finish(state)


def record_every_exit(
    backend: Backend,
    batch: EncodedBatch,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_chunk: Callable[[int], None] | None = None,
) -> AllExits:
    """Every exit of every row, in input order (calibration's one pass over the data).

    `on_chunk` hears how many rows each finished chunk held (for a progress bar).
    """
    chunks = length_sorted_chunks(batch, batch_size)
    parts = []
    for rows in chunks:
        parts.append(run_every_exit(backend, batch.select(rows)))
        if on_chunk is not None:
            on_chunk(len(rows))
    return AllExits.concatenate(parts).select(np.argsort(np.concatenate(chunks)))


def replay(policy: ExitPolicy, exits: AllExits) -> BatchOutcome:
    """Each recorded row's exit under `policy`, through the same loop the runtime serves with."""
    if policy.num_layers != exits.num_layers:
        raise PolicyError(
            f"policy built for {policy.num_layers} layers cannot replay a recording of {exits.num_layers}"
        )
    backend = RecordedExitsBackend(exits)
    return run_early_exit(backend, policy, backend.placeholder_batch(), exits.logits.shape[2])
