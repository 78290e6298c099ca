"""pcee against Optimum's ONNX Runtime exports of the same weights, reproducibly.

`build` writes the pcee-train model's backbone as a plain Hugging Face BertModel checkpoint, has
Optimum export it (plain, O2, O3, and int8: O3 quantized with the avx512_vnni config) in Optimum's
own virtualenv, and appends the model's last exit head to each graph. `time` times those graphs with
onnxruntime alone next to pcee bundles at saved points, in this environment, through pcee-bench's
contenders and interleaved measurement.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import click
import numpy as np

from pcee.calibration.cli import data_options, labelled_data, open_labelled_data
from pcee.runtime import (
    FULL_POLICY,
    Manifest,
    OperatingPoint,
    PceeError,
    SingleGraphSession,
    replace_directory,
    staging_directory_for,
)

from .bench import ALL_LAYERS, CLOCKS, BenchmarkError, chunks_of, single_graph_contender
from .cli import BatchSizes, Chain, PointNames, check_same_model, measure_batch_size, open_chain
from .machine import cpu_description, describe_cpu

BACKBONE_PREFIX = "backbone."
CHECKPOINT_FILES = ("tokenizer.json", "tokenizer_config.json")
VARIANTS = ("plain", "O2", "O3", "int8")  # the order Optimum builds them in; plain is every ratio's reference
OPTIMUM_PREFIX = "optimum_"
GRAPH_WITH_HEAD = "model_with_head.onnx"
PLAIN_OPTIMUM = OPTIMUM_PREFIX + "plain"

# Run in Optimum's venv (its transformers < 4.58): argv = checkpoint dir, output dir.
OPTIMUM_SCRIPT = """
import sys
from pathlib import Path
from onnx import TensorProto
from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer, ORTQuantizer
from optimum.onnxruntime import quantization as optimum_quantization
from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
model = ORTModelForFeatureExtraction.from_pretrained(checkpoint, export=True)
model.save_pretrained(out / "plain")
for level in ("O2", "O3"):
    optimizer = ORTOptimizer.from_pretrained(out / "plain")
    config = getattr(AutoOptimizationConfig, level)()
    optimizer.optimize(save_dir=out / level, optimization_config=config)
# Optimized graphs carry fused nodes whose outputs have no inferred type: without a default the
# quantizer stops with "Unable to find data type for weight_name". ORTQuantizer builds the options
# itself, so its quantizer class gets the default.
class TypedQuantizer(optimum_quantization.ONNXQuantizer):
    def __init__(self, *args, extra_options=None, **kwargs):
        super().__init__(*args, extra_options={**(extra_options or {}), "DefaultTensorType": TensorProto.FLOAT}, **kwargs)

