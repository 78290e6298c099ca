"""A pcee bundle as a Triton Python-backend model (pcee-triton copies this file to `<model>/1/model.py`).

It runs inside Triton's Python backend stub, where `triton_python_backend_utils` exists; the bundle is
`1/bundle/` beside it. Everything else is the pcee runtime: this file only moves tensors and metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils

from pcee.deploy.repository import BACKEND_PARAMETER, BUNDLE_FOLDER, POINT_PARAMETER, THREADS_PARAMETER
from pcee.deploy.triton_requests import (
    PAIR_INPUT,
    TEXT_INPUT,
    answer,
    exit_counts,
    output_arrays,
    read_request,
)
from pcee.runtime import EarlyExitRuntime, PceeError


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if args["model_instance_kind"] == "GPU":
            # The runtime's CUDA backends use device 0: make this instance's GPU the only visible one.
            os.environ["CUDA_VISIBLE_DEVICES"] = args["model_instance_device_id"]
        bundle = Path(args["model_repository"]) / args["model_version"] / BUNDLE_FOLDER
        threads = parameters.get(THREADS_PARAMETER)
        try:
            self.runtime = EarlyExitRuntime.from_bundle(
                bundle,
                backend=parameters.get(BACKEND_PARAMETER, "auto"),
                operating_point=parameters.get(POINT_PARAMETER) or None,
                intra_op_threads=int(threads) if threads else None,
            )
        except PceeError as error:
            raise pb_utils.TritonModelException(f"{type(error).__name__}: {error}") from None
        self.metrics = ExitMetrics(args["model_name"], args["model_version"], self.runtime.num_layers)

    def execute(self, requests: list) -> list:
        parsed = [self.read(request) for request in requests]
        responses = []
        for request, result in zip(parsed, answer(self.runtime, parsed)):
            if isinstance(result, PceeError):
                responses.append(error_response(result))
                continue
            self.metrics.record(result)
            arrays = output_arrays(result, request.shape)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in arrays.items()])
            )
        return responses

    def read(self, request):
        pairs = pb_utils.get_input_tensor_by_name(request, PAIR_INPUT) if self.runtime.takes_pairs else None
        try:
            return read_request(
                self.runtime,
                pb_utils.get_input_tensor_by_name(request, TEXT_INPUT).as_numpy(),
                None if pairs is None else pairs.as_numpy(),
                request.parameters(),
            )
        except PceeError as error:
            return error

    def finalize(self) -> None:
        self.runtime.close()


def error_response(error: PceeError):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"{type(error).__name__}: {error}", pb_utils.TritonError.INVALID_ARG)
    )


class ExitMetrics:
    """Rows per exit layer and layers run vs possible, next to Triton's own nv_inference_* metrics."""

    def __init__(self, model: str, version: str, num_layers: int):
        self.labels = {"model": model, "version": version}
        self.num_layers = num_layers
        self.rows = pb_utils.MetricFamily(
            name="pcee_rows_total",
            description="Rows answered, by the layer they exited at",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        # The families must outlive their metrics: Triton refuses to count on a metric of a deleted family.
        self.layers = pb_utils.MetricFamily(
            name="pcee_layers_total",
            description="Transformer layers: run (what early exit spent) and possible (rows x model layers)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.rows_at = {
            layer: self.rows.Metric(labels={**self.labels, "exit_layer": str(layer)})
            for layer in range(1, num_layers + 1)
        }
        self.layers_run = self.layers.Metric(labels={**self.labels, "kind": "run"})
        self.layers_possible = self.layers.Metric(labels={**self.labels, "kind": "possible"})

    def record(self, rows: list) -> None:
        for layer, count in exit_counts(rows).items():
            self.rows_at[layer].increment(count)
        self.layers_run.increment(sum(row.exit_layer for row in rows))
        self.layers_possible.increment(len(rows) * self.num_layers)
