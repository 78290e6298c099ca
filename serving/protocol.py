"""The wire formats: Open Inference Protocol v2 (`/v2/models/{name}/infer`) and the plain `/v1/classify`.

Parsing checks everything a request can get wrong that the runtime does not check per request
(types, shapes, names, pairing, lengths), so one bad request never reaches a shared batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pcee.runtime import OperatingPoint, PredictionResult

from .errors import BadRequest

TEXT_INPUT, PAIR_INPUT = "text", "text_pair"
OUTPUT_DATATYPES = {"label": "BYTES", "probabilities": "FP32", "exit_layer": "INT32"}
POINT_PARAMETER = "operating_point"
TIMEOUT_PARAMETER = "timeout"  # Triton's: the request's queue timeout, in microseconds
MODEL_VERSION = "1"


@dataclass(frozen=True)
class ClassifyRequest:
    """Rows to classify, whichever route they came in by."""

    texts: list[str]
    text_pairs: list[str] | None
    point_name: str | None

    @property
    def rows(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class InferRequest:
    """An OIP v2 request: the rows plus what the response must echo or select."""

    rows: ClassifyRequest
    request_id: str | None
    outputs: tuple[str, ...]
    timeout_ms: float | None = None
    # the texts came shaped [rows, 1] (Triton's batched form): the per-row outputs are answered so too
    batched: bool = False


def parse_json(body: bytes) -> object:
    if not body.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except UnicodeDecodeError as error:
        raise BadRequest(f"the request body is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except json.JSONDecodeError as error:
        raise BadRequest(f"the request body is not valid JSON ({error})") from None
    except RecursionError:
        raise BadRequest("the request body nests JSON too deeply") from None
    except ValueError as error:  # e.g. an integer past Python's digit limit
        raise BadRequest(f"the request body holds a value this server cannot read ({error})") from None


def encodable(value: str, where: str) -> str:
    """A string that can be written back as UTF-8 (JSON's \\ud800 escapes decode to lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where} is not valid Unicode (it holds a lone surrogate)") from None
    return value


def positive_milliseconds(value: object, where: str, per_millisecond: float = 1.0) -> float | None:
    """A timeout given as a number of units (`per_millisecond` of them make 1 ms); 0 or absent: none."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise BadRequest(f"{where} must be a number >= 0, got {json_type(value)} {str(value)[:40]}")
    return value / per_millisecond or None


def require_object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object, got {json_type(value)}")
    return value


def json_type(value: object) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def string_list(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be an array of strings, got {json_type(value)}")
    if not value:
        raise BadRequest(f"{where} is empty; give at least one text")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise BadRequest(f"{where}[{index}] must be a string, got {json_type(item)}")
    return value


def point_name(value: object, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise BadRequest(
            f"{where} must be the name of a saved operating point (a string), got {json_type(value)}"
        )
    return value if value is None else encodable(value, where)


def check_same_length(texts: list[str], pairs: list[str] | None, what: str) -> None:
    if pairs is not None and len(pairs) != len(texts):
        raise BadRequest(f"got {len(texts)} texts but {len(pairs)} {what}; give one second sentence per text")


# -- /v1/classify --------------------------------------------------------------------------------
CLASSIFY_FIELDS = ("texts", "text_pairs", POINT_PARAMETER)


def parse_classify(body: bytes, takes_pairs: bool) -> ClassifyRequest:
    """`{"texts": [...], "text_pairs": [...]?, "operating_point": "saved-name"?}`."""
    data = require_object(parse_json(body), "the request body")
    unknown = sorted(set(data) - set(CLASSIFY_FIELDS))
    if unknown:
        raise BadRequest(f"unknown fields {unknown}; a classify request has {list(CLASSIFY_FIELDS)}")
    if "texts" not in data:
        raise BadRequest('the request body needs "texts": an array of strings')
    texts = string_list(data["texts"], "texts")
    pairs = None if data.get("text_pairs") is None else string_list(data["text_pairs"], "text_pairs")
    if takes_pairs and pairs is None:
        raise BadRequest(
            'this model classifies sentence pairs; give "text_pairs", one second sentence per text'
        )
    if not takes_pairs and pairs is not None:
        raise BadRequest('this model classifies single sentences; drop "text_pairs"')
    check_same_length(texts, pairs, "text_pairs")
    return ClassifyRequest(texts, pairs, point_name(data.get(POINT_PARAMETER), POINT_PARAMETER))


def classify_response(result: PredictionResult) -> dict:
    """The rows `pcee-predict` prints, plus this request's share of the work."""
    return {
        "predictions": [row.to_dict() for row in result.predictions],
        "layers_run": result.layers_run,
        "layer_speedup": round(result.layer_speedup, 6),
        "operating_point": result.operating_point.to_dict(),
    }


# -- OIP v2 ---------------------------------------------------------------------------------------
def input_names(takes_pairs: bool) -> tuple[str, ...]:
    return (TEXT_INPUT, PAIR_INPUT) if takes_pairs else (TEXT_INPUT,)


def parse_infer(body: bytes, takes_pairs: bool) -> InferRequest:
    """An OIP v2 inference request with JSON tensor data (the binary tensor extension is not spoken)."""
    data = require_object(parse_json(body), "the request body")
    if "inputs" not in data:
        raise BadRequest('the request body needs "inputs": an array of tensors')
    if not isinstance(data["inputs"], list) or not data["inputs"]:
        raise BadRequest(f'"inputs" must be a non-empty array of tensors, got {json_type(data["inputs"])}')
    tensors = named_tensors(data["inputs"], "inputs")
    expected = input_names(takes_pairs)
    if set(tensors) != set(expected):
        raise BadRequest(
            f"this model takes inputs {list(expected)}, got {sorted(tensors)}" + pairing_hint(takes_pairs)
        )
    texts, batched = bytes_tensor(tensors[TEXT_INPUT], TEXT_INPUT)
    pairs = bytes_tensor(tensors[PAIR_INPUT], PAIR_INPUT)[0] if takes_pairs else None
    check_same_length(texts, pairs, f'"{PAIR_INPUT}" elements')
    parameters = require_object(data.get("parameters") or {}, '"parameters"')
    request_id = data.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f'"id" must be a string, got {json_type(request_id)}')
    return InferRequest(
        ClassifyRequest(
            texts, pairs, point_name(parameters.get(POINT_PARAMETER), f'parameters["{POINT_PARAMETER}"]')
        ),
        None if request_id is None else encodable(request_id, '"id"'),
        requested_outputs(data.get("outputs")),
        positive_milliseconds(
            parameters.get(TIMEOUT_PARAMETER), f'parameters["{TIMEOUT_PARAMETER}"] (microseconds)', 1000.0
        ),
        batched,
    )


