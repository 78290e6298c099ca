"""Per-architecture adapters: where each Hugging Face encoder keeps its embeddings, layers and pooler.

The multi-exit model and the exporter walk every architecture through this one interface,
so an architecture is supported exactly when it has an adapter here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedArchitectureError


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [batch, 1, 1, seq]: 0 where attended, the dtype's minimum on padding."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def mask_from_bias(bias: torch.Tensor) -> torch.Tensor:
    """Recover the [batch, seq] 0/1 mask from an additive bias, so exported layers need only the bias."""
    return (bias[:, 0, 0, :] == 0).to(bias.dtype)


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How to walk one encoder family. Subclasses override the accessors that differ."""

    model_type: str
    uses_token_type_ids: bool = True

    def embed(
        self, backbone: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        return backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def layers(self, backbone: nn.Module) -> list[nn.Module]:
        return list(backbone.encoder.layer)

    def pool_first_token(self, backbone: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        """The backbone's own pooler (dense + tanh on the first token), or None when it has none."""
        pooler = getattr(backbone, "pooler", None)
        return None if pooler is None else pooler(hidden)

    def has_pooler(self, backbone: nn.Module) -> bool:
        return getattr(backbone, "pooler", None) is not None

    def max_positions(self, config) -> int:
        """The longest sequence the position embeddings cover."""
        return config.max_position_embeddings

    @staticmethod
    def run_layer(layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        output = layer(hidden, bias)
        return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class RobertaAdapter(ArchitectureAdapter):
    """RoBERTa numbers positions from padding_idx + 1, so that many positions are never used."""

    def max_positions(self, config) -> int:
        return config.max_position_embeddings - config.pad_token_id - 1


@dataclass(frozen=True)
class AlbertAdapter(ArchitectureAdapter):
    """ALBERT shares layer groups across depth and projects embeddings up to the hidden size."""

    def embed(self, backbone, input_ids, token_type_ids):
        embedded = backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return backbone.encoder.embedding_hidden_mapping_in(embedded)

    def layers(self, backbone):
        config = backbone.config
        groups = backbone.encoder.albert_layer_groups
        per_group = config.num_hidden_layers / config.num_hidden_groups
        return [groups[int(index / per_group)] for index in range(config.num_hidden_layers)]

    def pool_first_token(self, backbone, hidden):
        if backbone.pooler is None:
            return None
        return backbone.pooler_activation(backbone.pooler(hidden[:, 0]))


@dataclass(frozen=True)
class DistilBertAdapter(ArchitectureAdapter):
    """DistilBERT has no token types and no pooler; the multi-exit model adds its own pooler."""

    uses_token_type_ids: bool = False

    def embed(self, backbone, input_ids, token_type_ids):
        return backbone.embeddings(input_ids)

    def layers(self, backbone):
        return list(backbone.transformer.layer)


ADAPTERS: dict[str, ArchitectureAdapter] = {
    "bert": ArchitectureAdapter("bert"),
    "roberta": RobertaAdapter("roberta"),
    "albert": AlbertAdapter("albert"),
    "distilbert": DistilBertAdapter("distilbert"),
}


def get_adapter(model_type: str) -> ArchitectureAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))} "
            "(BERT also covers TinyBERT and MiniLM). Use a backbone of one of these families."
        ) from None
