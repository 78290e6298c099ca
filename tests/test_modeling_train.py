"""pcee-train: the training loop really learns, the CLI writes what it promises, bad input is named."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_tiny_model, make_tiny_tokenizer, tiny_backbone_config, tiny_vocabulary
from transformers import AutoModel

import pcee.modeling.cli as cli_module
from pcee.modeling.cli import main as train_cli
from pcee.modeling.data import TextDataset
from pcee.modeling.train import TrainingConfig, encode, length_grouped_batches, train_model
from pcee.runtime.errors import PceeError

POSITIVE = "good great fun love best".split()
NEGATIVE = "bad awful dull hate worst".split()


def sentiment_rows(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randint(0, 1)
        words = rng.sample(POSITIVE if label else NEGATIVE, 2) + rng.sample(
            "the movie film story plot actors".split(), 2
        )
        rng.shuffle(words)
        rows.append((" ".join(words), str(label)))
    return rows


def write_csv(path, rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    directory = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    AutoModel.from_config(tiny_backbone_config("bert", 2, len(tiny_vocabulary()))).save_pretrained(directory)
    make_tiny_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def generic_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_csv(directory / "train.csv", sentiment_rows(96))
    write_csv(directory / "dev.csv", sentiment_rows(32, seed=1))
    return directory


def test_training_lowers_the_loss():
    model = make_tiny_model(num_layers=2, exit_pooling="mean")
    rows = sentiment_rows(128)
    dataset = TextDataset(
        [text for text, _ in rows], None, [int(label) for _, label in rows], ("0", "1"), "memory"
    )
    tokenizer = make_tiny_tokenizer()
    config = TrainingConfig(epochs=8, batch_size=16, learning_rate=1e-3, warmup_ratio=0.1, seed=0)
    losses = train_model(
        model, encode(tokenizer, dataset, 32), config, tokenizer.pad_token_id, progress=False
    )
    assert len(losses) == 64
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8


def test_length_grouped_batches_cover_every_row_once():
    lengths = [random.Random(i).randint(1, 50) for i in range(1000)]
    batches = length_grouped_batches(lengths, 32, random.Random(0))
    assert sorted(row for batch in batches for row in batch) == list(range(1000))
    assert all(len(batch) <= 32 for batch in batches)


def run_train(*arguments):
    return CliRunner().invoke(train_cli, [*map(str, arguments), "--no-progress"], catch_exceptions=False)


def generic_arguments(backbone, files, output):
    return [
        "--backbone",
        backbone,
        "--train-file",
        files / "train.csv",
        "--validation-file",
        files / "dev.csv",
        "--text-column",
        "text",
        "--label-column",
        "label",
        "--output-dir",
        output,
    ]


def test_cli_trains_saves_and_reports_every_exit(tiny_backbone, generic_files, tmp_path, monkeypatch):
    output = tmp_path / "model"
    monkeypatch.chdir(tiny_backbone.parent)  # the backbone given relative, as a user types it
    result = run_train(
        *generic_arguments(tiny_backbone.name, generic_files, output),
        "--epochs",
        "1",
        "--max-seq-len",
        "24",
        "--lr",
        "1e-3",
    )
    assert result.exit_code == 0, result.output
    results = json.loads((output / "eval_results.json").read_text())
    assert [row["layer"] for row in results["exits"]] == [1, 2]
    assert results["metric"] == "accuracy" and all(0 <= row["accuracy"] <= 1 for row in results["exits"])
    config = json.loads((output / "config.json").read_text())
    assert config["pcee"]["max_seq_len"] == 24 and config["pcee"]["label_names"] == ["0", "1"]
    assert config["_name_or_path"] == tiny_backbone.name  # as given, never resolved into this machine
    assert (output / "model.safetensors").is_file() and (output / "tokenizer.json").is_file()
    assert "Per-exit results" in result.output


def test_cli_is_reproducible_for_a_seed(tiny_backbone, generic_files, tmp_path):
    outputs = []
    for name in ("a", "b"):
        run_train(
            *generic_arguments(tiny_backbone, generic_files, tmp_path / name),
            "--epochs",
            "0.5",
            "--seed",
            "7",
        )
        outputs.append(json.loads((tmp_path / name / "eval_results.json").read_text())["final_loss"])
    assert outputs[0] == outputs[1]


def test_cli_refuses_to_overwrite_another_model(tiny_backbone, generic_files, tmp_path):
    output = tmp_path / "occupied"
    output.mkdir()
    (output / "config.json").write_text("{}")
    result = run_train(*generic_arguments(tiny_backbone, generic_files, output))
    assert result.exit_code != 0 and "--overwrite" in result.output


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda args, d: args + ["--task", "nosuchtask", "--data-dir", d], "nosuchtask"),
        (lambda args, d: [a if a != "label" else "stars" for a in args], "stars"),
        (lambda args, d: [str(a).replace("train.csv", "missing.csv") for a in args], "missing.csv"),
        (lambda args, d: args + ["--epochs", "0"], "--epochs"),
    ],
)
def test_cli_bad_inputs_get_clear_errors(tiny_backbone, generic_files, tmp_path, change, message):
    arguments = change(generic_arguments(tiny_backbone, generic_files, tmp_path / "out"), tmp_path)
    result = CliRunner().invoke(train_cli, [*map(str, arguments), "--no-progress"])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_label_outside_the_training_labels(tiny_backbone, generic_files, tmp_path):
    write_csv(tmp_path / "dev.csv", [("good film", "7")])
    arguments = generic_arguments(tiny_backbone, generic_files, tmp_path / "out")
    arguments[arguments.index(generic_files / "dev.csv")] = tmp_path / "dev.csv"
    result = CliRunner().invoke(train_cli, [*map(str, arguments), "--no-progress"])
    assert result.exit_code != 0 and "'7'" in result.output and "Traceback" not in result.output


def test_cli_unsupported_architecture_lists_supported(tmp_path, generic_files):
    backbone = tmp_path / "gpt"
    backbone.mkdir()
    (backbone / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = CliRunner().invoke(
        train_cli, [*map(str, generic_arguments(backbone, generic_files, tmp_path / "out")), "--no-progress"]
    )
    assert result.exit_code != 0 and "bert, distilbert, roberta" in result.output


def test_cli_glue_task_directory_records_the_task_and_label_names(tiny_backbone, tmp_path):
    glue = Path(__file__).parent / "fixtures" / "glue" / "SST-2"
    result = run_train(
        "--backbone",
        tiny_backbone,
        "--task",
        "sst2",
        "--data-dir",
        glue,
        "--output-dir",
        tmp_path / "m",
        "--epochs",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "eval_results.json").read_text())["task"] == "sst2"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["pcee"]["label_names"] == ["negative", "positive"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}


class NotAWeight:
    """A class outside torch's weights-only allow-list: a pickle holding it is refused by safe loading."""


def test_cli_refused_backbone_pickle_is_one_clear_line(tiny_backbone, generic_files, tmp_path):
    backbone = tmp_path / "pickled-backbone"
    shutil.copytree(tiny_backbone, backbone)
    (backbone / "model.safetensors").unlink()
    torch.save({"payload": NotAWeight()}, backbone / "pytorch_model.bin")
    result = run_train(*generic_arguments(backbone, generic_files, tmp_path / "out"))
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert str(backbone / "pytorch_model.bin") in result.output and "safetensors" in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_cli_turns_any_pcee_error_into_one_line(monkeypatch, tmp_path):
    def fail(options):
        raise PceeError("something deliberate went wrong")

    monkeypatch.setattr(cli_module, "run_training", fail)
    result = run_train("--backbone", tmp_path, "--task", "sst2", "--output-dir", tmp_path / "out")
    assert result.exit_code != 0
    assert result.output.strip() == "Error: something deliberate went wrong"
