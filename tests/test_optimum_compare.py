"""benchmarks/optimum_compare.py without Optimum: the checkpoint it hands Optimum, the head it appends, its CLI checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pcee.benchmarks.optimum_compare import (
    OptimumCompareError,
    append_exit_head,
    main,
    write_hf_checkpoint,
)
from pcee.runtime import EncodedBatch, SingleGraphSession

torch = pytest.importorskip("torch", reason="the checkpoint conversion is checked against the PyTorch model")


@pytest.fixture(scope="module")
def mean_model_dir(tiny_bundles) -> Path:
    return tiny_bundles.model_dir(task="sst2", exit_pooling="mean")


def token_rows() -> tuple[np.ndarray, np.ndarray]:
    input_ids = np.array([[2, 7, 9, 11, 3, 0, 0], [2, 5, 6, 8, 10, 12, 3]], dtype=np.int64)
    return input_ids, (input_ids != 0).astype(np.int64)


def test_checkpoint_is_the_backbone_and_the_head_is_the_last_exit(
    mean_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import BertModel

    from pcee.modeling.model import MultiExitClassifier

    head = write_hf_checkpoint(mean_model_dir, tmp_path / "checkpoint")
    encoder = BertModel.from_pretrained(tmp_path / "checkpoint").eval()
    model = MultiExitClassifier.from_pretrained(mean_model_dir).eval()
    input_ids, mask = token_rows()
    with torch.inference_mode():
        hidden = encoder(
            input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state.numpy()
        expected = model(torch.from_numpy(input_ids), torch.from_numpy(mask)).logits[-1].numpy()
    pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(pooled @ head["weight"].T + head["bias"], expected, atol=1e-4)


def test_cls_pooled_models_are_refused(tiny_bundles, tmp_path: Path) -> None:
    with pytest.raises(OptimumCompareError, match="mean-pooled exit head"):
        write_hf_checkpoint(tiny_bundles.model_dir(task="sst2", exit_pooling="cls"), tmp_path / "checkpoint")


def test_appended_head_pools_only_real_tokens(tmp_path: Path) -> None:
    """A stand-in encoder graph (an embedding lookup as last_hidden_state) gets the head; its logits match numpy's."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = rng.standard_normal((16, 4)).astype(np.float32)
    head = {
        "weight": rng.standard_normal((2, 4)).astype(np.float32),
        "bias": np.array([0.5, -0.5], np.float32),
    }
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])],
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "tokens", 4])],
        [numpy_helper.from_array(table, "table")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    append_exit_head(tmp_path / "model.onnx", head, tmp_path / "with_head.onnx")
    input_ids, mask = token_rows()
    logits = SingleGraphSession(tmp_path / "with_head.onnx", 1).logits(
        EncodedBatch(input_ids, mask, np.zeros_like(input_ids), np.zeros(len(input_ids), bool))
    )
    pooled = (table[input_ids] * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(logits, pooled @ head["weight"].T + head["bias"], rtol=1e-5, atol=1e-5)


def test_build_without_optimum_venv_says_how_to_make_it(mean_model_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["build", str(mean_model_dir), "-o", str(tmp_path / "out"), "--optimum-python", str(tmp_path / "no")],
    )
    assert result.exit_code == 1
    assert "make Optimum's virtualenv first" in result.output
    assert not (tmp_path / "out").exists()


def test_time_without_built_graphs_names_the_build_step(sst2_bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\na fine film\t1\n", encoding="utf-8")
    result = CliRunner().invoke(
        main,
        ["time", str(tmp_path), "--bundle", str(sst2_bundle), "--points", "speedup-0.5", "--data", str(data)],
    )
    assert result.exit_code == 1
    assert "optimum_compare build" in result.output
