"""`EarlyExitRuntime`: chains the per-layer graphs and stops each row as soon as its policy says so."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .backends import create_backend
from .backends.base import Backend
from .errors import InputError, PolicyError
from .manifest import Manifest
from .policies import ExitPolicy, ExitRecord, OperatingPoint, build_policy, softmax
from .tokenization import BundleTokenizer, EncodedBatch

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class RowPrediction:
    label: str
    label_index: int
    probabilities: np.ndarray
    exit_layer: int
    confidence: float
    truncated: bool

    def to_dict(self) -> dict:
        return {
            "label": self.label, "label_index": self.label_index,
            "probabilities": [round(float(p), 6) for p in self.probabilities],
            "exit_layer": self.exit_layer, "confidence": round(self.confidence, 6), "truncated": self.truncated,
        }


@dataclass(frozen=True)
class PredictionResult:
    predictions: list[RowPrediction]
    layers_run: int
    num_layers: int
    elapsed_seconds: float
    operating_point: OperatingPoint

    @property
    def layer_speedup(self) -> float:
        """Eq. 4 of the paper: 1 - sum_i m_i / (N * M)."""
        return 1.0 - self.layers_run / (len(self.predictions) * self.num_layers)

    def summary(self) -> dict:
        return {
            "rows": len(self.predictions), "layers_run": self.layers_run, "layer_speedup": round(self.layer_speedup, 6),
            "elapsed_seconds": round(self.elapsed_seconds, 6), "operating_point": self.operating_point.to_dict(),
        }


@dataclass
class AllExits:
    """Every exit's outputs for every row (no early exit): what calibration simulates policies on."""

    logits: np.ndarray  # [N, M, K]
    entropy: np.ndarray  # [N, M]
    max_probability: np.ndarray  # [N, M]
    confidence_score: np.ndarray | None = None  # [N, M]

    def select(self, rows: np.ndarray) -> "AllExits":
        score = None if self.confidence_score is None else self.confidence_score[rows]
        return AllExits(self.logits[rows], self.entropy[rows], self.max_probability[rows], score)

    def layer(self, index: int) -> ExitRecord:
        score = None if self.confidence_score is None else self.confidence_score[:, index]
        return ExitRecord(self.logits[:, index], self.entropy[:, index], self.max_probability[:, index], score)

    @classmethod
    def concatenate(cls, parts: list["AllExits"]) -> "AllExits":
        scores = None if parts[0].confidence_score is None else np.concatenate([p.confidence_score for p in parts])
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("logits", "entropy", "max_probability")), scores)


@dataclass
class BatchOutcome:
    exit_layer: np.ndarray
    probabilities: np.ndarray
    confidence: np.ndarray

    @classmethod
    def empty(cls, rows: int, num_labels: int) -> "BatchOutcome":
        return cls(np.zeros(rows, np.int64), np.zeros((rows, num_labels), np.float32), np.zeros(rows, np.float32))