def pairing_hint(takes_pairs: bool) -> str:
    if takes_pairs:
        return f'; it classifies sentence pairs: send the second sentences as "{PAIR_INPUT}"'
    return f'; it classifies single sentences: drop "{PAIR_INPUT}"'


def named_tensors(tensors: list, where: str) -> dict[str, dict]:
    named: dict[str, dict] = {}
    for index, tensor in enumerate(tensors):
        tensor = require_object(tensor, f"{where}[{index}]")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise BadRequest(f'{where}[{index}] needs a "name" string')
        if name in named:
            raise BadRequest(f"{where} names {name!r} twice")
        named[name] = tensor
    return named


def bytes_tensor(tensor: dict, name: str) -> tuple[list[str], bool]:
    """The N strings of a BYTES tensor of shape [N], or [N, 1] (what a Triton model with max_batch_size > 0
    declares, as pcee-triton's does), and whether it was [N, 1]. Its data: N strings, flat or one per row."""
    if tensor.get("datatype") != "BYTES":
        raise BadRequest(f'input {name!r} must have datatype "BYTES", got {tensor.get("datatype")!r}')
    if "data" not in tensor:
        raise BadRequest(
            f'input {name!r} needs "data" (the binary tensor extension is not supported; send JSON data)'
        )
    texts = string_list(flat_rows(tensor["data"]), f"input {name!r} data")
    shape, count = tensor.get("shape"), len(texts)
    if shape not in ([count], [count, 1]):
        raise BadRequest(
            f"input {name!r} has {count} elements, so its shape must be [{count}] or [{count}, 1], got {shape!r}"
        )
    return texts, len(shape) == 2


