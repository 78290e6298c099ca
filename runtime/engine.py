"""`EarlyExitRuntime`: chains the per-layer graphs and stops each row as soon as its policy says so."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import DEFAULT_MAX_CONCURRENCY, create_backend
from .backends.base import Backend
from .errors import BundleError, InputError, PolicyError
from .exits import AllExits, BatchOutcome, layer_speedup
from .loop import DEFAULT_BATCH_SIZE, record_every_exit, run_in_chunks
from .manifest import Manifest
from .policies import FULL_POLICY, ExitPolicy, OperatingPoint, build_policy
from .tokenization import BundleTokenizer, EncodedBatch

PointLike = OperatingPoint | dict | str
FULL_POINT = OperatingPoint(FULL_POLICY, name=FULL_POLICY)  # what a backend with the last exit only serves
POLICY_CACHE_SIZE = 64  # distinct points kept built; requests naming more are built each call


@dataclass(frozen=True)
class RowPrediction:
    label: str
    label_index: int
    probabilities: np.ndarray
    exit_layer: int
    exit_signal: float  # what the policy judged at the exit layer, named by exit_signal_name
    exit_signal_name: str  # normalized_entropy (lower = more confident), max_probability or learned_score
    truncated: bool

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "label_index": self.label_index,
            "probabilities": [round(float(p), 6) for p in self.probabilities],
            "exit_layer": self.exit_layer,
            "exit_signal": round(self.exit_signal, 6),
            "exit_signal_name": self.exit_signal_name,
            "truncated": self.truncated,
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
        return layer_speedup(self.layers_run, len(self.predictions), self.num_layers)

    def summary(self) -> dict:
        return {
            "rows": len(self.predictions),
            "layers_run": self.layers_run,
            "layer_speedup": round(self.layer_speedup, 6),
            "elapsed_seconds": round(self.elapsed_seconds, 6),
            "operating_point": self.operating_point.to_dict(),
        }


class EarlyExitRuntime:
    """Load a bundle once; serve `predict` from many threads; switch operating points live."""

    def __init__(
        self, bundle_dir: Path, manifest: Manifest, backend: Backend, operating_point: OperatingPoint
    ):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = open_tokenizer(bundle_dir, manifest)
        self._policy_lock = threading.Lock()
        self._built_policies: dict[
            OperatingPoint, ExitPolicy
        ] = {}  # policies are immutable: safe to share between threads
        self._policy = self.make_policy(operating_point)

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | Path,
        backend: str = "auto",
        operating_point: PointLike | None = None,
        verify_hashes: bool = True,
        intra_op_threads: int | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> EarlyExitRuntime:
        """Load and check a bundle.

        backend: 'auto', 'onnxruntime' (CPU, or CUDA when available), 'onnxruntime-cpu',
        'onnxruntime-cuda', 'tensorrt', or 'onnxruntime-single-graph' (the bundle's whole-model graph,
        --with-full-graph; full operating point only). intra_op_threads: onnxruntime CPU threads per session
        (default: one per core). max_concurrency: callers the TensorRT backend serves at once,
        each with its own execution contexts; more wait (bounds GPU memory).
        """
        bundle_dir = Path(bundle_dir)
        manifest = Manifest.load(bundle_dir, verify_hashes=verify_hashes)
        runner = create_backend(
            backend,
            manifest.graph_chain(bundle_dir),
            manifest.engine_chain(bundle_dir),
            intra_op_threads,
            max_concurrency,
        )
        try:
            runtime = cls(
                bundle_dir,
                manifest,
                runner,
                FULL_POINT if runner.only_full_point else manifest.operating_point,
            )
            if operating_point is not None:
                runtime.set_operating_point(operating_point)
        except BaseException:
            runner.close()
            raise
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
    def takes_pairs(self) -> bool:
        return self.manifest.model.task_type == "sentence_pair"

    @property
    def operating_point(self) -> OperatingPoint:
        return self._policy.point

    # -- operating points --------------------------------------------------------------------------
    def resolve_operating_point(self, point: PointLike) -> OperatingPoint:
        """A point object, its dict form, or the name of a point saved in the manifest."""
        if isinstance(point, OperatingPoint):
            return point
        if isinstance(point, dict):
            return OperatingPoint.from_dict(point)
        if isinstance(point, str):
            saved = self.manifest.saved_point(point)
            if saved is None and point == FULL_POINT.name:  # every bundle can serve it, saved or not
                return FULL_POINT
            if saved is None:
                names = [saved.name for saved in self.manifest.operating_points]
                raise PolicyError(
                    f"no operating point named {point!r} in the manifest; saved points: {names}"
                )
            return saved
        raise PolicyError(
            f"operating point must be an OperatingPoint, dict or saved name, got {type(point).__name__}"
        )

    def make_policy(self, point: PointLike) -> ExitPolicy:
        """The validated policy of `point`; points already seen come from a small cache (a request may name one per call)."""
        resolved = self.resolve_operating_point(point)
        policy = self._built_policies.get(resolved)
        if policy is None:
            policy = self.build_checked_policy(resolved)
            if len(self._built_policies) < POLICY_CACHE_SIZE:
                self._built_policies[resolved] = policy
        return policy

    def build_checked_policy(self, point: OperatingPoint) -> ExitPolicy:
        if self.backend.only_full_point and point.policy != FULL_POINT.policy:
            raise PolicyError(
                f"backend {self.backend.name!r} runs the whole model as one graph, which has only the last exit: "
                f"it serves the full operating point only, not policy {point.policy!r}"
            )
        return build_policy(point, self.num_layers, self.manifest.model.learned_confidence)

    def set_operating_point(self, point: PointLike) -> OperatingPoint:
        """Switch the default policy for later calls; calls already running keep the one they started with.

        A point that does not validate raises `PolicyError` and leaves the current one in place.
        """
        policy = self.make_policy(point)
        with self._policy_lock:
            self._policy = policy
        return policy.point

    # -- prediction --------------------------------------------------------------------------------
    def predict(
        self,
        texts: Sequence[str] | str,
        text_pairs: Sequence[str] | str | None = None,
        operating_point: PointLike | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> PredictionResult:
        """Classify texts (or sentence pairs, for a pair bundle). A single string is a one-row batch."""
        if isinstance(texts, str):
            texts = [texts]
            text_pairs = [text_pairs] if isinstance(text_pairs, str) else text_pairs
        self.check_pairing(text_pairs)
        batch = self.tokenizer.encode_texts(texts, text_pairs)
        return self.predict_encoded(batch, operating_point, batch_size)

    def check_pairing(self, text_pairs) -> None:
        if self.takes_pairs and text_pairs is None:
            raise InputError(
                "this bundle's model classifies sentence pairs; give text_pairs, one second sentence per text"
            )
        if not self.takes_pairs and text_pairs is not None:
            raise InputError(
                "this bundle's model classifies single sentences; drop text_pairs (or use a bundle trained on pairs)"
            )

    def predict_ids(
        self,
        token_ids: Sequence[Sequence[int]],
        token_type_ids: Sequence[Sequence[int]] | None = None,
        operating_point: PointLike | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> PredictionResult:
        """Classify already-tokenized rows (special tokens included)."""
        return self.predict_encoded(
            self.tokenizer.encode_ids(token_ids, token_type_ids), operating_point, batch_size
        )

    def predict_encoded(
        self,
        batch: EncodedBatch,
        operating_point: PointLike | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> PredictionResult:
        check_batch_size(batch_size)
        policy = self._policy if operating_point is None else self.make_policy(operating_point)
        started = time.perf_counter()
        outcome = run_in_chunks(
            self.backend, policy, batch, len(self.labels), rows_per_chunk(batch_size, self.backend)
        )
        elapsed = time.perf_counter() - started
        return PredictionResult(
            predictions=self.rows(outcome, batch.truncated, policy.exit_signal_name),
            layers_run=int(outcome.exit_layer.sum()),
            num_layers=self.num_layers,
            elapsed_seconds=elapsed,
            operating_point=policy.point,
        )

    def rows(self, outcome: BatchOutcome, truncated: np.ndarray, signal_name: str) -> list[RowPrediction]:
        labels = self.labels
        predictions = []
        for row, probabilities in enumerate(outcome.probabilities):
            index = int(np.argmax(probabilities))
            predictions.append(
                RowPrediction(
                    labels[index],
                    index,
                    probabilities,
                    int(outcome.exit_layer[row]),
                    float(outcome.confidence[row]),
                    signal_name,
                    bool(truncated[row]),
                )
            )
        return predictions

    def run_all_exits(
        self,
        batch: EncodedBatch,
        batch_size: int = DEFAULT_BATCH_SIZE,
        on_chunk: Callable[[int], None] | None = None,
    ) -> AllExits:
        """Every exit of every row, in input order (calibration's one pass over the data)."""
        check_batch_size(batch_size)
        if self.backend.only_full_point:
            raise PolicyError(
                f"the {self.backend_name} backend runs the whole model as one graph and has only the last exit; "
                "record every exit (pcee-calibrate, pcee-eval) with a per-layer backend such as onnxruntime"
            )
        return record_every_exit(self.backend, batch, rows_per_chunk(batch_size, self.backend), on_chunk)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> EarlyExitRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")


def rows_per_chunk(batch_size: int, backend: Backend) -> int:
    """batch_size, or fewer where the backend takes fewer rows at once (TensorRT engines built with a smaller batch)."""
    return batch_size if backend.max_rows is None else min(batch_size, backend.max_rows)


def open_tokenizer(bundle_dir: Path, manifest: Manifest) -> BundleTokenizer:
    """The bundle's tokenizer, which must not produce ids past the model's embedding table."""
    path = bundle_dir / manifest.tokenizer.files[0].file
    tokenizer = BundleTokenizer(path, manifest.model.max_seq_len)
    if tokenizer.vocab_size > manifest.model.vocab_size:
        raise BundleError(
            f"{path} has a vocabulary of {tokenizer.vocab_size} tokens but the model's embedding table has "
            f"{manifest.model.vocab_size} (model.vocab_size in the manifest): the tokenizer is not this model's; re-export the bundle"
        )
    return tokenizer
