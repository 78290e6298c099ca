"""onnxruntime with the CUDA execution provider: IOBinding keeps hidden state and bias on the GPU.

Each layer binds the previous hidden state and the bias as CUDA OrtValues, writes its next hidden
state into a second CUDA OrtValue of the same shape (the two then swap), and returns only the
small exit outputs to the host. Compaction gathers the kept rows device-to-device (cuda_memory),
so the hidden state never crosses to the host.

onnxruntime synchronises its stream at the end of every Run, so unlike the TensorRT backend a
span of layers costs one synchronisation per layer; the exit outputs are ready when Run returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .. import graphs
from ..errors import BackendUnavailableError
from ..exits import ExitRecord
from ..graphs import GraphChain, LocatedGraph
from .base import Backend
from .cuda_memory import (
    DEVICE_INDEX,
    LeasePool,
    installed_version,
    plan_compaction,
    require_cuda,
    row_extents,
)
from .onnxruntime_cpu import cpu_session_options, exit_record, feeds_for, open_checked_session

CUDA_PROVIDER = "CUDAExecutionProvider"
ORT_DEVICE_TYPE = "cuda"  # onnxruntime's name for the memory GPU OrtValues and bound outputs live in
GPU_DOC = "docs/GPU.md"
SWAP_WHEELS = f"pip uninstall -y onnxruntime && pip install onnxruntime-gpu ({GPU_DOC})"


def cuda_provider_problems() -> list[str]:
    available = ort.get_available_providers()
    if CUDA_PROVIDER in available:
        return []
    fix = broken_gpu_wheel() or f"install onnxruntime-gpu in place of onnxruntime: {SWAP_WHEELS}"
    return [
        f"onnxruntime's {CUDA_PROVIDER} (onnxruntime {ort.__version__} here offers {', '.join(available)}; {fix})"
    ]


def broken_gpu_wheel() -> str | None:
    """Why the onnxruntime-gpu wheel, when installed, offers no CUDA, with the commands that fix it; else None.

    onnxruntime and onnxruntime-gpu both write the `onnxruntime` module, so whichever was installed
    last wins; pcee's own requirement on onnxruntime brings the CPU wheel back on any reinstall.
    """
    gpu_wheel = installed_version("onnxruntime-gpu")
    if gpu_wheel is None or CUDA_PROVIDER in ort.get_available_providers():
        return None
    if installed_version("onnxruntime") is not None:
        return (
            f"onnxruntime-gpu {gpu_wheel} is installed next to onnxruntime, whose CPU-only files replaced its own; "
            f"run: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu=={gpu_wheel} ({GPU_DOC})"
        )
    return (
        f"onnxruntime-gpu {gpu_wheel} is installed but its files were overwritten by another onnxruntime build; "
        f"run: pip install --force-reinstall --no-deps onnxruntime-gpu=={gpu_wheel} ({GPU_DOC})"
    )


def open_cuda_session(graph: LocatedGraph, options: ort.SessionOptions) -> ort.InferenceSession:
    session = open_checked_session(
        graph, options, [(CUDA_PROVIDER, {"device_id": DEVICE_INDEX}), "CPUExecutionProvider"]
    )
    if CUDA_PROVIDER not in session.get_providers():
        raise BackendUnavailableError(
            f"onnxruntime fell back to the CPU for {graph.path.name}: the {CUDA_PROVIDER} did not start, usually because the "
            f"CUDA or cuDNN libraries onnxruntime-gpu {ort.__version__} was built for are missing or of another version"
        )
    return session


def input_dtype(spec: graphs.GraphSpec, name: str) -> type:
    return np.dtype(next(tensor.dtype for tensor in spec.inputs if tensor.name == name)).type


@dataclass
class CudaBatchState:
    hidden: ort.OrtValue
    spare: ort.OrtValue  # the hidden state's shape: the next layer writes here, then the two swap
    bias: ort.OrtValue
    row_extents: np.ndarray


class OnnxRuntimeCudaBackend(Backend):
    name = "onnxruntime"

    def __init__(self, chain: GraphChain):
        super().__init__(chain.num_layers)
        self.cuda = require_cuda("onnxruntime-cuda", cuda_provider_problems())
        # Only nodes that fall back to the CPU use these threads: one per session keeps a dozen
        # sessions from each starting a pool the size of the machine.
        options = cpu_session_options(intra_op_threads=1, share_arena=False)
        self.embeddings_spec = chain.embeddings.spec
        self.embeddings = open_cuda_session(chain.embeddings, options)
        self.layers = [open_cuda_session(layer, options) for layer in chain.layers]
        layer_spec = chain.layer_spec
        self.exit_names = [name for name in layer_spec.output_names if name != graphs.NEXT_HIDDEN_STATES]
        self.hidden_dtype = input_dtype(layer_spec, graphs.HIDDEN_STATES)
        self.bias_dtype = input_dtype(layer_spec, graphs.ATTENTION_BIAS)
        self.streams = LeasePool(self.cuda.create_stream, self.cuda.destroy_stream)
        self._device = self.cuda.device_description()

    @property
    def device(self) -> str:
        return self._device

    def on_device(self, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, ORT_DEVICE_TYPE, DEVICE_INDEX)

    def _begin_impl(self, batch):
        spec = self.embeddings_spec
        binding = self.embeddings.io_binding()
        for name, array in feeds_for(spec, batch).items():
            binding.bind_cpu_input(name, array)
        for name in spec.output_names:
            binding.bind_output(name, ORT_DEVICE_TYPE, DEVICE_INDEX)
        # Binding starts copying the token arrays to the GPU; Run must not start before they landed.
        binding.synchronize_inputs()
        self.embeddings.run_with_iobinding(binding)
        outputs = dict(zip(spec.output_names, binding.get_outputs()))
        hidden = outputs[graphs.HIDDEN_STATES]
        spare = self.on_device(tuple(hidden.shape()), self.hidden_dtype)
        return CudaBatchState(
            hidden, spare, outputs[graphs.ATTENTION_BIAS], row_extents(batch.attention_mask)
        )

    def _run_layers_impl(self, state, first_layer, count):
        return [self.run_layer(state, index) for index in range(first_layer, first_layer + count)]

    def run_layer(self, state: CudaBatchState, index: int) -> ExitRecord:
        session = self.layers[index]
        binding = session.io_binding()
        binding.bind_ortvalue_input(graphs.HIDDEN_STATES, state.hidden)
        binding.bind_ortvalue_input(graphs.ATTENTION_BIAS, state.bias)
        binding.bind_ortvalue_output(graphs.NEXT_HIDDEN_STATES, state.spare)
        for name in self.exit_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        exits = binding.get_outputs()[1:]  # in binding order, after next_hidden_states
        state.hidden, state.spare = state.spare, state.hidden
        # numpy() views onnxruntime's buffer; copy so the record outlives the binding.
        return exit_record({name: np.array(value.numpy()) for name, value in zip(self.exit_names, exits)})

    def _compact_impl(self, state, keep):
        _, length, hidden_size = state.hidden.shape()
        hidden_bytes = hidden_size * np.dtype(self.hidden_dtype).itemsize
        plan = plan_compaction(
            keep, state.row_extents, length, hidden_bytes, np.dtype(self.bias_dtype).itemsize
        )
        hidden_shape = (plan.rows, plan.sequence_length, hidden_size)
        hidden = self.on_device(hidden_shape, self.hidden_dtype)
        bias = self.on_device((plan.rows, 1, 1, plan.sequence_length), self.bias_dtype)
        with self.streams.lease() as stream:
            self.cuda.enqueue_copies(plan.hidden_copies, state.hidden.data_ptr(), hidden.data_ptr(), stream)
            self.cuda.enqueue_copies(plan.bias_copies, state.bias.data_ptr(), bias.data_ptr(), stream)
            # The next Run uses onnxruntime's own stream, which knows nothing of ours.
            self.cuda.synchronize(stream)
        return CudaBatchState(hidden, self.on_device(hidden_shape, self.hidden_dtype), bias, plan.row_extents)

    def close(self) -> None:
        self.streams.close()