def flat_rows(data: object) -> object:
    """`[["a"], ["b"]]` (OIP allows a tensor's data nested by rows) as `["a", "b"]`; anything else as it is."""
    if isinstance(data, list) and data and all(isinstance(row, list) and len(row) == 1 for row in data):
        return [row[0] for row in data]
    return data


def requested_outputs(outputs: object) -> tuple[str, ...]:
    if outputs is None:
        return tuple(OUTPUT_DATATYPES)
    if not isinstance(outputs, list) or not outputs:
        raise BadRequest(
            f'"outputs" must be a non-empty array of {{"name": ...}} objects, got {json_type(outputs)}'
        )
    names = tuple(named_tensors(outputs, "outputs"))
    unknown = [name for name in names if name not in OUTPUT_DATATYPES]
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}; this model has {list(OUTPUT_DATATYPES)}")
    return names


def point_label(point: OperatingPoint) -> str:
    """A saved point by its name, any other by its description (`pcee tau=0.2 patience=2`)."""
    return point.name or point.describe()


PLATFORM = "pcee-early-exit"
TRITON_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32", "INT32": "TYPE_INT32"}


def server_metadata(version: str) -> dict:
    """`GET /v2`: OIP server metadata (no protocol extensions are spoken)."""
    return {"name": "pcee-serve", "version": version, "extensions": []}


def model_config(model_name: str, takes_pairs: bool, num_labels: int, max_queue_wait_ms: float) -> dict:
    """`GET /v2/models/{name}/config` in the shape Triton answers it (what perf_analyzer reads).

    `max_batch_size` 0: in Triton's terms the inputs carry no batch dimension; each is a 1-D tensor
    of N texts, batched across requests by the server itself. Inputs shaped [N, 1], as clients of a
    Triton model with a batch dimension send them, are accepted as well (the answer is shaped alike).
    """
    metadata = model_metadata(model_name, takes_pairs, num_labels)

    def tensors(kind: str) -> list[dict]:
        return [
            {"name": t["name"], "data_type": TRITON_TYPES[t["datatype"]], "dims": t["shape"]}
            for t in metadata[kind]
        ]

    return {
        "name": model_name,
        "platform": PLATFORM,
        "backend": "pcee",
        "max_batch_size": 0,
        "input": tensors("inputs"),
        "output": tensors("outputs"),
        "dynamic_batching": {
            "default_queue_policy": {"default_timeout_microseconds": int(max_queue_wait_ms * 1000)}
        },
        "version_policy": {"specific": {"versions": [int(MODEL_VERSION)]}},
    }


def infer_response(model_name: str, request: InferRequest, result: PredictionResult) -> dict:
    rows = result.predictions
    per_row = [len(rows), 1] if request.batched else [len(rows)]
    tensors = {
        "label": (per_row, [row.label for row in rows]),
        "probabilities": (
            [len(rows), len(rows[0].probabilities)],
            [float(p) for row in rows for p in row.probabilities],
        ),
        "exit_layer": (per_row, [row.exit_layer for row in rows]),
    }
    response = {
        "model_name": model_name,
        "model_version": MODEL_VERSION,
        "parameters": {POINT_PARAMETER: point_label(result.operating_point), "layers_run": result.layers_run},
        "outputs": [
            {
                "name": name,
                "datatype": OUTPUT_DATATYPES[name],
                "shape": tensors[name][0],
                "data": tensors[name][1],
            }
            for name in request.outputs
        ],
    }
    if request.request_id is not None:
        response["id"] = request.request_id
    return response


def model_metadata(model_name: str, takes_pairs: bool, num_labels: int) -> dict:
    return {
        "name": model_name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in input_names(takes_pairs)],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, num_labels]},
            {"name": "exit_layer", "datatype": "INT32", "shape": [-1]},
        ],
    }
