"""Compiled early exit for one row: the whole chain as one ONNX graph with each exit decided inside it.

At batch 1 the chain's cost is mostly per call: seven onnxruntime calls, their input and output
conversion, and the loop's Python between layers. Here the bundle's own graphs (embeddings and
every layer, the very nodes the chain runs) are composed into one graph in which layer l+1 runs
inside the `else` branch of an `If` on layer l's exit decision, so a single-row request is one
onnxruntime call. The decision is the counting rule every policy shares: a per-layer test, a
counter of consecutive layers that pass it, exit when it reaches the patience. The test is fixed
per composed graph (an `ExitRule`: two to five small operators per layer), `tau` and `patience` are
graph inputs, so every operating point of a rule runs on one graph:

    normalized entropy < tau                   pcee, branchynet
    max probability > tau                      pcee-maxprob, shallow-deep
    learned confidence score > tau             pcee-learned
    argmax equal to the layer before's         pabee

A rule that leaves every row at one layer (budgeted, full) needs no decisions: its graph is the
chain cut after that layer, with no `If` at all (one graph per layer used).

A rule's graph is composed in memory when the runtime first serves a single row under it (this
needs the `onnx` package; without it the chain serves single rows as before). Its exits equal the chain's: the
comparisons are the same float32 comparisons on the same layer outputs. Its probabilities are the
exit's softmax taken in the graph (no numpy step after the call), within float32 rounding of the
chain's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from . import graphs
from .exits import BatchOutcome, ExitRecord
from .graphs import GraphChain
from .policies import ExitPolicy, FixedLayerPolicy, PatienceBasedPolicy, PatientConfidentPolicy
from .tokenization import EncodedBatch

TAU = "exit_tau"
PATIENCE = "exit_patience"
EXIT_LAYER = "exit_layer"
STREAK = "streak_probabilities"
PROBABILITIES = "exit_probabilities"  # softmax of the exit's logits, computed in the graph
SATISFIED = "satisfied"
PABEE_TEST, LAYER_TEST = "same_argmax", "layer"


@dataclass(frozen=True)
class ExitRule:
    """What a composed graph tests after each layer: a signal against tau (the graph.ENTROPY, MAX_PROBABILITY
    or CONFIDENCE_SCORE output) or the argmax against the layer before's (pabee); or, for LAYER_TEST, no
    test: every row leaves at `layer`."""

    test: str
    ensemble: bool = False
    layer: int | None = None


def exit_rule(policy: ExitPolicy) -> tuple[ExitRule, float, int] | None:
    """The rule, tau and patience that make a composed graph decide as `policy` does; None if none can."""
    if type(policy) is PatientConfidentPolicy:
        return ExitRule(policy.signal, policy.point.ensemble), policy.point.tau, policy.point.patience
    if type(policy) is PatienceBasedPolicy:
        return ExitRule(PABEE_TEST), 0.0, policy.point.patience
    if type(policy) is FixedLayerPolicy:
        layer = policy.fixed_exit_layer()
        return ExitRule(LAYER_TEST, layer=layer), 0.0, layer
    return None


def threshold_feeds(tau: float, patience: int) -> dict[str, np.ndarray]:
    """A composed graph's threshold inputs (a rule that leaves every row at one layer takes none)."""
    # float32, as numpy compares the chain's float32 exit outputs with a Python float (NEP 50).
    return {TAU: np.array([tau], dtype=np.float32), PATIENCE: np.array([patience], dtype=np.int64)}


class SingleRowGraph:
    """One onnxruntime session over a graph composed for one exit rule; `run` gives a one-row batch its outcome."""

    def __init__(self, session, token_input_names: list[str], fixed_layer: int | None = None):
        self.session = session
        self.token_input_names = token_input_names
        self.output_names = [output.name for output in session.get_outputs()]
        self.fixed_layer = fixed_layer  # a truncated graph: no thresholds in, every row leaves here

    def run(
        self, policy: ExitPolicy, tau: float, patience: int, batch: EncodedBatch, num_labels: int
    ) -> BatchOutcome:
        """The outcome the chain gives this one row under `policy` (whose rule this graph was composed for)."""
        feeds = {name: getattr(batch, name) for name in self.token_input_names}
        if self.fixed_layer is None:
            feeds.update(threshold_feeds(tau, patience))
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        record = ExitRecord(
            logits=outputs[graphs.LOGITS],
            entropy=outputs[graphs.ENTROPY],
            max_probability=outputs[graphs.MAX_PROBABILITY],
            confidence_score=outputs.get(graphs.CONFIDENCE_SCORE),
        )
        satisfied_ensemble = policy.point.ensemble and bool(outputs[SATISFIED][0])
        probabilities = outputs[STREAK] / patience if satisfied_ensemble else outputs[PROBABILITIES]
        outcome = BatchOutcome.empty(1, num_labels)
        rows = np.zeros(1, dtype=np.int64)
        exit_layer = self.fixed_layer or int(outputs[EXIT_LAYER][0])
        outcome.record(rows, exit_layer, probabilities, policy.exit_confidence(record, rows))
        return outcome


class SingleRowGraphs:
    """The composed graphs of one chain, each built and opened on first use of its rule (thread-safe).

    Without the `onnx` package nothing can be composed: `outcome` answers None and the chain serves.
    """

    def __init__(self, chain: GraphChain, open_session, compose):
        self.chain = chain
        self.open_session = open_session  # model bytes -> onnxruntime session with the backend's options
        self.compose = compose  # (chain, rule) -> ONNX model; raises ImportError without the onnx package
        self._lock = threading.Lock()
        self._graphs: dict[ExitRule, SingleRowGraph | None] = {}

    def outcome(self, policy: ExitPolicy, batch: EncodedBatch, num_labels: int) -> BatchOutcome | None:
        """The one row's outcome through the graph composed for `policy`'s rule; None when there is none."""
        decision = exit_rule(policy)
        if decision is None:
            return None
        rule, tau, patience = decision
        graph = self._graphs.get(rule) or self._build(rule)
        return None if graph is None else graph.run(policy, tau, patience, batch, num_labels)

    def _build(self, rule: ExitRule) -> SingleRowGraph | None:
        with self._lock:
            if rule not in self._graphs:
                self._graphs[rule] = self._compose(rule)
            return self._graphs[rule]

    def _compose(self, rule: ExitRule) -> SingleRowGraph | None:
        try:
            model = self.compose(self.chain, rule)
        except ImportError:  # no onnx package
            return None
        return SingleRowGraph(
            self.open_session(model.SerializeToString()), self.chain.embeddings.spec.input_names, rule.layer
        )