class EarlyExitRuntime:
    """Load a bundle once; serve `predict` from many threads; switch operating points live."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend, operating_point: OperatingPoint):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = BundleTokenizer(bundle_dir / manifest.tokenizer_files[0], manifest.model.max_seq_len)
        self._policy_lock = threading.Lock()
        self._policy = self.make_policy(operating_point)

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | Path,
        backend: str = "auto",
        operating_point: OperatingPoint | dict | str | None = None,
        verify_hashes: bool = True,
        intra_op_threads: int | None = None,
    ) -> "EarlyExitRuntime":
        """Load and check a bundle.

        backend: 'auto', 'onnxruntime' (CPU, or CUDA when available), 'onnxruntime-cpu',
        'onnxruntime-cuda', 'tensorrt'. intra_op_threads: onnxruntime CPU threads per session
        (default: one per core).
        """
        bundle_dir = Path(bundle_dir)
        manifest = Manifest.load(bundle_dir, verify_hashes=verify_hashes)
        runner = create_backend(backend, manifest, bundle_dir, intra_op_threads=intra_op_threads)
        runtime = cls(bundle_dir, manifest, runner, OperatingPoint.from_dict(manifest.operating_point))
        if operating_point is not None:
            runtime.set_operating_point(operating_point)
        return runtime

    # -- facts about what was loaded ---------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.model.labels)

    @property
    def num_layers(self) -> int:
        return self.manifest.model.num_layers

    @property
    def operating_point(self) -> OperatingPoint:
        return self._policy.point

    # -- operating points --------------------------------------------------------------------------
    def resolve_operating_point(self, point: OperatingPoint | dict | str) -> OperatingPoint:
        """A point object, its dict form, or the name of a point saved in the manifest."""
        if isinstance(point, OperatingPoint):
            return point
        if isinstance(point, dict):
            return OperatingPoint.from_dict(point)
        if isinstance(point, str):
            for saved in self.manifest.operating_points:
                if saved.get("name") == point:
                    return OperatingPoint.from_dict(saved)
            names = [saved.get("name") for saved in self.manifest.operating_points]
            raise PolicyError(f"no operating point named {point!r} in the manifest; saved points: {names}")
        raise PolicyError(f"operating point must be an OperatingPoint, dict or saved name, got {type(point).__name__}")

    def make_policy(self, point: OperatingPoint | dict | str) -> ExitPolicy:
        return build_policy(self.resolve_operating_point(point), self.num_layers, self.manifest.model.learned_confidence)

    def set_operating_point(self, point: OperatingPoint | dict | str) -> OperatingPoint:
        """Switch the default policy for later calls; calls already running keep the one they started with."""
        policy = self.make_policy(point)
        with self._policy_lock:
            self._policy = policy
        return policy.point

    # -- prediction --------------------------------------------------------------------------------
    def predict(
        self,
        texts: Sequence[str] | str,
        text_pairs: Sequence[str] | str | None = None,
        operating_point: OperatingPoint | dict | str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> PredictionResult:
        """Classify texts (or sentence pairs). A single string is treated as a one-row batch."""
        if isinstance(texts, str):
            texts = [texts]
            text_pairs = [text_pairs] if isinstance(text_pairs, str) else text_pairs
        batch = self.tokenizer.encode_texts(texts, text_pairs)
        return self.predict_encoded(batch, operating_point, batch_size)

    def predict_ids(
        self,
        token_ids: Sequence[Sequence[int]],
        token_type_ids: Sequence[Sequence[int]] | None = None,
        operating_point: OperatingPoint | dict | str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> PredictionResult:
        """Classify already-tokenized rows (special tokens included)."""
        return self.predict_encoded(self.tokenizer.encode_ids(token_ids, token_type_ids), operating_point, batch_size)

    def predict_encoded(self, batch: EncodedBatch, operating_point=None, batch_size: int = DEFAULT_BATCH_SIZE) -> PredictionResult:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        policy = self._policy if operating_point is None else self.make_policy(operating_point)
        started = time.perf_counter()
        outcome = self.run_in_chunks(batch, policy, batch_size)
        elapsed = time.perf_counter() - started
        return PredictionResult(
            predictions=self.rows(outcome, batch.truncated),
            layers_run=int(outcome.exit_layer.sum()),
            num_layers=self.num_layers,
            elapsed_seconds=elapsed,
            operating_point=policy.point,
        )

    def rows(self, outcome: BatchOutcome, truncated: np.ndarray) -> list[RowPrediction]:
        labels = self.labels
        predictions = []
        for row, probabilities in enumerate(outcome.probabilities):
            index = int(np.argmax(probabilities))
            predictions.append(RowPrediction(
                labels[index], index, probabilities, int(outcome.exit_layer[row]),
                float(outcome.confidence[row]), bool(truncated[row]),
            ))
        return predictions

    def run_in_chunks(self, batch: EncodedBatch, policy: ExitPolicy, batch_size: int) -> BatchOutcome:
        """Rows sorted by length into chunks of batch_size (little padding), results in input order."""
        if len(batch) <= batch_size:  # one chunk: already padded to its own longest row
            return self.run_batch(batch, policy)
        outcome = BatchOutcome.empty(len(batch), len(self.labels))
        for rows in length_sorted_chunks(batch, batch_size):
            part = self.run_batch(batch.select(rows), policy)
            outcome.exit_layer[rows] = part.exit_layer
            outcome.probabilities[rows] = part.probabilities
            outcome.confidence[rows] = part.confidence
        return outcome

    def run_batch(self, batch: EncodedBatch, policy: ExitPolicy) -> BatchOutcome:
        return run_early_exit(self.backend, policy, batch, len(self.labels))

    def run_all_exits(self, batch: EncodedBatch, batch_size: int = DEFAULT_BATCH_SIZE, on_chunk: Callable[[int], None] | None = None) -> AllExits:
        """Every exit of every row, in input order (calibration's one pass over the data).

        `on_chunk` hears how many rows each finished chunk held (for a progress bar).
        """
        chunks = length_sorted_chunks(batch, batch_size)
        parts = []
        for rows in chunks:
            state = self.backend.begin(batch.select(rows))
            try:
                parts.append(stack_records(self.backend.run_layers(state, 0, self.num_layers)))
            finally:
                self.backend.finish(state)
            if on_chunk is not None:
                on_chunk(len(rows))
        return AllExits.concatenate(parts).select(np.argsort(np.concatenate(chunks)))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "EarlyExitRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def length_sorted_chunks(batch: EncodedBatch, batch_size: int) -> list[np.ndarray]:
    """Row indices sorted by length, cut into chunks of batch_size, so each chunk pads little."""
    order = np.argsort(batch.attention_mask.sum(axis=1), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(batch), batch_size)]


def run_early_exit(backend: Backend, policy: ExitPolicy, batch: EncodedBatch, num_labels: int) -> BatchOutcome:
    """One batch through the chain: rows exit independently and leave the batch (compaction)."""
    outcome = BatchOutcome.empty(len(batch), num_labels)
    policy_state = policy.start(len(batch), num_labels)
    active = np.arange(len(batch))
    layers_done = 0
    state = backend.begin(batch)
    try:
        while active.size:
            span = policy.layers_until_possible_exit(policy_state, layers_done)
            records = backend.run_layers(state, layers_done, span)
            exited = settle_span(policy, policy_state, records, layers_done, backend.num_layers, outcome, active)
            layers_done += span
            keep = ~exited
            if keep.any():
                state = backend.compact(state, keep)
                policy_state = policy_state.select(keep)
            active = active[keep]
    finally:
        backend.finish(state)
    return outcome


def settle_span(policy, policy_state, records, layers_done, num_layers, outcome, active) -> np.ndarray:
    """Step the policy through a span's layers; record the rows that exit; return their mask."""
    exited = np.zeros(active.size, dtype=bool)
    for layer, record in enumerate(records, start=layers_done + 1):
        leaving = policy.step(policy_state, layer, record) & ~exited
        if leaving.any():
            rows = np.flatnonzero(leaving)
            probabilities = policy.exit_probabilities(policy_state, record, rows)
            record_exits(outcome, active[rows], layer, probabilities, policy.exit_confidence(record, rows))
            exited |= leaving
        if layer == num_layers and not exited.all():
            # Never satisfied: the row takes the last exit's prediction.
            rows = np.flatnonzero(~exited)
            record_exits(outcome, active[rows], layer, softmax(record.logits[rows]), policy.exit_confidence(record, rows))
            exited[:] = True
    return exited


def record_exits(outcome: BatchOutcome, rows: np.ndarray, layer: int, probabilities: np.ndarray, confidence: np.ndarray) -> None:
    outcome.exit_layer[rows] = layer
    outcome.probabilities[rows] = probabilities
    outcome.confidence[rows] = confidence


def stack_records(records: list[ExitRecord]) -> AllExits:
    scores = None if records[0].confidence_score is None else np.stack([r.confidence_score for r in records], axis=1)
    return AllExits(
        np.stack([r.logits for r in records], axis=1),
        np.stack([r.entropy for r in records], axis=1),
        np.stack([r.max_probability for r in records], axis=1),
        scores,
    )
