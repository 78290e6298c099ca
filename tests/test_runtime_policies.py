"""Rule fidelity: the runtime's exit layers equal plain loops written straight from the paper's rules.

The runtime loop (`run_early_exit`, with its back-to-back spans and row compaction) is driven by
the recorded-exits backend that calibration also uses, so every policy can be checked on
arbitrary confidence arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcee.runtime import AllExits, OperatingPoint, PolicyError, build_policy, run_early_exit, softmax
from pcee.runtime.backends.recorded import RecordedExitsBackend


class SpanRecordingBackend(RecordedExitsBackend):
    """Serves recorded exits and notes each span the runtime asks for."""

    def __init__(self, logits, entropy, max_probability, score):
        super().__init__(AllExits(logits, entropy, max_probability, score))
        self.spans: list[tuple[int, int]] = []

    def _run_layers_impl(self, rows, first_layer, count):
        self.spans.append((first_layer, count))
        return super()._run_layers_impl(rows, first_layer, count)


def reference_exit(point: OperatingPoint, entropy, max_probability, score, argmax) -> tuple[int, bool]:
    """One row, written from DESIGN.md: the 1-based exit layer, and whether the rule fired there."""
    layers = len(entropy)
    if point.policy == "full":
        return layers, True
    if point.policy == "budgeted":
        return point.layer, True
    counter, previous = 0, None
    for m in range(layers):
        if point.policy == "pabee":
            counter = counter + 1 if previous is not None and argmax[m] == previous else 0
            previous = argmax[m]
        else:
            signal = {
                "pcee": entropy,
                "branchynet": entropy,
                "pcee-maxprob": max_probability,
                "shallow-deep": max_probability,
                "pcee-learned": score,
            }[point.policy][m]
            confident = signal < point.tau if point.policy in ("pcee", "branchynet") else signal > point.tau
            counter = counter + 1 if confident else 0
        if counter == point.patience:
            return m + 1, True
    return layers, False


def reference_probabilities(point: OperatingPoint, logits, exit_layer: int, satisfied: bool) -> np.ndarray:
    if point.ensemble and satisfied:
        return np.mean([softmax(logits[m]) for m in range(exit_layer - point.patience, exit_layer)], axis=0)
    return softmax(logits[exit_layer - 1])


@st.composite
def exit_arrays(draw):
    rows = draw(st.integers(1, 12))
    layers = draw(st.integers(1, 7))
    labels = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, layers, labels)).astype(np.float32)
    logits *= rng.choice([0.1, 3.0], size=(rows, layers, 1))  # both near-uniform and confident rows
    grid = np.array([0.0, 0.1, 0.25, 0.5, 0.75, 1.0], dtype=np.float32)
    pick = lambda: grid[rng.integers(0, len(grid), size=(rows, layers))]  # noqa: E731  ties with tau on purpose
    return logits, pick(), pick(), pick()


@st.composite
def operating_points(draw, layers: int):
    policy = draw(
        st.sampled_from(
            [
                "pcee",
                "pcee-maxprob",
                "pcee-learned",
                "branchynet",
                "shallow-deep",
                "pabee",
                "budgeted",
                "full",
            ]
        )
    )
    if policy == "full":
        return OperatingPoint(policy)
    if policy == "budgeted":
        return OperatingPoint(policy, layer=draw(st.integers(1, layers)))
    if policy == "pabee":
        if layers < 2:
            return OperatingPoint("full")
        return OperatingPoint(policy, patience=draw(st.integers(1, layers - 1)))
    patience = 1 if policy in ("branchynet", "shallow-deep") else draw(st.integers(1, layers))
    tau = draw(st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0]))
    return OperatingPoint(
        policy, tau=tau, patience=patience, ensemble=draw(st.booleans()) and policy.startswith("pcee")
    )


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_runtime_exit_layers_equal_the_reference_loop(data):
    logits, entropy, max_probability, score = data.draw(exit_arrays())
    rows, layers, labels = logits.shape
    point = data.draw(operating_points(layers))
    policy = build_policy(point, layers, has_learned_score=True)
    backend = SpanRecordingBackend(logits, entropy, max_probability, score)
    outcome = run_early_exit(backend, policy, backend.placeholder_batch(), labels)
    argmax = logits.argmax(-1)
    for row in range(rows):
        expected, fired = reference_exit(
            policy.point, entropy[row], max_probability[row], score[row], argmax[row]
        )
        assert outcome.exit_layer[row] == expected, (row, policy.point)
        reference = reference_probabilities(policy.point, logits[row], expected, fired)
        np.testing.assert_allclose(outcome.probabilities[row], reference, rtol=1e-5, atol=1e-6)


def test_layers_before_an_exit_run_back_to_back():
    """With patience 3 and no confident row yet, the first span covers three layers in one go."""
    layers = 6
    logits = np.zeros((2, layers, 2), np.float32)
    entropy = np.full((2, layers), 0.9, np.float32)
    backend = SpanRecordingBackend(logits, entropy, entropy, entropy)
    policy = build_policy(OperatingPoint("pcee", tau=0.5, patience=3), layers)
    run_early_exit(backend, policy, backend.placeholder_batch(), 2)
    assert backend.spans[0] == (0, 3)
    assert sum(count for _, count in backend.spans) == layers


@pytest.mark.parametrize(
    "point, message",
    [
        (dict(policy="nope"), "unknown policy"),
        (dict(policy="pcee", patience=2), "finite tau"),
        (dict(policy="pcee", tau=1.5, patience=2), "outside"),
        (dict(policy="pcee", tau=0.5, patience=0), "patience in 1..6"),
        (dict(policy="pcee", tau=0.5, patience=7), "patience in 1..6"),
        (dict(policy="pabee", patience=6), "patience in 1..5"),
        (dict(policy="budgeted", layer=9), "layer in 1..6"),
        (dict(policy="branchynet", tau=0.5, patience=2), "patience 1"),
        (dict(policy="pcee-learned", tau=0.5, patience=2), "learned-confidence"),
        (dict(policy="pcee", tau=0.5, patience=2, colour="red"), "unknown fields"),
    ],
)
def test_bad_operating_points_are_named(point, message):
    with pytest.raises(PolicyError, match=message):
        build_policy(point, 6, has_learned_score=False)


def test_branchynet_and_shallow_deep_are_pcee_with_patience_one():
    assert build_policy(dict(policy="branchynet", tau=0.3), 6).point.patience == 1
    shallow = build_policy(dict(policy="shallow-deep", tau=0.9), 6)
    assert shallow.point.patience == 1 and shallow.signal == "max_probability"
