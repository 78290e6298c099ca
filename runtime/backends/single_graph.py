"""The whole model as one onnxruntime CPU graph (`onnx/full_model.onnx`): the single-graph baseline, served.

The graph has only the last exit, so this backend serves only the full operating point: `begin` runs
the whole model, and `run_layers` must be asked for every layer at once. Its M records all carry the
last exit's outputs (the full policy reads only the last). The exit outputs the layer graphs compute
inside (normalized entropy, max probability) are computed here from the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import graphs
from ..errors import BackendError, BundleError
from ..exits import ExitRecord, softmax
from ..graphs import GraphChain, LocatedGraph
from ..tokenization import EncodedBatch
from .base import Backend
from .onnxruntime_cpu import check_session, cpu_session_options, open_session, token_feeds


class SingleGraphSession:
    """One whole-model graph in one onnxruntime CPU session: token ids in, the last exit's logits out.

    The one runner of a single graph: the single-graph backend serves with it, the exporter's parity
    check runs the bundle's through that backend, and pcee-bench times its reference graphs with it.
    """

    def __init__(
        self, path: str | Path, intra_op_threads: int | None = None, graph: LocatedGraph | None = None
    ):
        """`graph`: the bundle entry the file must match (spec and recorded name); None for a graph outside a
        bundle (a benchmark's optimized or quantized copy), whose own inputs are fed."""
        self.session = open_session(
            Path(path), cpu_session_options(intra_op_threads), ["CPUExecutionProvider"]
        )
        if graph is not None:
            check_session(self.session, graph)
        self.input_names = [tensor.name for tensor in self.session.get_inputs()]

    def logits(self, batch: EncodedBatch) -> np.ndarray:
        (logits,) = self.session.run([graphs.LOGITS], token_feeds(self.input_names, batch))
        return logits


class SingleGraphBackend(Backend):
    """Its state is the last exit's record for the rows still in the batch."""

    name = "onnxruntime-single-graph"
    only_full_point = True

    def __init__(self, chain: GraphChain, intra_op_threads: int | None = None):
        super().__init__(chain.num_layers)
        if chain.full is None:
            raise BundleError(
                f"backend {self.name!r} runs the whole-model graph, and this bundle has none; "
                "re-export it with pcee-export --with-full-graph"
            )
        self.graph = SingleGraphSession(chain.full.path, intra_op_threads, chain.full)

    @property
    def device(self) -> str:
        return "cpu"

    def _begin_impl(self, batch):
        return last_exit_record(self.graph.logits(batch))

    def _run_layers_impl(self, record, first_layer, count):
        if first_layer != 0 or count != self.num_layers:
            raise BackendError(
                f"backend {self.name!r} runs all {self.num_layers} layers at once, "
                f"not {count} from layer {first_layer}: serve the full operating point"
            )
        return [record] * count

    def _compact_impl(self, record, keep):
        return record.select(keep)


def last_exit_record(logits: np.ndarray) -> ExitRecord:
    """The exit outputs of `logits` [n, K], as a layer graph computes them."""
    probabilities = softmax(logits)
    return ExitRecord(
        logits=logits, entropy=normalized_entropy(probabilities), max_probability=probabilities.max(axis=-1)
    )


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """sum_k p_k log p_k / log(1/K), in [0, 1] (0 log 0 taken as 0)."""
    plogp = probabilities * np.log(np.where(probabilities > 0, probabilities, 1.0))
    return (plogp.sum(axis=-1) / np.log(1.0 / probabilities.shape[-1])).astype(np.float32)