optimum_quantization.ONNXQuantizer = TypedQuantizer
quantizer = ORTQuantizer.from_pretrained(out / "O3", file_name="model_optimized.onnx")
config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
quantizer.quantize(save_dir=out / "int8", quantization_config=config)
"""


class OptimumCompareError(BenchmarkError):
    """The comparison cannot run as asked; the message says what to do."""


# -- the checkpoint Optimum exports ------------------------------------------------------------------


def write_hf_checkpoint(model_dir: Path, destination: Path) -> dict:
    """The backbone of a pcee-train output as a HF BertModel checkpoint, and its last exit head.

    The exit heads are a linear layer over the MASKED MEAN of the layer's hidden states, which
    BertForSequenceClassification (a linear over dense + tanh of the first token) cannot express;
    so Optimum exports the encoder (feature extraction) and `append_exit_head` adds the exact head.
    Returns the head: {"weight": [K, H], "bias": [K]}.
    """
    from safetensors.numpy import load_file, save_file

    config = read_model_config(model_dir)
    weights = load_file(model_dir / "model.safetensors")
    last = config["num_hidden_layers"] - 1
    head_keys = (f"classifiers.{last}.weight", f"classifiers.{last}.bias")
    if config["pcee"].get("exit_pooling") != "mean" or any(key not in weights for key in head_keys):
        raise OptimumCompareError(
            f"{model_dir}: expected a mean-pooled exit head at classifiers.{last} "
            f"(exit_pooling {config['pcee'].get('exit_pooling')!r}); only mean pooling is converted"
        )
    backbone = {
        key[len(BACKBONE_PREFIX) :]: value
        for key, value in weights.items()
        if key.startswith(BACKBONE_PREFIX)
    }
    destination.mkdir(parents=True, exist_ok=True)
    save_file(backbone, destination / "model.safetensors", metadata={"format": "pt"})
    hf_config = {key: value for key, value in config.items() if key not in ("pcee", "dtype")}
    hf_config["architectures"] = ["BertModel"]
    (destination / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    for name in CHECKPOINT_FILES:
        shutil.copy2(model_dir / name, destination / name)
    return {"weight": weights[head_keys[0]], "bias": weights[head_keys[1]]}


def read_model_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise OptimumCompareError(f"{path}: cannot read a pcee-train config ({error})") from None
    if config.get("model_type") != "bert" or "pcee" not in config:
        raise OptimumCompareError(
            f"{model_dir} is not a pcee-train output of a BERT backbone "
            f"(model_type {config.get('model_type')!r}); give the directory pcee-train wrote"
        )
    return config


def append_exit_head(graph: Path, head: dict, destination: Path) -> None:
    """`graph` (last_hidden_state out) with the exit head appended: masked mean, then linear, out as "logits"."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(graph)
    hidden = next(output.name for output in model.graph.output if output.name == "last_hidden_state")
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["head_mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["head_mask", "head_last_axis"], ["head_mask_3d"]),
        helper.make_node("Mul", [hidden, "head_mask_3d"], ["head_masked"]),
        helper.make_node("ReduceSum", ["head_masked", "head_token_axis"], ["head_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["head_mask_3d", "head_token_axis"], ["head_count"], keepdims=0),
        helper.make_node("Max", ["head_count", "head_one"], ["head_count_clamped"]),
        helper.make_node("Div", ["head_sum", "head_count_clamped"], ["head_pooled"]),
        helper.make_node("Gemm", ["head_pooled", "head_weight", "head_bias"], ["logits"], transB=1),
    ]
    constants = {
        "head_last_axis": np.array([-1], dtype=np.int64),
        "head_token_axis": np.array([1], dtype=np.int64),
        "head_one": np.array([1.0], dtype=np.float32),
        "head_weight": head["weight"].astype(np.float32),
        "head_bias": head["bias"].astype(np.float32),
    }
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    model.graph.node.extend(nodes)
    del model.graph.output[:]
    model.graph.output.append(
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", len(head["bias"])])
    )
    onnx.checker.check_model(model)
    onnx.save(model, destination)


def exported_graph(variant_dir: Path) -> Path:
    """The one .onnx file Optimum wrote into a variant's directory."""
    graphs = sorted(path for path in variant_dir.glob("*.onnx") if path.name != GRAPH_WITH_HEAD)
    if len(graphs) != 1:
        raise OptimumCompareError(f"{variant_dir}: expected one ONNX graph from Optimum, found {graphs}")
    return graphs[0]


def write_optimum_graphs(model_dir: Path, optimum_python: Path, out_dir: Path) -> None:
    head = write_hf_checkpoint(model_dir, out_dir / "checkpoint")
    run_optimum(optimum_python.absolute(), out_dir / "checkpoint", out_dir)
    for variant in VARIANTS:
        append_exit_head(exported_graph(out_dir / variant), head, out_dir / variant / GRAPH_WITH_HEAD)


def run_optimum(python: Path, checkpoint: Path, out_dir: Path) -> None:
    try:
        subprocess.run([str(python), "-c", OPTIMUM_SCRIPT, str(checkpoint), str(out_dir)], check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise OptimumCompareError(
            f"Optimum's export in {python} failed ({error}); its output is above"
        ) from None


# -- the CLI ---------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """pcee against Optimum (ONNX Runtime) on the same weights: build Optimum's graphs, then time them.

    \b
    Optimum's exporters need transformers < 4.58 while pcee needs 5.x, so `build` drives
    Optimum in its own virtualenv (made once, e.g.):
      python -m venv runs/optimum-venv
      runs/optimum-venv/bin/pip install "optimum-onnx[onnxruntime]" "transformers<4.58" torch==2.13.0
    \b
    Then, in pcee's environment:
      python -m pcee.benchmarks.optimum_compare build runs/sst2 -o runs/optimum-sst2
      python -m pcee.benchmarks.optimum_compare time runs/optimum-sst2 \\
          --bundle runs/sst2-pcee --bundle runs/sst2-pcee-int8 \\
          --points speedup-0.5,speedup-0.75 --data data/glue/SST-2/dev.tsv
    """


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the checkpoint and Optimum's graphs go (replaced whole, atomically).",
)
@click.option(
    "--optimum-python",
    default=Path("runs/optimum-venv/bin/python"),
    type=click.Path(dir_okay=False, path_type=Path),
    help="The python of the virtualenv Optimum is installed in (see `--help` of the group).",
)
def build(model_dir: Path, output_dir: Path, optimum_python: Path) -> None:
    """Export MODEL_DIR (a pcee-train output) with Optimum: plain, O2, O3 and int8 graphs.

    \b
    MODEL_DIR's backbone is written as a HF BertModel checkpoint (checkpoint/); Optimum exports it
    for feature extraction (plain/), optimizes that at O2 and O3 (O2/, O3/; O3 adds GELU
    approximation) and quantizes O3 dynamically with its avx512_vnni config (int8/). The model's
    last exit head (masked mean pooling, then linear: what pcee's bundle runs at its last layer)
    is appended to each graph as model_with_head.onnx, so every graph outputs the same logits.
    """
    try:
        if not optimum_python.is_file():
            raise OptimumCompareError(
                f"--optimum-python {optimum_python} does not exist; make Optimum's virtualenv first "
                "(see `python -m pcee.benchmarks.optimum_compare --help`)"
            )
        staging = staging_directory_for(output_dir)
        try:
            write_optimum_graphs(model_dir, optimum_python, staging)
            replace_directory(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful replace
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Wrote Optimum's {', '.join(VARIANTS)} graphs of {model_dir} to {output_dir}")


@main.command("time")
@click.argument("optimum_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--bundle",
    "bundles",
    multiple=True,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A pcee bundle of the same model (repeatable: float and int8). Read in place, never written.",
)
@data_options
@click.option(
    "--points",
    type=PointNames(),
    required=True,
    help="Saved operating points to time every bundle at, comma-separated, e.g. speedup-0.5,speedup-0.75.",
)
@click.option("--batch-sizes", type=BatchSizes(), default="1,32", help="Batch sizes, comma-separated.")
@click.option(
    "--repeats", default=3, type=click.IntRange(min=1), help="Interleaved passes; the median is reported."
)
@click.option("--max-rows", type=click.IntRange(min=1), help="Only the first N rows of --data: a quick look.")
@click.option(
    "--clock",
    type=click.Choice(sorted(CLOCKS)),
    default="cpu",
    help="cpu: the measuring thread's CPU time (every session runs one thread, so it leaves out waits for a "
    "core on a loaded machine); wall: elapsed time.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars (stderr).")
def time_graphs(optimum_dir: Path, bundles: tuple[Path, ...], **options) -> None:
    """Time OPTIMUM_DIR's graphs (from `build`) next to pcee bundles, one thread each, interleaved.

    \b
    Every contender runs the same tokenized rows in data order, chunk by chunk, in one process:
      optimum_plain / _O2 / _O3 / _int8   Optimum's graphs with the exit head, onnxruntime alone
      runtime_all_layers@BUNDLE           the bundle's chain, no early exit
      runtime_point_NAME@BUNDLE           the bundle at saved point NAME
    Each row of the table gives rows/s as a multiple of optimum_plain's (versus_optimum_plain) per
    batch size, and every contender's accuracy on the rows (Optimum's graphs must match the
    bundle's all-layers chain: the same weights). The
    header names the CPU and the flags int8 speed depends on (avx512_vnni, amx).
    """
    options["intra_op_threads"] = 1
    try:
        report = compare(optimum_dir, bundles, options)
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(report, indent=2) if options["as_json"] else format_table(report))


def compare(optimum_dir: Path, bundles: tuple[Path, ...], options: dict) -> dict:
    graphs = {OPTIMUM_PREFIX + variant: optimum_dir / variant / GRAPH_WITH_HEAD for variant in VARIANTS}
    missing = [str(path) for path in graphs.values() if not path.is_file()]
    if missing:
        raise OptimumCompareError(
            f"{optimum_dir} lacks {', '.join(missing)}; write it with `python -m pcee.benchmarks.optimum_compare build`"
        )
    _, dataset, labels = open_labelled_data(bundles[0], labelled_data(options))
    check_same_model(Manifest.load(bundles[0], verify_hashes=False), bundles[1:])
    chains = [open_chain(bundle, f"@{bundle.name}", options) for bundle in bundles]
    runtime = chains[0].runtime
    batch = runtime.tokenizer.encode_texts(dataset.texts, dataset.text_pairs)
    if options["max_rows"]:
        batch = batch.select(np.arange(min(options["max_rows"], len(batch))))
        labels = labels[: len(batch)]
    optimum = [
        single_graph_contender(path, 1, name, "int8" if name.endswith("int8") else "fp32")
        for name, path in graphs.items()
    ]
    accuracy = {
        contender.name: graph_accuracy(graphs[contender.name], batch, labels) for contender in optimum
    } | {name: chain_accuracy(chain, name, batch, labels) for chain in chains for name in chain_names(chain)}
    results = {}
    for batch_size in options["batch_sizes"]:
        contenders = optimum + [contender for chain in chains for contender in chain.contenders(batch_size)]
        figures = measure_batch_size(
            contenders, batch, batch_size, runtime.num_layers, options, reference=PLAIN_OPTIMUM
        )
        plain = figures[PLAIN_OPTIMUM]["seconds_per_pass"]
        results[str(batch_size)] = {
            name: {**entry, "versus_optimum_plain": round(plain / entry["seconds_per_pass"], 4)}
            for name, entry in figures.items()
            if isinstance(entry, dict)
        }
    return {
        "optimum_dir": str(optimum_dir),
        "bundles": [str(bundle) for bundle in bundles],
        "cpu": cpu_description(),
        "rows": len(batch),
        "repeats": options["repeats"],
        "clock": options["clock"],
        "intra_op_threads": 1,
        "accuracy": accuracy,
        "results": results,
    }


def graph_accuracy(path: Path, batch, labels: np.ndarray) -> float:
    session = SingleGraphSession(path, 1)
    predicted = np.concatenate([session.logits(chunk).argmax(axis=1) for chunk in chunks_of(batch, 64)])
    return round(float((predicted == labels).mean()), 4)


def chain_names(chain: Chain) -> list[str]:
    return [ALL_LAYERS + chain.suffix] + [name + chain.suffix for name, _ in chain.points]


def chain_accuracy(chain: Chain, name: str, batch, labels: np.ndarray) -> float:
    points = dict((point_name + chain.suffix, point) for point_name, point in chain.points)
    result = chain.runtime.predict_encoded(batch, points.get(name, OperatingPoint(FULL_POLICY)), 32)
    predicted = np.array([row.label_index for row in result.predictions])
    return round(float((predicted == labels).mean()), 4)


def format_table(report: dict) -> str:
    sizes = list(report["results"])
    names = list(report["results"][sizes[0]])
    width = max(len(name) for name in names)
    lines = [
        f"CPU: {describe_cpu(report['cpu'])}; {report['rows']} rows, one thread, {report['clock']} clock, "
        f"median of {report['repeats']} interleaved passes",
        f"{'rows/s vs ' + PLAIN_OPTIMUM:<{width}}  " + "  ".join(f"{'batch ' + size:>9}" for size in sizes),
    ]
    for name in names:
        ratios = "  ".join(f"{report['results'][size][name]['versus_optimum_plain']:>9.2f}" for size in sizes)
        lines.append(f"{name:<{width}}  {ratios}")
    lines.append(
        "Accuracy on these rows: "
        + ", ".join(f"{name} {value:.4f}" for name, value in report["accuracy"].items())
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
