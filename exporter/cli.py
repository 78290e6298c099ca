"""`pcee-export`: turn a trained multi-exit model directory into a verified deployment bundle."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pcee.modeling.extras import require_export_extras
from pcee.runtime import TASK_TYPES

from .options import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    QUANTIZATIONS,
)


def choices(values: tuple[str, ...]) -> str:
    """The --help metavar of an option whose value ExportOptions checks: its choices, as click.Choice shows them."""
    return f"[{'|'.join(values)}]"


# What exporting imports beyond the runtime's own packages; the `export` extra installs them.
@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    help="Bundle directory. Default: MODEL_DIR-pcee beside MODEL_DIR. An existing directory there is replaced, once the new bundle is verified, only if it is a pcee bundle holding nothing but bundle files; anything else is refused. A bundle with saved operating points or calibration reports is replaced only with --force.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace the bundle at --output even though it holds saved operating points or calibration reports, "
    "which are lost.",
)
@click.option(
    "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset of the graphs ({MIN_OPSET} to {MAX_OPSET})."
)
@click.option(
    "--fp16",
    is_flag=True,
    help="Half-precision layers behind a float32 interface; parity tolerance 2e-2 instead of 1e-4.",
)
@click.option(
    "--tensorrt",
    is_flag=True,
    help="Also build one TensorRT engine per graph into trt/ (needs the tensorrt package and an NVIDIA GPU).",
)
@click.option(
    "--max-batch-size",
    type=int,
    default=DEFAULT_MAX_BATCH_SIZE,
    help="Largest batch the TensorRT engines accept (at least 1).",
)
@click.option(
    "--max-seq-len",
    type=int,
    help="Longest input in tokens. Default: the model's own max_seq_len.",
)
@click.option(
    "--task-type",
    metavar=choices(TASK_TYPES),
    help="One text per row, or a pair of texts per row (question/answer, premise/hypothesis) that the tokenizer "
    "joins with its separator. Default: what the model's config says (pcee-train records it); for a reference "
    "PABEE/PCEE checkpoint, sentence_pair when its config's finetuning_task is a GLUE pair task (mrpc, qqp, "
    "mnli, qnli, rte), else single_sentence. Set it when a reference checkpoint was fine-tuned on pairs under "
    "another task name.",
)
@click.option(
    "--fuse/--no-fuse",
    "fuse",
    default=True,
    show_default=True,
    help="Give the graphs onnxruntime's transformer fusions (one Attention node per layer for BERT and RoBERTa, "
    "BiasGelu), which run on onnxruntime alone (on CPU as fast as portable graphs or slightly faster; see "
    "docs/RESULTS.md), or write "
    "portable graphs of standard ONNX operators for other runtimes. --tensorrt, --fp16 and --opset below 17 "
    "always write portable graphs (TensorRT does its own fusion).",
)
@click.option(
    "--quantize",
    metavar=choices(QUANTIZATIONS),
    help="Dynamically quantize the layer graphs' MatMul and Attention weights to int8 (onnxruntime CPU; the exit heads "
    "stay float). Checked by label agreement with the float model per exit instead of the 1e-4 tolerance.",
)
@click.option(
    "--parity-data",
    type=click.Path(path_type=Path),
    help="With --quantize: labelled rows (a GLUE task directory, whose dev split is used, or a GLUE-format file of the "
    "model's task) on which agreement and per-exit accuracy are measured and recorded in the manifest. Without it, "
    "agreement is measured on a dozen built-in sentences only.",
)
@click.option(
    "--min-agreement",
    type=float,
    default=DEFAULT_MIN_AGREEMENT,
    help="With --quantize: the export fails when the int8 chain's last exit predicts the float model's label on fewer "
    "than this share (0 to 1) of the rows.",
)
@click.option(
    "--with-full-graph",
    is_flag=True,
    help="Also export the whole model as one graph (onnx/full_model.onnx) for benchmarks.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object (bundle, files and sizes, parity, seconds) instead of text.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def main(
    model_dir: Path, output: Path | None, force: bool, as_json: bool, no_progress: bool, **options
) -> None:
    """Export MODEL_DIR (written by pcee-train) to a bundle the pcee runtime serves.

    Every transformer layer becomes one ONNX graph with its exit head inside; the chain is
    checked against PyTorch on real sentences before anything is written.
    MODEL_DIR may also be a reference PABEE/PCEE checkpoint (pytorch_model.bin,
    config.json, vocab.txt): its tokenizer.json is then built from vocab.txt.

    \b
    Example:
      pcee-export runs/sst2                       # -> runs/sst2-pcee/
      pcee-export runs/sst2 -o bundles/sst2 --tensorrt --max-batch-size 64
      pcee-export pabee-rte-checkpoint --task-type sentence_pair
      pcee-export runs/sst2 -o runs/sst2-pcee-int8 --quantize int8 --parity-data data/glue/SST-2
      pcee-predict runs/sst2-pcee --text "a charming, affecting journey"

    \b
    The bundle holds manifest.json, onnx/embeddings.onnx, onnx/layer_01.onnx ...,
    tokenizer/ and, with --tensorrt, trt/. Until pcee-calibrate tunes its early-exit
    thresholds for your data, it uses a conservative uncalibrated default. An existing
    directory is replaced only if it is a pcee bundle holding nothing but bundle files,
    and a calibrated one (saved operating points, reports) only with --force.
    """
    require_export_extras("pcee-export")
    from pcee.modeling.errors import ModelingError
    from pcee.runtime import PceeError

    from .bundle import export_bundle
    from .errors import ExportError
    from .options import ExportOptions

    try:
        result = export_bundle(model_dir, output, ExportOptions(progress=not no_progress, **options), force)
    except (ExportError, ModelingError, PceeError) as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(f"cannot write the bundle: {error}") from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_summary(result.to_dict())


def print_summary(result: dict) -> None:
    parity = result["parity"]
    click.echo(
        f"Parity with PyTorch (max |diff| per graph, tolerance {parity['tolerance']:g}, "
        f"batch sizes {parity['batch_sizes']}, sequence lengths {parity['sequence_lengths']}):"
    )
    for graph, diffs in parity["max_abs_diff"].items():
        click.echo(f"  {graph:<11} " + "  ".join(f"{name} {diff:.2e}" for name, diff in diffs.items()))
    layer_operators = next(
        (counts for file, counts in result["fused_operators"].items() if "layer_" in file), {}
    )
    click.echo(f"Fused operators per layer graph: {layer_operators or 'none (portable graphs)'}")
    quantization = result["quantization"]
    if quantization is not None:
        click.echo(
            f"int8 agreement with the float model per exit ({quantization['rows']} rows, minimum "
            f"{quantization['min_agreement']:g} at the last): {quantization['agreement']}"
        )
        if quantization["accuracy"] is not None:
            click.echo(
                f"Accuracy per exit on {quantization['parity_data']}: int8 {quantization['accuracy']}, float {quantization['float_accuracy']}"
            )
    size_mb = result["total_bytes"] / 1e6
    click.echo(
        f"Exported {len(result['files'])} files ({size_mb:.1f} MB, {result['precision']}) in {result['export_seconds']:.1f}s"
    )
    click.echo(f"Bundle written to {result['bundle']}")
