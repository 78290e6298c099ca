"""The multi-exit classifier: an encoder with an exit (classifier) after every layer."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PretrainedConfig

from pcee.runtime import new_file_mode

from .adapters import ArchitectureAdapter, attention_bias, get_adapter
from .backbones import load_pretrained_encoder
from .config import PceeConfig
from .errors import ModelDirectoryError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
REFERENCE_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
REFERENCE_PREFIXES = ("bert.", "roberta.", "albert.", "distilbert.")


class ExitPooler(nn.Module):
    """Dense + tanh on the first token, as BERT's pooler."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden[:, 0]))


@dataclass
class MultiExitOutput:
    logits: torch.Tensor  # [num_layers, batch, num_labels]
    confidence_scores: torch.Tensor | None  # [num_layers, batch], sigmoid of the learned score
    loss: torch.Tensor | None = None


def exit_loss_weights(num_layers: int, weighting: str) -> torch.Tensor:
    """Eq. 1 of the paper: exit m weighs m / sum(m); 'uniform' weighs every exit alike."""
    if weighting == "uniform":
        weights = torch.ones(num_layers)
    else:
        weights = torch.arange(1, num_layers + 1, dtype=torch.float32)
    return weights / weights.sum()


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MultiExitClassifier(nn.Module):
    """Encoder + one exit per layer. Attribute names follow the reference PABEE/PCEE layout."""

    def __init__(self, backbone_config: PretrainedConfig, pcee_config: PceeConfig):
        super().__init__()
        self.backbone_config = backbone_config
        self.pcee_config = pcee_config
        self.adapter: ArchitectureAdapter = get_adapter(backbone_config.model_type)
        self.backbone = AutoModel.from_config(backbone_config)
        hidden_size = (
            backbone_config.hidden_size if hasattr(backbone_config, "hidden_size") else backbone_config.dim
        )
        self.num_layers = len(self.adapter.layers(self.backbone))
        self._build_exit_heads(hidden_size)

    def _build_exit_heads(self, hidden_size: int) -> None:
        config = self.pcee_config
        if not self.adapter.has_pooler(self.backbone):
            self.pooler = ExitPooler(hidden_size)
        if config.exit_head == "per_exit_pooler":
            self.exit_poolers = nn.ModuleList(ExitPooler(hidden_size) for _ in range(self.num_layers))
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifiers = nn.ModuleList(
            nn.Linear(hidden_size, config.num_labels) for _ in range(self.num_layers)
        )
        if config.learned_confidence:
            self.confidence_heads = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(self.num_layers))

    # -- the steps the exporter also walks -------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not self.adapter.uses_token_type_ids:
            token_type_ids = None
        return self.adapter.embed(self.backbone, input_ids, token_type_ids)

    def layer_modules(self) -> list[nn.Module]:
        return self.adapter.layers(self.backbone)

    def run_layer(self, index: int, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.adapter.run_layer(self.layer_modules()[index], hidden, bias)

    def exit_features(self, index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pcee_config.exit_pooling == "mean":
            return masked_mean(hidden, mask)
        if self.pcee_config.exit_head == "per_exit_pooler":
            return self.exit_poolers[index](hidden)
        pooled = self.adapter.pool_first_token(self.backbone, hidden)
        return self.pooler(hidden) if pooled is None else pooled

    def exit_head(
        self, index: int, hidden: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [batch, K] and the learned confidence (sigmoid, [batch]) or None."""
        features = self.dropout(self.exit_features(index, hidden, mask))
        logits = self.classifiers[index](features)
        if not self.pcee_config.learned_confidence:
            return logits, None
        return logits, torch.sigmoid(self.confidence_heads[index](features)).squeeze(-1)

    # -- training / evaluation -------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MultiExitOutput:
        hidden = self.embed(input_ids, token_type_ids)
        bias = attention_bias(attention_mask, hidden.dtype)
        all_logits, all_scores = [], []
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, bias)
            logits, score = self.exit_head(index, hidden, attention_mask)
            all_logits.append(logits)
            all_scores.append(score)
        logits = torch.stack(all_logits)
        scores = torch.stack(all_scores) if self.pcee_config.learned_confidence else None
        loss = None if labels is None else self.loss(logits, scores, labels)
        return MultiExitOutput(logits=logits, confidence_scores=scores, loss=loss)

    def loss(self, logits: torch.Tensor, scores: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        weights = exit_loss_weights(self.num_layers, self.pcee_config.loss_weighting).to(logits.device)
        per_exit = torch.stack([F.cross_entropy(exit_logits, labels) for exit_logits in logits])
        loss = (weights * per_exit).sum()
        if scores is not None:
            # BERxiT-style: each exit learns to predict whether its own prediction is right.
            correct = (logits.argmax(-1) == labels).to(scores.dtype).detach()
            loss = loss + F.binary_cross_entropy(scores, correct)
        return loss

    # -- save / load -----------------------------------------------------------------------------
    def config_dict(self) -> dict:
        data = self.backbone_config.to_dict()
        data["architectures"] = ["MultiExitClassifier"]
        names = self.pcee_config.label_names
        data["id2label"] = {str(index): name for index, name in enumerate(names)}
        data["label2id"] = {name: index for index, name in enumerate(names)}
        data["pcee"] = self.pcee_config.to_dict()
        return data

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        weights = directory / WEIGHTS_NAME
        save_model(self, str(weights))
        os.chmod(weights, new_file_mode())  # safetensors creates the file 0600, unlike open()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, pcee_config: PceeConfig | None = None
    ) -> MultiExitClassifier:
        """Load a model saved by `save_pretrained`, or a reference PABEE/PCEE checkpoint.

        A reference checkpoint has no pcee block; `pcee_config` (or its config.json's id2label and
        finetuning_task, see `PceeConfig.for_reference_checkpoint`) fills it in, with the reference
        head: shared pooler, first-token pooling.
        """
        directory = Path(directory)
        raw_config = read_config_json(directory)
        saved_pcee = raw_config.pop("pcee", None)
        backbone_config = backbone_config_from_dict(raw_config, directory)
        if saved_pcee is not None:
            pcee_config = PceeConfig.from_dict(saved_pcee)
        elif pcee_config is None:
            pcee_config = PceeConfig.for_reference_checkpoint(
                backbone_config.id2label, raw_config.get("finetuning_task")
            )
        model = cls(backbone_config, pcee_config)
        state = load_state_dict(directory)
        if saved_pcee is None:
            state = rename_reference_keys(state)
        model.load_weights(state, directory)
        model.eval()
        return model

    def load_weights(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        result = self.load_state_dict(state, strict=False)
        missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise ModelDirectoryError(
                f"{directory}: weights do not match the model built from its config.json "
                f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                f"unexpected: {result.unexpected_keys[:5]}). Was it saved by pcee-train or the reference PABEE/PCEE code?"
            )

    @classmethod
    def from_backbone(cls, backbone: str | Path, pcee_config: PceeConfig) -> MultiExitClassifier:
        """A fresh multi-exit model around a pretrained encoder; exits are randomly initialised."""
        backbone_config = AutoConfig.from_pretrained(str(backbone))
        get_adapter(backbone_config.model_type)
        model = cls(backbone_config, pcee_config)
        pretrained = load_pretrained_encoder(Path(backbone), backbone_config)
        model.backbone.load_state_dict(pretrained.state_dict(), strict=False)
        model.copy_pooler_into_exit_poolers()
        return model

    def copy_pooler_into_exit_poolers(self) -> None:
        pooler = getattr(self.backbone, "pooler", None)
        dense = getattr(pooler, "dense", pooler)
        if self.pcee_config.exit_head != "per_exit_pooler" or not isinstance(dense, nn.Linear):
            return
        for exit_pooler in self.exit_poolers:
            exit_pooler.dense.load_state_dict(dense.state_dict())


def read_config_json(directory: Path) -> dict:
    if not directory.is_dir():
        raise ModelDirectoryError(
            f"model directory {directory} does not exist; pass a directory written by pcee-train"
        )
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ModelDirectoryError(f"{directory} has no {CONFIG_NAME}; pass a directory written by pcee-train")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelDirectoryError(
            f"{path} is not valid JSON ({error}); the model directory is corrupt"
        ) from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelDirectoryError(f"{path} has no 'model_type'; expected a Hugging Face model config")
    return data


def backbone_config_from_dict(data: dict, directory: Path) -> PretrainedConfig:
    data = dict(data)
    model_type = data.pop("model_type")
    get_adapter(model_type)
    data.pop("architectures", None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError) as error:
        raise ModelDirectoryError(
            f"{directory / CONFIG_NAME}: cannot build a {model_type} config ({error})"
        ) from None


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    for name in REFERENCE_WEIGHT_NAMES:
        path = directory / name
        if path.is_file():
            return read_weights(path)
    raise ModelDirectoryError(
        f"{directory} has no weights ({' or '.join(REFERENCE_WEIGHT_NAMES)}); pass a directory written by pcee-train"
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and pickle raise many types for a damaged file
        raise ModelDirectoryError(
            f"{path} cannot be read ({type(error).__name__}: {error}); the file is corrupt"
        ) from None


def rename_reference_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the reference code's `bert.*` / `classifiers.<i>.*` keys onto this model's names."""
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in REFERENCE_PREFIXES if key.startswith(p)), None)
        renamed["backbone." + key[len(prefix) :] if prefix else key] = value
    return renamed


def exit_probabilities_and_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits) and its normalized entropy sum_k p_k log p_k / log(1/K), in [0, 1], as the exported graphs compute them.

    From log-softmax, so p log p is finite where p underflows to 0 (no 0 * log 0 guard), and the graph
    needs four operators where the guarded form took nine: at batch 1 each operator's dispatch counts.
    """
    log_probabilities = torch.log_softmax(logits, dim=-1)
    probabilities = log_probabilities.exp()
    return probabilities, (probabilities * log_probabilities).sum(-1) / math.log(1.0 / logits.shape[-1])
