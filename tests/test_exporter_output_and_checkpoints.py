"""pcee-export hardening: it replaces only what it wrote, cleans its own debris, exports reference
PABEE/PCEE checkpoints (vocab.txt, no tokenizer.json), and says what to install when torch is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_tiny_model, make_tiny_model_dir, make_tiny_tokenizer, tiny_vocabulary
from tokenizers import Tokenizer

from pcee.exporter.bundle import ExportOptions, export_bundle
from pcee.exporter.cli import main as export_cli
from pcee.exporter.errors import CalibratedOutputError, ExportError, OutputDirectoryError
from pcee.runtime import MANIFEST_NAME, EarlyExitRuntime, Manifest, OperatingPoint, record_operating_point

HOUR = 3600


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("hardening"), model_type="bert", num_layers=1)


@pytest.fixture(scope="module")
def bundle(model_dir, tmp_path_factory) -> Path:
    """One exported bundle; tests copy it rather than export again."""
    return export_bundle(
        model_dir, tmp_path_factory.mktemp("exported") / "bundle", ExportOptions()
    ).bundle_dir


def copy_tree(source: Path, target: Path) -> Path:
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(path.read_bytes())
    return target


def make_old(path: Path) -> None:
    stamp = time.time() - HOUR
    os.utime(path, (stamp, stamp))


def make_tree_old(directory: Path) -> None:
    for path in (*directory.rglob("*"), directory):  # children first: touching them would refresh the parent
        make_old(path)


# -- 1. only a pcee bundle holding nothing but bundle files is replaced --------------------------------
def test_a_directory_with_a_foreign_manifest_is_refused_and_kept(tmp_path, model_dir):
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')")
    (project / MANIFEST_NAME).write_text("{}")
    with pytest.raises(OutputDirectoryError, match="not a pcee bundle manifest") as raised:
        export_bundle(model_dir, project, ExportOptions())
    assert "refusing to replace" in str(raised.value) and "--output" in str(raised.value)
    assert (project / "src" / "main.py").read_text() == "print('mine')"


def test_a_bundle_holding_foreign_files_is_refused_and_kept(tmp_path, model_dir, bundle):
    output = copy_tree(bundle, tmp_path / "bundle")
    (output / "notes.txt").write_text("keep me")
    (output / "experiments").mkdir()
    with pytest.raises(OutputDirectoryError, match="experiments, notes.txt") as raised:
        export_bundle(model_dir, output, ExportOptions())
    assert "pcee-export did not write" in str(raised.value)
    assert (output / "notes.txt").read_text() == "keep me" and (output / "experiments").is_dir()


def test_a_bundle_with_the_files_pcee_writes_is_replaced(tmp_path, model_dir, bundle):
    output = copy_tree(bundle, tmp_path / "bundle")
    leftovers = (".pcee-cache/recording.npz", ".manifest.lock", ".manifest.json.x1y2z3")
    for name in leftovers:
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_text("x")
    export_bundle(model_dir, output, ExportOptions())
    assert not (output / ".pcee-cache").exists() and Manifest.load(output)


def calibrated_copy(bundle: Path, target: Path) -> Path:
    """The bundle with two saved points beside the export default, a report folder and an older report file."""
    output = copy_tree(bundle, target)
    for name in ("demo", "quality"):
        record_operating_point(output, OperatingPoint("pcee", tau=0.5, patience=1, name=name), {})
        (output / "reports" / name).mkdir(parents=True)
        (output / "reports" / name / "calibration-report.json").write_text("{}")
    (output / "calibration-frontier.csv").write_text("x")
    return output


def test_a_calibrated_bundle_is_not_replaced_silently(tmp_path, model_dir, bundle):
    output = calibrated_copy(bundle, tmp_path / "bundle")
    before = (output / MANIFEST_NAME).read_text()
    with pytest.raises(CalibratedOutputError) as raised:
        export_bundle(model_dir, output, ExportOptions())
    assert raised.value.points == ["demo", "quality"]
    assert raised.value.reports == ["reports/demo", "reports/quality", "calibration-frontier.csv"]
    assert "--force" in str(raised.value) and f"--output {output}-2" in str(raised.value)
    assert (output / MANIFEST_NAME).read_text() == before and (output / "reports" / "demo").is_dir()


def test_force_replaces_a_calibrated_bundle(tmp_path, model_dir, bundle):
    output = calibrated_copy(bundle, tmp_path / "bundle")
    export_bundle(model_dir, output, ExportOptions(), force=True)
    assert [point.name for point in Manifest.load(output).operating_points] == ["default"]
    assert not (output / "reports").exists() and not (output / "calibration-frontier.csv").exists()


def test_reports_alone_or_a_recalibrated_default_count_as_calibration(tmp_path, model_dir, bundle):
    reported = copy_tree(bundle, tmp_path / "reported")
    (reported / "reports" / "trial").mkdir(parents=True)
    recalibrated = copy_tree(bundle, tmp_path / "recalibrated")
    record_operating_point(recalibrated, OperatingPoint("pcee", tau=0.1, patience=1, name="default"), {})
    for output, lost in ((reported, "reports/trial"), (recalibrated, "operating points default")):
        with pytest.raises(CalibratedOutputError, match=lost):
            export_bundle(model_dir, output, ExportOptions())


def test_the_cli_says_what_would_be_lost_and_how_to_proceed(tmp_path, model_dir, bundle):
    output = calibrated_copy(bundle, tmp_path / "bundle")
    refused = CliRunner().invoke(export_cli, [str(model_dir), "--output", str(output), "--no-progress"])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert "would lose its saved operating points demo, quality and its calibration reports" in refused.output
    forced = CliRunner().invoke(
        export_cli, [str(model_dir), "--output", str(output), "--no-progress", "--force"]
    )
    assert forced.exit_code == 0, forced.output


def test_an_older_pcee_bundle_is_replaced_but_another_producers_is_not(tmp_path, model_dir):
    older = tmp_path / "older"
    (older / "onnx").mkdir(parents=True)
    (older / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "producer": "pcee", "model": {}}))
    assert Manifest.load(export_bundle(model_dir, older, ExportOptions()).bundle_dir).format_version == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "producer": "someone-else"}))
    with pytest.raises(OutputDirectoryError, match="not a pcee bundle manifest"):
        export_bundle(model_dir, foreign, ExportOptions())


def test_cli_refuses_a_foreign_manifest_with_advice(tmp_path, model_dir):
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / MANIFEST_NAME).write_text("{}")
    result = CliRunner().invoke(export_cli, [str(model_dir), "--output", str(project), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "not a pcee bundle manifest" in result.output and "Pass a new --output" in result.output
    assert (project / "src").is_dir()


# -- 2. debris of a killed export -------------------------------------------------------------------
def test_stale_staging_directories_are_removed_and_fresh_ones_kept(tmp_path, model_dir):
    output = tmp_path / "bundle"
    stale = tmp_path / ".bundle.k1ll3d.partial"
    (stale / "onnx").mkdir(parents=True)
    make_tree_old(stale)
    fresh = tmp_path / ".bundle.running.partial"  # another export, started after this process
    fresh.mkdir()
    unrelated = [
        tmp_path / ".bundle-two.k1ll3d.partial",
        tmp_path / ".bundle.v2.k1ll3d.partial",
    ]  # other outputs' staging
    for directory in unrelated:
        directory.mkdir()
        make_old(directory)
    export_bundle(model_dir, output, ExportOptions())
    assert not stale.exists()
    assert fresh.is_dir() and all(directory.is_dir() for directory in unrelated)


def test_a_staging_directory_with_recent_writes_inside_is_kept(tmp_path, model_dir):
    """An export that started long ago but still writes into its staging directory is running."""
    staging = tmp_path / ".bundle.slow.partial"
    (staging / "onnx").mkdir(parents=True)
    make_old(staging)
    export_bundle(model_dir, tmp_path / "bundle", ExportOptions())
    assert staging.is_dir()


def test_a_stale_backup_bundle_is_removed_even_when_the_export_then_fails(tmp_path, model_dir, bundle):
    output = copy_tree(bundle, tmp_path / "bundle")
    backup = copy_tree(bundle, tmp_path / "bundle.old")
    make_tree_old(backup)
    with pytest.raises(ExportError, match="--max-seq-len 5000"):
        export_bundle(model_dir, output, ExportOptions(max_seq_len=5000))
    assert not backup.exists() and Manifest.load(output)


def test_a_backup_without_its_output_is_kept_until_a_new_bundle_is_in_place(tmp_path, model_dir, bundle):
    """A kill between the swap's two renames leaves the previous bundle only at NAME.old."""
    backup = copy_tree(bundle, tmp_path / "bundle.old")
    make_tree_old(backup)
    with pytest.raises(ExportError, match="--max-seq-len 5000"):
        export_bundle(model_dir, tmp_path / "bundle", ExportOptions(max_seq_len=5000))
    assert Manifest.load(backup)


