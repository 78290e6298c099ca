"""Compiled early exit for one row: the whole chain as one ONNX graph with each exit decided inside it.

At batch 1 the chain's cost is mostly per call: seven onnxruntime calls, their input and output
conversion, and the loop's Python between layers. Here the bundle's own graphs (embeddings and
every layer, the very nodes the chain runs) are composed into one graph in which layer l+1 runs
inside the `else` branch of an `If` on layer l's exit decision, so a single-row request is one
onnxruntime call. The decision is the counting rule every policy shares: a per-layer "confident"
test, a counter of consecutive confident layers, exit when it reaches the patience. Which test
(`signal`), `tau` and `patience` are graph inputs, so any operating point runs without a rebuild:

    signal 0: normalized entropy < tau        (pcee, branchynet)
    signal 1: max probability > tau           (pcee-maxprob, shallow-deep)
    signal 2: learned confidence score > tau  (pcee-learned)
    signal 3: argmax equal to the previous layer's (pabee)
    signal 4: always (budgeted, full: patience = the exit layer)

The graph is composed in memory when the runtime first serves a single row (it needs the `onnx`
package; without it the chain serves single rows as before). Its exits equal the chain's: the
comparisons are the same float32 comparisons on the same layer outputs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from . import graphs
from .exits import BatchOutcome, ExitRecord, softmax
from .graphs import GraphChain
from .policies import ExitPolicy, FixedLayerPolicy, PatienceBasedPolicy, PatientConfidentPolicy
from .tokenization import EncodedBatch

TAU = "exit_tau"
PATIENCE = "exit_patience"
SIGNAL = "exit_signal"
EXIT_LAYER = "exit_layer"
STREAK = "streak_probabilities"
SATISFIED = "satisfied"
SIGNAL_CODES = {"entropy": 0, "max_probability": 1, "confidence_score": 2}
PABEE_SIGNAL, ALWAYS_SIGNAL = 3, 4


@dataclass(frozen=True)
class DecisionInputs:
    """What one policy feeds the compiled graph."""

    signal: int
    tau: float
    patience: int


def decision_inputs(policy: ExitPolicy) -> DecisionInputs | None:
    """The graph inputs that make the compiled graph decide as `policy` does; None for a policy it cannot express."""
    if type(policy) is PatientConfidentPolicy:
        return DecisionInputs(SIGNAL_CODES[policy.signal], policy.point.tau, policy.point.patience)
    if type(policy) is PatienceBasedPolicy:
        return DecisionInputs(PABEE_SIGNAL, 0.0, policy.point.patience)
    if type(policy) is FixedLayerPolicy:
        return DecisionInputs(ALWAYS_SIGNAL, 0.0, policy.exit_layer())
    return None


class SingleRowGraph:
    """One onnxruntime session over the composed graph; `run` gives a one-row batch its outcome."""

    def __init__(self, session, token_input_names: list[str], learned_confidence: bool):
        self.session = session
        self.token_input_names = token_input_names
        self.learned_confidence = learned_confidence
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, policy: ExitPolicy, batch: EncodedBatch, num_labels: int) -> BatchOutcome | None:
        """The outcome the chain would give this one row under `policy`; None when the policy is not expressible."""
        inputs = decision_inputs(policy)
        if inputs is None:
            return None
        feeds = {name: getattr(batch, name) for name in self.token_input_names}
        # float32 as numpy compares the chain's float32 exit outputs with a Python float (NEP 50).
        feeds[TAU] = np.array([inputs.tau], dtype=np.float32)
        feeds[PATIENCE] = np.array([inputs.patience], dtype=np.int64)
        feeds[SIGNAL] = np.array([inputs.signal], dtype=np.int64)
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        record = ExitRecord(
            logits=outputs[graphs.LOGITS],
            entropy=outputs[graphs.ENTROPY],
            max_probability=outputs[graphs.MAX_PROBABILITY],
            confidence_score=outputs.get(graphs.CONFIDENCE_SCORE),
        )
        ensemble = policy.point.ensemble and type(policy) is PatientConfidentPolicy
        probabilities = (
            outputs[STREAK] / inputs.patience
            if ensemble and bool(outputs[SATISFIED][0])
            else softmax(record.logits)
        )
        outcome = BatchOutcome.empty(1, num_labels)
        rows = np.zeros(1, dtype=np.int64)
        outcome.record(rows, int(outputs[EXIT_LAYER][0]), probabilities, policy.exit_confidence(record, rows))
        return outcome


class LazySingleRowGraph:
    """Composes and opens the single-row graph on first use (once, thread-safe); None where it cannot be built."""

    def __init__(self, chain: GraphChain, open_session):
        self.chain = chain
        self.open_session = open_session  # model bytes -> onnxruntime session with the backend's options
        self._lock = threading.Lock()
        self._graph: SingleRowGraph | None = None
        self._tried = False

    def get(self) -> SingleRowGraph | None:
        if self._tried:
            return self._graph
        with self._lock:
            if not self._tried:
                self._graph = self._build()
                self._tried = True
        return self._graph

    def _build(self) -> SingleRowGraph | None:
        try:
            from .single_row_compose import compose_single_row_graph
        except ImportError:  # the onnx package is missing: the chain serves single rows
            return None
        model = compose_single_row_graph(self.chain)
        session = self.open_session(model.SerializeToString())
        learned = any(tensor.name == graphs.CONFIDENCE_SCORE for tensor in self.chain.layers[0].spec.outputs)
        return SingleRowGraph(session, self.chain.embeddings.spec.input_names, learned)
