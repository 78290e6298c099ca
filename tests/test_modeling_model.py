"""The multi-exit model: adapters, exit heads, the Eq. 1 loss, save/load, reference checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AlbertConfig, AutoModel, BertConfig, DistilBertConfig, RobertaConfig

from pcee.modeling.adapters import attention_bias, get_adapter, mask_from_bias
from pcee.modeling.config import PceeConfig, default_exit_pooling
from pcee.modeling.errors import ModelDirectoryError, UnsupportedArchitectureError
from pcee.modeling.model import MultiExitClassifier, exit_loss_weights, exit_probabilities_and_entropy

TINY = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
)
BACKBONE_CONFIGS = {
    "bert": lambda: BertConfig(**TINY),
    "roberta": lambda: RobertaConfig(**TINY, pad_token_id=1),
    "albert": lambda: AlbertConfig(**TINY, embedding_size=16, num_hidden_groups=1),
    "distilbert": lambda: DistilBertConfig(
        vocab_size=120, dim=32, n_layers=3, n_heads=2, hidden_dim=48, max_position_embeddings=64
    ),
}


def tiny_model(model_type: str = "bert", **pcee) -> MultiExitClassifier:
    torch.manual_seed(0)
    model = MultiExitClassifier(BACKBONE_CONFIGS[model_type](), PceeConfig(num_labels=3, **pcee))
    return model.eval()


def tiny_batch(rows: int = 4, length: int = 9):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, 2:] = 0
    return ids, mask


@pytest.mark.parametrize("model_type", sorted(BACKBONE_CONFIGS))
def test_adapter_walks_the_same_layers_as_the_backbone(model_type):
    model = tiny_model(model_type)
    ids, mask = tiny_batch()
    with torch.no_grad():
        hidden = model.embed(ids)
        bias = attention_bias(mask, hidden.dtype)
        for index in range(model.num_layers):
            hidden = model.run_layer(index, hidden, bias)
        reference = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    kept = mask.bool()
    assert model.num_layers == 3
    assert torch.allclose(hidden[kept], reference[kept], atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(BACKBONE_CONFIGS))
@pytest.mark.parametrize(
    "head",
    [
        dict(exit_pooling="cls"),
        dict(exit_pooling="mean"),
        dict(exit_head="per_exit_pooler", learned_confidence=True),
    ],
)
def test_every_architecture_and_head_gives_one_exit_per_layer(model_type, head):
    model = tiny_model(model_type, **head)
    ids, mask = tiny_batch()
    output = model(ids, mask, labels=torch.tensor([0, 1, 2, 0]))
    assert output.logits.shape == (3, 4, 3)
    assert torch.isfinite(output.loss)
    if head.get("learned_confidence"):
        assert output.confidence_scores.shape == (3, 4)
        assert ((output.confidence_scores >= 0) & (output.confidence_scores <= 1)).all()


def test_unknown_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="albert, bert, distilbert, roberta"):
        get_adapter("gpt2")


def test_loss_is_equation_one():
    weights = exit_loss_weights(3, "weighted")
    assert torch.allclose(weights, torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    assert torch.allclose(exit_loss_weights(4, "uniform"), torch.full((4,), 0.25))
    model = tiny_model()
    ids, mask = tiny_batch()
    labels = torch.tensor([0, 1, 2, 1])
    output = model(ids, mask, labels=labels)
    per_exit = [torch.nn.functional.cross_entropy(logits, labels) for logits in output.logits]
    expected = sum(m * ce for m, ce in zip((1, 2, 3), per_exit)) / 6
    assert torch.allclose(output.loss, expected)


def test_uniform_loss_weighs_every_exit_alike():
    model = tiny_model(loss_weighting="uniform")
    ids, mask = tiny_batch()
    labels = torch.tensor([0, 1, 2, 1])
    output = model(ids, mask, labels=labels)
    per_exit = torch.stack([torch.nn.functional.cross_entropy(logits, labels) for logits in output.logits])
    assert torch.allclose(output.loss, per_exit.mean())


def test_mean_pooling_ignores_padding():
    model = tiny_model(exit_pooling="mean")
    ids, mask = tiny_batch()
    padded = ids.clone()
    padded[0, 5:] = 7  # different pad content must not change row 0
    with torch.no_grad():
        a = model(ids, mask).logits[:, 0]
        b = model(padded, mask).logits[:, 0]
    assert torch.allclose(a, b, atol=1e-5)


def test_mask_round_trips_through_the_bias():
    _, mask = tiny_batch()
    assert torch.equal(mask_from_bias(attention_bias(mask, torch.float32)), mask.float())


def test_normalized_entropy_bounds_and_no_nan_where_probabilities_underflow():
    uniform = torch.zeros((1, 4))
    certain = torch.tensor([[200.0, 0.0, -200.0, 0.0]])  # exp(-200) underflows to 0 in float32
    assert torch.allclose(exit_probabilities_and_entropy(uniform)[1], torch.tensor([1.0]))
    probabilities, entropy = exit_probabilities_and_entropy(certain)
    assert probabilities[0, 2] == 0 and torch.allclose(entropy, torch.tensor([0.0]))


def test_normalized_entropy_matches_its_definition():
    logits = torch.randn(64, 3) * 4
    probabilities = torch.softmax(logits, dim=-1)
    expected = (probabilities * probabilities.log()).sum(-1) / math.log(1 / 3)
    assert torch.allclose(exit_probabilities_and_entropy(logits)[1], expected, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(BACKBONE_CONFIGS))
def test_save_load_round_trip_gives_identical_logits(tmp_path, model_type):
    model = tiny_model(model_type, exit_pooling="mean", learned_confidence=True)
    model.save_pretrained(tmp_path)
    loaded = MultiExitClassifier.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pcee"]["exit_pooling"] == "mean" and config["model_type"] == model_type
    ids, mask = tiny_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, loaded(ids, mask).logits)
        assert torch.equal(model(ids, mask).confidence_scores, loaded(ids, mask).confidence_scores)


def test_reference_pabee_checkpoint_loads(tmp_path):
    """The reference code saves `bert.*` + `classifiers.<i>.*` in pytorch_model.bin, no pcee block."""
    model = tiny_model("bert")
    state = {
        ("bert." + key[len("backbone.") :] if key.startswith("backbone.") else key): value
        for key, value in model.state_dict().items()
    }
    assert any(key.startswith("bert.pooler.") for key in state) and "classifiers.2.weight" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = model.backbone_config.to_dict()
    config["num_labels"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = MultiExitClassifier.from_pretrained(tmp_path)
    assert loaded.pcee_config.exit_pooling == "cls" and loaded.pcee_config.num_labels == 3
    ids, mask = tiny_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, loaded(ids, mask).logits)


def test_from_backbone_keeps_pretrained_weights(tmp_path):
    torch.manual_seed(3)
    backbone = AutoModel.from_config(BertConfig(**TINY))
    backbone.save_pretrained(tmp_path)
    model = MultiExitClassifier.from_backbone(tmp_path, PceeConfig(num_labels=2, exit_head="per_exit_pooler"))
    for key, value in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert torch.equal(model.exit_poolers[1].dense.weight, backbone.pooler.dense.weight)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "has no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "gpt2"})), "not supported"),
        (
            lambda d: (d / "config.json").write_text(json.dumps(BertConfig(**TINY).to_dict())),
            "has no weights",
        ),
    ],
)
def test_bad_model_directories_get_clear_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises((ModelDirectoryError, UnsupportedArchitectureError), match=message):
        MultiExitClassifier.from_pretrained(tmp_path)


def test_corrupt_weights_get_a_clear_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelDirectoryError, match="corrupt"):
        MultiExitClassifier.from_pretrained(tmp_path)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        MultiExitClassifier.from_pretrained(tmp_path / "nope")


def test_default_exit_pooling_follows_sentence_transformers_config(tmp_path):
    assert default_exit_pooling(tmp_path) == "cls"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert default_exit_pooling(tmp_path) == "mean"


def test_bad_pcee_config_values():
    with pytest.raises(ModelDirectoryError, match="exit_pooling"):
        PceeConfig(num_labels=2, exit_pooling="max")
    with pytest.raises(ModelDirectoryError, match="one name per label"):
        PceeConfig(num_labels=2, label_names=["a"])