def test_a_foreign_directory_named_like_the_backup_is_refused_and_kept(tmp_path, model_dir):
    keep = tmp_path / "bundle.old"
    keep.mkdir()
    (keep / "thesis.tex").write_text("keep me")
    with pytest.raises(OutputDirectoryError, match="bundle.old") as raised:
        export_bundle(model_dir, tmp_path / "bundle", ExportOptions())
    assert "previous bundle" in str(raised.value)
    assert (keep / "thesis.tex").read_text() == "keep me"


# -- 3. reference PABEE/PCEE checkpoints -------------------------------------------------------------
def write_reference_checkpoint(
    directory: Path,
    id2label: dict[str, str] | None = None,
    finetuning_task: str | None = None,
    extra_vocab: list[str] | None = None,
    drop_vocab: int = 0,
    tokenizer_config: dict | None = None,
) -> Path:
    """What the transformers-3 reference code saves: `bert.*` + `classifiers.<i>.*` in pytorch_model.bin,
    a config.json without a pcee block, vocab.txt and no tokenizer.json."""
    model = make_tiny_model("bert", num_layers=2)
    directory.mkdir(parents=True)
    state = {
        ("bert." + key[len("backbone.") :] if key.startswith("backbone.") else key): value
        for key, value in model.state_dict().items()
    }
    torch.save(state, directory / "pytorch_model.bin")
    config = model.backbone_config.to_dict()
    config.update(id2label=id2label or {"0": "LABEL_0", "1": "LABEL_1"}, finetuning_task=finetuning_task)
    config["label2id"] = {name: int(index) for index, name in config["id2label"].items()}
    (directory / "config.json").write_text(json.dumps(config))
    vocabulary = list(tiny_vocabulary())
    vocabulary = vocabulary[: len(vocabulary) - drop_vocab] + (extra_vocab or [])
    (directory / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@pytest.mark.parametrize(
    "id2label, finetuning_task, labels, sentence_pair, metric",
    [
        ({"0": "negative", "1": "positive"}, "sst-2", ["negative", "positive"], False, "accuracy"),
        ({"0": "LABEL_0", "1": "LABEL_1"}, "qqp", ["0", "1"], True, "f1"),
        ({"0": "LABEL_0", "1": "yes"}, "my-own-task", ["LABEL_0", "yes"], False, "accuracy"),
        ({"0": "a", "1": "b", "2": "c"}, None, ["a", "b", "c"], False, "accuracy"),
    ],
)
def test_reference_config_gives_label_names_pair_input_and_metric(
    tmp_path, id2label, finetuning_task, labels, sentence_pair, metric
):
    from pcee.modeling.model import MultiExitClassifier

    model_dir = write_reference_checkpoint(
        tmp_path / "reference", id2label=id2label, finetuning_task=finetuning_task
    )
    if len(id2label) != 2:  # the classifiers must match the label count
        state = torch.load(model_dir / "pytorch_model.bin")
        for index in range(2):
            state[f"classifiers.{index}.weight"] = torch.zeros(
                len(id2label), state[f"classifiers.{index}.weight"].shape[1]
            )
            state[f"classifiers.{index}.bias"] = torch.zeros(len(id2label))
        torch.save(state, model_dir / "pytorch_model.bin")
    config = MultiExitClassifier.from_pretrained(model_dir).pcee_config
    assert (config.label_names, config.sentence_pair, config.metric) == (labels, sentence_pair, metric)


TEXTS = ["The movie was GREAT, really fun!", "a dull story", "what did you think of the plot?"]
PAIRS = ["It was good.", "The actors were awful", "who knows"]


def test_reference_checkpoint_exports_with_a_built_tokenizer_and_its_label_names(tmp_path):
    model_dir = write_reference_checkpoint(
        tmp_path / "reference", id2label={"0": "negative", "1": "positive"}, finetuning_task="sst-2"
    )
    result = export_bundle(model_dir, tmp_path / "bundle", ExportOptions())
    manifest = Manifest.load(result.bundle_dir)
    assert manifest.model.labels == ["negative", "positive"]
    assert manifest.model.task_type == "single_sentence"
    assert manifest.tokenizer.built_from == "vocab.txt"
    assert manifest.tokenizer.files[0].file == "tokenizer/tokenizer.json"
    built = Tokenizer.from_file(str(result.bundle_dir / "tokenizer/tokenizer.json"))
    expected = make_tiny_tokenizer().backend_tokenizer  # the WordPiece tokenizer the tiny model was made for
    for text, pair in zip(TEXTS, PAIRS):
        assert built.encode(text).ids == expected.encode(text).ids
        assert built.encode(text, pair).type_ids == expected.encode(text, pair).type_ids
    runtime = EarlyExitRuntime.from_bundle(result.bundle_dir, backend="onnxruntime-cpu")
    assert {row.label for row in runtime.predict(TEXTS).predictions} <= {"negative", "positive"}
    model = make_tiny_model("bert", num_layers=2)
    encoded = make_tiny_tokenizer()(TEXTS, padding=True, return_token_type_ids=True, return_tensors="pt")
    with torch.no_grad():
        torch_logits = model(
            encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"]
        ).logits[-1]
    runtime_logits = runtime.run_all_exits(runtime.tokenizer.encode_texts(TEXTS)).logits[:, -1]
    np.testing.assert_allclose(runtime_logits, torch_logits.numpy(), atol=1e-4)


def test_reference_pair_task_exports_as_a_pair_bundle(tmp_path):
    model_dir = write_reference_checkpoint(tmp_path / "reference", finetuning_task="MRPC")
    result = export_bundle(model_dir, tmp_path / "bundle", ExportOptions())
    assert result.manifest.model.task_type == "sentence_pair"
    assert result.manifest.model.labels == ["0", "1"]  # LABEL_0 / LABEL_1 are no names
    assert result.manifest.model.metric == "f1"
    runtime = EarlyExitRuntime.from_bundle(result.bundle_dir, backend="onnxruntime-cpu")
    assert len(runtime.predict(TEXTS, PAIRS).predictions) == len(TEXTS)


def test_task_type_option_overrides_the_config(tmp_path):
    model_dir = write_reference_checkpoint(tmp_path / "reference")
    output = tmp_path / "bundle"
    result = CliRunner().invoke(
        export_cli, [str(model_dir), "-o", str(output), "--task-type", "sentence_pair", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert Manifest.load(output).model.task_type == "sentence_pair"
    help_text = CliRunner().invoke(export_cli, ["--help"]).output
    assert "--task-type [single_sentence|sentence_pair]" in help_text and "finetuning_task" in help_text
    with pytest.raises(ExportError, match="--task-type 'pairs' is not one of single_sentence, sentence_pair"):
        export_bundle(model_dir, options=ExportOptions(task_type="pairs"))


def test_do_lower_case_false_builds_a_cased_tokenizer(tmp_path):
    model_dir = write_reference_checkpoint(tmp_path / "reference", tokenizer_config={"do_lower_case": False})
    bundle_dir = export_bundle(model_dir, tmp_path / "bundle", ExportOptions()).bundle_dir
    built = Tokenizer.from_file(str(bundle_dir / "tokenizer/tokenizer.json"))
    assert built.encode("The", add_special_tokens=False).tokens != ["the"]


@pytest.mark.parametrize("extra_vocab, drop_vocab, size", [(["extra"], 0, "+1"), ([], 1, "-1")])
def test_vocab_txt_of_another_size_than_the_model_is_refused(tmp_path, extra_vocab, drop_vocab, size):
    model_dir = write_reference_checkpoint(
        tmp_path / "reference", extra_vocab=extra_vocab, drop_vocab=drop_vocab
    )
    vocab_size = len(tiny_vocabulary())
    tokens = vocab_size + int(size)
    with pytest.raises(
        ExportError, match=f"tokenizer size {tokens} from .*vocab.txt .* model config vocab_size {vocab_size}"
    ):
        export_bundle(model_dir, tmp_path / "bundle", ExportOptions())
    assert not (tmp_path / "bundle").exists()


def test_tokenizer_json_larger_than_the_model_vocabulary_is_refused(tmp_path, model_dir):
    model_copy = copy_tree(model_dir, tmp_path / "model")
    tokenizer = Tokenizer.from_file(str(model_copy / "tokenizer.json"))
    tokenizer.add_tokens(["brandnewtoken"])
    tokenizer.save(str(model_copy / "tokenizer.json"))
    with pytest.raises(
        ExportError, match=r"tokenizer size \d+ from .*tokenizer.json .* model config vocab_size \d+"
    ):
        export_bundle(model_copy, tmp_path / "bundle", ExportOptions())


def test_vocab_txt_without_bert_special_tokens_is_refused(tmp_path):
    model_dir = write_reference_checkpoint(tmp_path / "reference")
    vocabulary = (model_dir / "vocab.txt").read_text().replace("[CLS]\n", "[cls]\n")
    (model_dir / "vocab.txt").write_text(vocabulary)
    with pytest.raises(ExportError, match=r"vocab.txt lacks \[CLS\]"):
        export_bundle(model_dir, tmp_path / "bundle", ExportOptions())


# -- 4. a runtime-only install -----------------------------------------------------------------------
TORCH_COMMANDS = {
    "pcee-export": ("pcee.exporter.cli", ["model-dir"]),
    "pcee-train": ("pcee.modeling.cli", ["--backbone", "backbone-dir", "--output-dir", "runs/x"]),
    "pcee-demo": ("pcee.demo.cli", []),
}


@pytest.mark.parametrize("command", sorted(TORCH_COMMANDS))
@pytest.mark.parametrize("blocked", ["torch", "transformers"])
def test_torch_commands_without_the_export_extras_say_what_to_install(command, blocked):
    module, arguments = TORCH_COMMANDS[command]
    script = f"import sys; sys.modules[{blocked!r}] = None; from {module} import main; main({arguments!r})"
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert blocked in completed.stderr and "pip install 'pcee[export]'" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1 and completed.stdout == ""
