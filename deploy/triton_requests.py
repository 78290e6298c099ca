"""What the Triton model does with the requests of one `execute` call, free of Triton's own types.

Triton's dynamic batcher hands the model several requests at once. Each is read on its own (a bad
one becomes that request's error), the good ones that name the same operating point run as one
runtime batch, and the rows are handed back to the request they came from.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pcee.runtime import EarlyExitRuntime, InputError, PceeError, RowPrediction

TEXT_INPUT, PAIR_INPUT = "text", "text_pair"
POINT_PARAMETER = "operating_point"


@dataclass(frozen=True)
class RowsRequest:
    """One Triton request's rows, the saved point it asked for (None: the default) and its input shape."""

    texts: list[str]
    text_pairs: list[str] | None
    point_name: str | None
    shape: tuple[int, ...]


Answer = list[RowPrediction] | PceeError


def decode_texts(array: np.ndarray, name: str) -> list[str]:
    """A TYPE_STRING tensor's elements as text; bytes that are not UTF-8 are the sender's error."""
    texts = []
    for index, item in enumerate(array.reshape(-1)):
        if isinstance(item, str):
            texts.append(item)
            continue
        try:
            texts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InputError(
                f"input {name!r} element {index} is not UTF-8 text (byte {error.start}: {error.reason}); "
                "send the texts encoded as UTF-8"
            ) from None
    return texts


def requested_point(parameters_json: str) -> str | None:
    """The request parameter `operating_point` (a saved point's name), or None when absent."""
    parameters = json.loads(parameters_json or "{}")
    point = parameters.get(POINT_PARAMETER) if isinstance(parameters, dict) else None
    if point is not None and not isinstance(point, str):
        raise InputError(
            f"parameter {POINT_PARAMETER!r} must be the name of a saved operating point (a string), "
            f"got {type(point).__name__}"
        )
    return point


def read_request(
    runtime: EarlyExitRuntime, texts: np.ndarray, pairs: np.ndarray | None, parameters_json: str
) -> RowsRequest:
    """Everything checked that can be checked for one request alone, before it joins a batch."""
    text_list = decode_texts(texts, TEXT_INPUT)
    pair_list = None if pairs is None else decode_texts(pairs, PAIR_INPUT)
    runtime.check_pairing(pair_list)
    if pair_list is not None and len(pair_list) != len(text_list):
        raise InputError(
            f"got {len(text_list)} texts but {len(pair_list)} {PAIR_INPUT} elements; give one second sentence per text"
        )
    point = requested_point(parameters_json)
    if point is not None:
        runtime.resolve_operating_point(point)
    return RowsRequest(text_list, pair_list, point, tuple(texts.shape))


def answer(runtime: EarlyExitRuntime, requests: Sequence[RowsRequest | PceeError]) -> list[Answer]:
    """Each request's rows (or its error), running every group of requests with one point as one batch."""
    answers: list[Answer | None] = [item if isinstance(item, PceeError) else None for item in requests]
    groups: dict[str | None, list[int]] = {}
    for index, item in enumerate(requests):
        if isinstance(item, RowsRequest):
            groups.setdefault(item.point_name, []).append(index)
    for point, members in groups.items():
        for index, rows in zip(members, run_group(runtime, [requests[i] for i in members], point)):
            answers[index] = rows
    return answers


def run_group(runtime: EarlyExitRuntime, group: list[RowsRequest], point: str | None) -> list[Answer]:
    """One runtime batch for the group; if a row is refused, each request runs alone so only its own fails."""
    try:
        rows = predict(runtime, group, point)
    except PceeError as error:
        if len(group) == 1:
            return [error]
        return [run_alone(runtime, request) for request in group]
    bounds = np.cumsum([0] + [len(request.texts) for request in group])
    return [rows[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def run_alone(runtime: EarlyExitRuntime, request: RowsRequest) -> Answer:
    try:
        return predict(runtime, [request], request.point_name)
    except PceeError as error:
        return error


def predict(runtime: EarlyExitRuntime, group: list[RowsRequest], point: str | None) -> list[RowPrediction]:
    texts = [text for request in group for text in request.texts]
    pairs = None if group[0].text_pairs is None else [pair for r in group for pair in r.text_pairs]
    return runtime.predict(texts, pairs, operating_point=point).predictions


def output_arrays(rows: list[RowPrediction], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The three outputs, with `label` and `exit_layer` shaped like the request's text input."""
    return {
        "label": np.array([row.label.encode() for row in rows], dtype=np.object_).reshape(shape),
        "probabilities": np.stack([row.probabilities for row in rows]).astype(np.float32),
        "exit_layer": np.array([row.exit_layer for row in rows], dtype=np.int32).reshape(shape),
    }


def exit_counts(rows: list[RowPrediction]) -> Counter:
    """Rows per exit layer, for the rows-per-exit metric."""
    return Counter(row.exit_layer for row in rows)
