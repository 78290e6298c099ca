"""The torch modules that become the bundle's graphs, one per GraphSpec of runtime/graphs.py.

Each wrapper's forward takes the spec's inputs in order and returns its outputs in order, so
`torch.onnx.export(wrapper, inputs, input_names=spec.input_names, output_names=spec.output_names)`
is all the exporter needs.

Every graph's interface is float32 whatever the model's dtype: a half-precision model casts at
the graph boundary, so runtimes bind the same buffers for fp32 and fp16 bundles.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pcee.modeling.adapters import attention_bias, mask_from_bias
from pcee.modeling.model import MultiExitClassifier, exit_probabilities_and_entropy

from .optimize import CONTRIB_DOMAIN

# onnxruntime's Attention adds (1 - mask) * mask_filter_value to the scores; its default, -10000,
# gives padding a softmax weight of exp(-10000) = 0 in float32, as the model's finfo.min bias does.
MASK_FILTER_VALUE = -10000.0


def parameter_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def to_model_dtype(
    model: nn.Module, hidden: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast the float32 interface tensors to the model's dtype; the bias is rebuilt so padding gets that dtype's minimum."""
    dtype = parameter_dtype(model)
    if hidden.dtype == dtype:
        return hidden, bias
    return hidden.to(dtype), attention_bias(mask_from_bias(bias), dtype)


def exit_signals(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits, normalized entropy and max probability of one exit, as the runtime's policies read them."""
    logits = logits.float()
    probabilities, entropy = exit_probabilities_and_entropy(logits)
    return logits, entropy, probabilities.max(dim=-1).values


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
    """Token inputs -> the last exit's float32 logits: the single-graph model benchmarks compare with.

    With `num_layers`, the model cut to its first layers and their exit: the truncation a user would
    deploy instead of early exit.
    """

    def __init__(self, model: MultiExitClassifier, num_layers: int | None = None):
        super().__init__()
        self.embeddings = EmbeddingsGraph(model)
        self.model = model
        self.num_layers = num_layers or model.num_layers

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden, bias = to_model_dtype(self.model, *self.embeddings(input_ids, attention_mask, token_type_ids))
        for index in range(self.num_layers):
            hidden = self.model.run_layer(index, hidden, bias)
        logits, _ = self.model.exit_head(self.num_layers - 1, hidden, mask_from_bias(bias))
        return logits.float()


# -- fused attention ---------------------------------------------------------------------------------
class ContribAttention(torch.autograd.Function):
    """Multi-head self-attention computed in torch, exported as one onnxruntime `Attention` node."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, mask_index, num_heads: int):
        batch, length, width = hidden.shape
        head_size = width // num_heads
        query, key, value = (
            (hidden @ weight + bias).view(batch, length, 3, num_heads, head_size).permute(2, 0, 3, 1, 4)
        )
        padding = (1.0 - mask_index[:, None, None, :].to(hidden.dtype)) * MASK_FILTER_VALUE
        scores = query @ key.transpose(-1, -2) / head_size**0.5 + padding
        return (scores.softmax(-1) @ value).transpose(1, 2).reshape(batch, length, width)

    @staticmethod
    def symbolic(g, hidden, weight, bias, mask_index, num_heads: int):
        output = g.op(f"{CONTRIB_DOMAIN}::Attention", hidden, weight, bias, mask_index, num_heads_i=num_heads)
        output.setType(hidden.type())
        return output


class ContribSelfAttention(nn.Module):
    """Stands in for a BERT/RoBERTa `attention.self` during export; same arithmetic, one fused node."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original

    def forward(self, hidden_states, attention_mask=None, **unused):
        projections = (self.original.query, self.original.key, self.original.value)
        weight = torch.cat([projection.weight for projection in projections]).t()
        bias = torch.cat([projection.bias for projection in projections])
        mask_index = (attention_mask[:, 0, 0, :] == 0).to(
            torch.int32
        )  # the layer's bias: 0 attended, very negative on padding
        return ContribAttention.apply(
            hidden_states, weight, bias, mask_index, self.original.num_attention_heads
        ), None


def writes_contrib_operators(module: nn.Module) -> bool:
    """Whether tracing `module` emits onnxruntime's contrib operators (it holds a swapped-in attention)."""
    return any(isinstance(child, ContribSelfAttention) for child in module.modules())


def has_qkv_self_attention(layer: nn.Module) -> bool:
    attention = getattr(getattr(layer, "attention", None), "self", None)
    return all(isinstance(getattr(attention, name, None), nn.Linear) for name in ("query", "key", "value"))


@contextmanager
def contrib_attention(model: MultiExitClassifier) -> Iterator[None]:
    """While exporting, every BERT-style layer's self-attention traces to one `Attention` node."""
    swapped = [layer for layer in model.layer_modules() if has_qkv_self_attention(layer)]
    for layer in swapped:
        layer.attention.self = ContribSelfAttention(layer.attention.self)
    try:
        yield
    finally:
        for layer in swapped:
            layer.attention.self = layer.attention.self.original
