"""Export one torch module to one ONNX file, named and shaped by its GraphSpec.

The TorchScript exporter (`dynamo=False`) is used on purpose: with torch 2.13 it exports all four
architectures with dynamic batch and sequence axes in ~0.2 s per tiny graph, while the dynamo exporter
took ~10x longer and its down-conversion to opset 17 failed (an onnx version-converter assertion).
Parity at several shapes (parity.py) is what proves the traced graphs generalise.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from pcee.runtime import GRAPH_NAME_KEY, GraphSpec

from .errors import ExportError
from .graphs import writes_contrib_operators
from .optimize import CONTRIB_DOMAIN, Fusion, fuse_graph


def export_graph(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    spec: GraphSpec,
    path: Path,
    opset: int,
    name: str,
    fusion: Fusion | None = None,
) -> None:
    """Trace `module` on `example_inputs` into `path`, fuse it (with `fusion`), record its place in the chain (`name`), check it."""
    module.eval()  # the exporter restores the module's mode afterwards, so eval must be the mode to restore
    with warnings.catch_warnings():
        # Trace-time constants (the label count, static config flags) are intended; parity catches real ones.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        with torch.no_grad():
            torch.onnx.export(
                module,
                example_inputs,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
                custom_opsets={CONTRIB_DOMAIN: 1}
                if holds_attention(spec) and writes_contrib_operators(module)
                else None,
            )
    if fusion is not None:
        fuse_graph(path, fusion)
    record_graph_name(path, name)
    check_onnx_file(path)


def holds_attention(spec: GraphSpec) -> bool:
    """The embeddings graph never does (declaring the contrib domain there makes torch warn it is unused)."""
    return spec.kind != "embeddings"


def record_graph_name(path: Path, name: str) -> None:
    """The runtime refuses a file found at another place in the chain than the one it was exported for."""
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {GRAPH_NAME_KEY: name})
    onnx.save(model, str(path))


def check_onnx_file(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(
            f"{path.name} failed the ONNX checker ({error}); report the architecture and opset"
        ) from None
