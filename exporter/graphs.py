"""The torch modules that become the bundle's graphs, one per GraphSpec of runtime/graphs.py.

Each wrapper's forward takes the spec's inputs in order and returns its outputs in order, so
`torch.onnx.export(wrapper, inputs, input_names=spec.input_names, output_names=spec.output_names)`
is all the exporter needs.

Every graph's interface is float32 whatever the model's dtype: a half-precision model casts at
the graph boundary, so runtimes bind the same buffers for fp32 and fp16 bundles.
"""

from __future__ import annotations

import torch
from torch import nn

from pcee.modeling.adapters import attention_bias, mask_from_bias
from pcee.modeling.model import MultiExitClassifier, normalized_entropy


def parameter_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def to_model_dtype(model: nn.Module, hidden: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast the float32 interface tensors to the model's dtype; the bias is rebuilt so padding gets that dtype's minimum."""
    dtype = parameter_dtype(model)
    if hidden.dtype == dtype:
        return hidden, bias
    return hidden.to(dtype), attention_bias(mask_from_bias(bias), dtype)


def exit_signals(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits, normalized entropy and max probability of one exit, as the runtime's policies read them."""
    logits = logits.float()
    probabilities = torch.softmax(logits, dim=-1)
    return logits, normalized_entropy(probabilities), probabilities.max(dim=-1).values


class EmbeddingsGraph(nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) -> (hidden_states, attention_bias [B,1,1,S])."""

    def __init__(self, model: MultiExitClassifier):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.model.embed(input_ids, token_type_ids).float()
        return hidden, attention_bias(attention_mask, hidden.dtype)


class LayerGraph(nn.Module):
    """(hidden_states, attention_bias) -> (next_hidden_states, logits, entropy, max probability[, confidence])."""

    def __init__(self, model: MultiExitClassifier, index: int):
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, hidden_states, bias):
        hidden_states, bias = to_model_dtype(self.model, hidden_states, bias)
        next_hidden = self.model.run_layer(self.index, hidden_states, bias)
        logits, confidence = self.model.exit_head(self.index, next_hidden, mask_from_bias(bias))
        outputs = (next_hidden.float(), *exit_signals(logits))
        return outputs if confidence is None else (*outputs, confidence.float())


class FullModelGraph(nn.Module):
    """Token inputs -> the last exit's float32 logits: the single-graph model benchmarks compare with."""

    def __init__(self, model: MultiExitClassifier):
        super().__init__()
        self.embeddings = EmbeddingsGraph(model)
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden, bias = to_model_dtype(self.model, *self.embeddings(input_ids, attention_mask, token_type_ids))
        for index in range(self.model.num_layers):
            hidden = self.model.run_layer(index, hidden, bias)
        logits, _ = self.model.exit_head(self.model.num_layers - 1, hidden, mask_from_bias(bias))
        return logits.float()
