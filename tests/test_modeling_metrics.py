import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcee.modeling.metrics import (
    MetricError,
    accuracy,
    all_metrics,
    f1_binary,
    matthews_corrcoef,
    task_metric,
)
from pcee.runtime.errors import PceeError

# Hand-computed: TP=3 (rows 0,3,5), TN=1 (row 1), FP=1 (row 2), FN=1 (row 4).
PREDS = [1, 0, 1, 1, 0, 1]
LABELS = [1, 0, 0, 1, 1, 1]


def test_accuracy_counts_matches():
    assert accuracy(PREDS, LABELS) == pytest.approx(4 / 6)


def test_f1_binary_from_counts():
    # 2TP / (2TP + FP + FN) = 6 / 8
    assert f1_binary(PREDS, LABELS) == pytest.approx(0.75)


def test_matthews_binary_from_counts():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (3 - 1) / sqrt(4*4*2*2)
    assert matthews_corrcoef(PREDS, LABELS) == pytest.approx(0.25)


def test_matthews_multiclass_from_confusion_matrix():
    # true counts (2, 2, 1), predicted counts (1, 2, 2), 3 correct of 5:
    # (3*5 - 8) / sqrt((25 - 9) * (25 - 9)) = 7 / 16
    assert matthews_corrcoef([0, 1, 2, 2, 1], [0, 1, 2, 1, 0]) == pytest.approx(7 / 16)


def test_matthews_extremes_and_undefined():
    assert matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0
    assert matthews_corrcoef([0, 0], [0, 0]) == 0.0


def test_f1_without_positives_is_zero():
    assert f1_binary([0, 0, 0], [0, 0, 0]) == 0.0
    assert f1_binary([0, 0, 0], [1, 0, 1]) == 0.0


def test_metrics_accept_numpy_arrays():
    assert accuracy(np.array(PREDS), np.array(LABELS, dtype=np.int64)) == pytest.approx(4 / 6)


@pytest.mark.parametrize("metric", [accuracy, f1_binary, matthews_corrcoef])
def test_mismatched_or_empty_inputs_raise(metric):
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        metric([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        metric([], [])


def test_task_metric_dispatches_by_name():
    assert task_metric("accuracy", PREDS, LABELS) == pytest.approx(4 / 6)
    assert task_metric("f1", PREDS, LABELS) == pytest.approx(0.75)
    assert task_metric("matthews", PREDS, LABELS) == pytest.approx(0.25)


def test_task_metric_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown metric 'auc'; expected one of accuracy, f1, matthews"):
        task_metric("auc", PREDS, LABELS)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: accuracy([0, 1, 1], [0, 1]),
            r"got 3 predictions for 2 labels; expected one prediction per label",
        ),
        (lambda: f1_binary([], []), r"got no predictions; expected at least one"),
        (
            lambda: task_metric("auc", PREDS, LABELS),
            r"unknown metric 'auc'; expected one of accuracy, f1, matthews",
        ),
    ],
)
def test_metric_errors_belong_to_the_pcee_error_family(call, message):
    with pytest.raises(MetricError, match=message) as caught:
        call()
    assert isinstance(caught.value, PceeError) and isinstance(caught.value, ValueError)


def test_all_metrics_has_accuracy_and_primary_metric():
    assert all_metrics("matthews", PREDS, LABELS) == pytest.approx({"accuracy": 4 / 6, "matthews": 0.25})
    assert all_metrics("f1", PREDS, LABELS) == pytest.approx({"accuracy": 4 / 6, "f1": 0.75})
    assert all_metrics("accuracy", PREDS, LABELS) == pytest.approx({"accuracy": 4 / 6})


binary_pairs = st.integers(min_value=1, max_value=40).flatmap(
    lambda size: st.tuples(
        st.lists(st.integers(0, 1), min_size=size, max_size=size),
        st.lists(st.integers(0, 1), min_size=size, max_size=size),
    )
)


@settings(max_examples=60, deadline=None)
@given(binary_pairs)
def test_matthews_matches_binary_formula(pair):
    preds, labels = pair
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    expected = (tp * tn - fp * fn) / denominator if denominator else 0.0
    assert matthews_corrcoef(preds, labels) == pytest.approx(expected)
    assert matthews_corrcoef(labels, preds) == pytest.approx(expected)
