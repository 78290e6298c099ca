"""The policy registry: a new policy is one class plus one `register_policy` call, and everything reads it.

The toy policy below is registered through the public registry alone; the calibration then searches
it, draws its frontier, and the runtime serves the point it chose, on a tiny exported model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace

import numpy as np
import pytest

from pcee.calibration import CalibrationError, CalibrationRows, Objective, Simulator, calibrate
from pcee.calibration.calibrate import holdout_split
from pcee.calibration.collect import record_all_exits
from pcee.calibration.search import all_states, sweeps_for
from pcee.runtime import (
    POLICIES,
    AllExits,
    EarlyExitRuntime,
    ExitPolicy,
    Knob,
    OperatingPoint,
    PolicyError,
    PolicySpec,
    build_policy,
    policy_names,
    register_policy,
    softmax,
)

TOY = "cumulative"
WORDS = "the a movie film story good bad great awful fun dull love hate plot actors very not really".split()


@dataclass(frozen=True)
class CumulativeConfidencePolicy(ExitPolicy):
    """Exit once `patience` layers were confident, consecutive or not (PCEE needs them consecutive)."""

    def step(self, state, layer, exits):
        state.counter = state.counter + (getattr(exits, self.signal) < self.point.tau)
        return state.counter >= self.point.patience

    def layers_until_possible_exit(self, state, layers_done):
        needed = self.point.patience - (int(state.counter.max()) if state.counter.size else 0)
        return max(1, min(needed, self.num_layers - layers_done))


def cumulative_exit_layers(entropy: np.ndarray, tau: float, patience: int) -> np.ndarray:
    """The toy rule written independently: the first layer where `patience` confident layers were seen."""
    reached = np.cumsum(entropy < tau, axis=1) >= patience
    return np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, entropy.shape[1])


@pytest.fixture
def toy_policy():
    spec = register_policy(
        PolicySpec(
            TOY,
            "Cumulative confidence",
            CumulativeConfidencePolicy,
            signal="entropy",
            knobs=(Knob("patience", smallest=lambda layers: 1, largest=lambda layers: layers),),
        )
    )
    yield spec
    del POLICIES[TOY]


@pytest.fixture(scope="module")
def recorded(tiny_bundles, tmp_path_factory):
    """A tiny exported 4-layer model, its runtime, 160 encoded texts, their exits and noisy labels."""
    pytest.importorskip("torch")
    bundle = shutil.copytree(
        tiny_bundles.bundle(task="sst2", num_layers=4), tmp_path_factory.mktemp("registry") / "bundle"
    )
    runtime = EarlyExitRuntime.from_bundle(bundle, backend="onnxruntime-cpu")
    rng = np.random.default_rng(3)
    batch = runtime.tokenizer.encode_texts(
        [" ".join(rng.choice(WORDS, size=rng.integers(1, 16))) for _ in range(160)]
    )
    exits = record_all_exits(runtime, batch, batch_size=32, progress=False).exits
    # The full model's answers with a fifth flipped: early exits then score differently from layer 4.
    labels = exits.logits[:, -1].argmax(axis=-1) ^ (rng.random(len(batch)) < 0.2)
    return runtime, batch, CalibrationRows(exits, labels.astype(np.int64))


def test_a_registered_policy_is_calibrated_and_served(toy_policy, recorded):
    runtime, batch, rows = recorded
    assert TOY in policy_names(calibrated_only=True)
    result = calibrate(rows, "accuracy", Objective(target_speedup=0.3), policy=TOY)

    assert result.point.policy == TOY and result.chosen.layer_speedup >= 0.3
    assert TOY in result.frontiers and result.frontiers[TOY]
    search_rows, holdout_rows = holdout_split(len(rows), 0.2, 0)
    expected = cumulative_exit_layers(
        rows.exits.entropy[search_rows], result.point.tau, result.point.patience
    )
    assert result.chosen.exit_layers.tolist() == expected.tolist()
    served = runtime.predict_encoded(batch.select(holdout_rows), result.point, batch_size=16)
    assert [row.exit_layer for row in served.predictions] == result.holdout.exit_layers.tolist()


def random_rows(count: int = 300, num_layers: int = 6) -> CalibrationRows:
    """Exits whose confidence rises and falls along the layers, row by row."""
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=2.0, size=(count, num_layers, 2)).astype(np.float32)
    probabilities = softmax(logits)
    entropy = -(probabilities * np.log(probabilities)).sum(axis=-1) / np.log(2)
    exits = AllExits(logits, entropy.astype(np.float32), probabilities.max(axis=-1))
    return CalibrationRows(exits, rng.integers(2, size=count))


def test_every_state_of_a_registered_policy_is_its_own_rule(toy_policy):
    """Not PCEE's streak shortcut: a policy without `exits_on_confident_streak` is replayed at every threshold."""
    rows = random_rows()
    simulator = Simulator(rows, "accuracy")
    sweeps = sweeps_for(TOY, rows.exits)
    assert [sweep.patience for sweep in sweeps] == [1, 2, 3, 4, 5, 6]
    differs_from_pcee = False
    for state in all_states(simulator, sweeps[1:2]):
        point = state.point
        assert isinstance(build_policy(point, rows.num_layers), CumulativeConfidencePolicy)
        outcome = simulator.run(point)
        expected = cumulative_exit_layers(rows.exits.entropy, point.tau, point.patience)
        assert outcome.exit_layers.tolist() == expected.tolist()
        assert state.layer_speedup == pytest.approx(outcome.layer_speedup)
        pcee = simulator.run(replace(point, policy="pcee"))
        differs_from_pcee |= pcee.exit_layers.tolist() != outcome.exit_layers.tolist()
    assert differs_from_pcee, "the toy rule should differ from PCEE somewhere, or this test proves nothing"


def test_registry_entries_are_checked(toy_policy):
    with pytest.raises(PolicyError, match="already registered"):
        register_policy(toy_policy)
    with pytest.raises(PolicyError, match="known signals"):
        register_policy(PolicySpec("odd", "Odd", CumulativeConfidencePolicy, signal="colour"))
    with pytest.raises(PolicyError, match=r"patience in 1\.\.4"):
        build_policy(OperatingPoint(TOY, tau=0.5, patience=5), 4)
    with pytest.raises(PolicyError, match="unknown policy"):
        build_policy(OperatingPoint("nope", tau=0.5, patience=1), 4)


def test_policies_the_registry_does_not_calibrate_are_refused(recorded):
    _, _, rows = recorded
    with pytest.raises(CalibrationError, match="cannot be calibrated"):
        sweeps_for("full", rows.exits)
    assert "full" in policy_names() and "full" not in policy_names(calibrated_only=True)


def test_the_registry_declares_every_builtin_policy():
    """What the benchmarks and the CLIs read; the paper's Table 2 order is the study's row order."""
    by_rank = sorted(
        (spec for spec in POLICIES.values() if spec.calibrated), key=lambda spec: spec.table_rank
    )
    assert [spec.name for spec in by_rank] == [
        "budgeted",
        "branchynet",
        "shallow-deep",
        "pabee",
        "pcee",
        "pcee-maxprob",
        "pcee-learned",
    ]
    assert [name for name, spec in POLICIES.items() if spec.allows_patience] == [
        "pcee",
        "pcee-maxprob",
        "pcee-learned",
        "pabee",
    ]
    assert [name for name, spec in POLICIES.items() if spec.needs_learned_score] == ["pcee-learned"]
    assert POLICIES["shallow-deep"].signal == "max_probability" and POLICIES["budgeted"].swept == "layer"
