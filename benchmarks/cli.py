"""`pcee-bench`: wall-clock against layer savings, every contender side by side in one run."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from tqdm.auto import tqdm

from pcee.calibration.cli import data_options, open_labelled_data
from pcee.calibration.collect import record_all_exits
from pcee.calibration.simulate import simulate
from pcee.runtime import EarlyExitRuntime, Manifest, OperatingPoint, PceeError, build_policy

from .bench import (
    BenchmarkError, Contender, SingleGraph, chunks_of, measure, runtime_contender,
    single_graph_contender, single_graph_for, summarize, torch_contender,
)


class BatchSizes(click.ParamType):
    """A comma-separated list of positive integers, e.g. 1,32."""

    name = "N[,N...]"

    def convert(self, value, param, context) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            sizes = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers, e.g. 1,32", param, context)
        if not sizes or min(sizes) < 1:
            self.fail(f"{value!r}: batch sizes must be positive integers, e.g. 1,32", param, context)
        return sizes


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100})
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@data_options
@click.option("--batch-sizes", type=BatchSizes(), default="1,32",
              help="Batch sizes to measure, comma-separated. Batch 1 gives p50/p99 latency per row; larger batches "
                   "show throughput, where rows that exit early leave the batch.")
@click.option("--repeats", default=3, type=click.IntRange(min=1),
              help="Interleaved passes over the rows per contender; the median pass is reported. More repeats "
                   "steady the figures on a busy machine.")
@click.option("--max-rows", type=click.IntRange(min=1),
              help="Use only the first N rows of --data: a quick look. Below a few hundred rows p99 is noisy.")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The pcee-train output the bundle was exported from. Adds the PyTorch eager contender (needs "
                   "torch). REQUIRED when the bundle has no single-graph model (exported without "
                   "--with-full-graph): that graph is then exported from here, once, into --cache-dir.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the single-graph model exported from --model-dir is kept for later runs, keyed by the "
                   "model's hash, outside the bundle. [default: $XDG_CACHE_HOME/pcee or ~/.cache/pcee]")
@click.option("--intra-op-threads", type=click.IntRange(min=1),
              help="Threads per onnxruntime session and for PyTorch, the same for every contender (default: each "
                   "library's own, one per core). On a shared or loaded machine pass 1: threads fighting for "
                   "busy cores slow PyTorch far more than onnxruntime and skew the comparison.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, figures under results[<batch size>], instead of tables.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars (they go to stderr).")
def main(bundle_dir: Path, **options) -> None:
    """Measure whether layer savings turn into wall-clock savings.

    \b
    Contenders, each run over the same rows, interleaved, in one process:
      single_graph_onnx         the whole network as one ONNX graph, same onnxruntime
                                settings (the reference)
      pytorch_eager             the PyTorch model, full depth (with --model-dir)
      runtime_all_layers        the per-layer chain, no early exit
      runtime_operating_point   the chain at the bundle's operating point
      runtime_pabee             PABEE at the patience closest in layer speed-up
    Figures per batch size: p50/p99 latency (batch 1), rows/s, layer speed-up,
    wall_speedup (1 - time / single graph), chain_overhead (all layers / single
    graph), efficiency (wall speed-up / layer speed-up).

    The single graph is the bundle's own (pcee-export --with-full-graph); otherwise
    --model-dir is required and the graph is exported from it once, into --cache-dir.

    \b
    Example (pcee-export runs/sst2 wrote the bundle runs/sst2-pcee):
      pcee-bench runs/sst2-pcee --data data/glue/SST-2 --model-dir runs/sst2 --json
    """
    try:
        report = run_benchmark(bundle_dir, options)
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(report, indent=2) if options["as_json"] else format_report(report))


def run_benchmark(bundle_dir: Path, options: dict) -> dict:
    """Bad input (data, labels, model dir, missing single graph) fails before the first timing."""
    manifest, dataset, _ = open_labelled_data(bundle_dir, options)
    single_graph, references = reference_contenders(bundle_dir, manifest, options)
    runtime = EarlyExitRuntime.from_bundle(bundle_dir, backend="onnxruntime-cpu", intra_op_threads=options["intra_op_threads"])
    batch = runtime.tokenizer.encode_texts(dataset.texts, dataset.text_pairs)
    if options["max_rows"]:
        batch = batch.select(np.arange(min(options["max_rows"], len(batch))))
    exits = record_all_exits(runtime, batch, progress=not options["no_progress"]).exits
    point = runtime.operating_point
    expected_speedup = simulate(build_policy(point, runtime.num_layers, manifest.model.learned_confidence), exits).layer_speedup
    pabee = closest_pabee(runtime, exits, expected_speedup)
    results = {}
    for batch_size in options["batch_sizes"]:
        contenders = references + [
            runtime_contender("runtime_all_layers", runtime, OperatingPoint("full"), batch_size),
            runtime_contender("runtime_operating_point", runtime, point, batch_size),
            runtime_contender("runtime_pabee", runtime, pabee, batch_size),
        ]
        results[str(batch_size)] = measure_batch_size(contenders, batch, batch_size, runtime.num_layers, options)
    return {
        "bundle": str(bundle_dir), "rows": len(batch), "repeats": options["repeats"], "backend": runtime.backend_name,
        "device": runtime.device, "intra_op_threads": options["intra_op_threads"],
        "single_graph": {"file": str(single_graph.path), "origin": single_graph.origin},
        "operating_point": point.to_dict(), "pabee_point": pabee.to_dict(), "results": results,
    }


def reference_contenders(bundle_dir: Path, manifest: Manifest, options: dict) -> tuple[SingleGraph, list[Contender]]:
    """The single graph, and PyTorch eager with --model-dir, both on --intra-op-threads."""
    model_dir, threads = options["model_dir"], options["intra_op_threads"]
    if model_dir is not None:
        require_torch(model_dir)
    single_graph = single_graph_for(bundle_dir, manifest, model_dir, options["cache_dir"])
    if single_graph.origin == "exported":
        click.echo(f"Exported the single-graph model of {model_dir} to {single_graph.path} (reused by later runs).", err=True)
    contenders = [single_graph_contender(single_graph.path, threads)]
    if model_dir is not None:
        contenders.append(torch_contender(model_dir, threads))
    return single_graph, contenders


def require_torch(model_dir: Path) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BenchmarkError(f"--model-dir {model_dir} needs PyTorch to run and export the model: pip install 'pcee[export]'") from None


def closest_pabee(runtime: EarlyExitRuntime, exits, target: float) -> OperatingPoint:
    """The PABEE patience whose simulated layer speed-up on these rows is closest to `target`."""
    layers = runtime.num_layers
    candidates = [OperatingPoint("pabee", patience=p) for p in range(1, layers)]
    speedups = [simulate(build_policy(p, layers), exits).layer_speedup for p in candidates]
    return candidates[int(np.argmin([abs(s - target) for s in speedups]))]


def measure_batch_size(contenders: list[Contender], batch, batch_size: int, num_layers: int, options: dict) -> dict:
    with tqdm(total=options["repeats"] * len(contenders), desc=f"batch size {batch_size}", disable=options["no_progress"]) as bar:
        timings = measure(contenders, chunks_of(batch, batch_size), options["repeats"], bar)
    return summarize(timings, contenders, len(batch), batch_size, num_layers)


def format_report(report: dict) -> str:
    threads = report["intra_op_threads"] or "default"
    lines = [
        f"{report['rows']} rows, {report['repeats']} repeats, {report['backend']} on {report['device']}, {threads} threads; "
        f"operating point {OperatingPoint.from_dict(report['operating_point']).describe()}, PABEE patience {report['pabee_point']['patience']}",
        f"single graph ({report['single_graph']['origin']}): {report['single_graph']['file']}",
    ]
    for batch_size, figures in report["results"].items():
        lines.append(f"\nbatch size {batch_size}: chain_overhead {figures.get('chain_overhead')}, "
                     f"throughput vs single graph {figures.get('throughput_vs_single_graph')}")
        lines.append(f"{'contender':<26}{'rows/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'layer sp':>10}{'wall sp':>9}{'effic.':>8}")
        for name, entry in figures.items():
            if isinstance(entry, dict):
                cells = [entry.get(key) for key in ("rows_per_second", "p50_ms", "p99_ms", "layer_speedup", "wall_speedup", "efficiency")]
                lines.append(f"{name:<26}" + "".join(f"{'' if c is None else c:>{w}}" for c, w in zip(cells, (10, 9, 9, 10, 9, 8))))
    return "\n".join(lines)
