"""`pcee-bench`: wall-clock against layer savings, every contender side by side in one run."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from tqdm.auto import tqdm

from pcee.calibration.cli import data_options, friendly_errors, open_labelled_data
from pcee.calibration.collect import record_all_exits
from pcee.calibration.errors import CalibrationError
from pcee.calibration.simulate import layer_speedup, simulate
from pcee.runtime.engine import EarlyExitRuntime
from pcee.runtime.policies import OperatingPoint, build_policy

from .bench import chunks_of, measure, runtime_contender, single_graph_contender, summarize, torch_contender

FULL_GRAPH_CACHE = Path(".pcee-cache") / "full_model.onnx"


def closest_pabee(runtime: EarlyExitRuntime, exits, target: float) -> OperatingPoint:
    """The PABEE patience whose simulated layer speed-up on these rows is closest to `target`."""
    layers = runtime.num_layers
    candidates = [OperatingPoint("pabee", patience=p) for p in range(1, layers)]
    speedups = [layer_speedup(simulate(build_policy(p, layers), exits).exit_layers, layers) for p in candidates]
    return candidates[int(np.argmin([abs(s - target) for s in speedups]))]


def full_graph_path(runtime: EarlyExitRuntime, model_dir: Path | None) -> Path:
    if runtime.manifest.full_graph is not None:
        return runtime.bundle_dir / runtime.manifest.full_graph.file
    cached = runtime.bundle_dir / FULL_GRAPH_CACHE
    if cached.is_file():
        return cached
    if model_dir is None:
        raise CalibrationError(
            "the bundle has no single-graph model to compare against; pass --model-dir (the pcee-train output) "
            "or re-export with pcee-export --with-full-graph"
        )
    from pcee.exporter.bundle import export_full_graph

    return export_full_graph(model_dir, cached)


def parse_batch_sizes(value: str) -> list[int]:
    try:
        sizes = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers", param_hint="--batch-sizes") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("batch sizes must be positive integers, e.g. 1,32", param_hint="--batch-sizes")
    return sizes


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100})
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@data_options
@click.option("--batch-sizes", default="1,32", help="Comma-separated batch sizes to measure.")
@click.option("--repeats", default=3, type=click.IntRange(min=1), help="Passes over the rows per contender (median reported).")
@click.option("--max-rows", type=click.IntRange(min=1), help="Use only the first N rows.")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), help="The pcee-train output: adds the PyTorch eager contender, and exports the single-graph model if the bundle lacks one.")
@click.option("--intra-op-threads", type=click.IntRange(min=1), help="onnxruntime threads per session (default: all cores), the same for every contender.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the figures under results[<batch size>].")
@click.option("--no-progress", is_flag=True)
def main(bundle_dir: Path, **options) -> None:
    """Measure whether layer savings turn into wall-clock savings.

    \b
    Contenders, each run over the same rows, interleaved, in one process:
      pytorch_eager             the PyTorch model, full depth (with --model-dir)
      single_graph_onnx         the whole network as one ONNX graph, same onnxruntime settings
      runtime_all_layers        the per-layer chain, no early exit
      runtime_operating_point   the chain at the bundle's operating point
      runtime_pabee             PABEE at the patience closest in layer speed-up
    Figures per batch size: p50/p99 latency (batch 1), rows/s, layer speed-up,
    wall_speedup (1 - time / single graph), chain_overhead (all layers / single
    graph), efficiency (wall speed-up / layer speed-up).

    \b
    Example:
      pcee-bench runs/sst2-pcee --data glue/SST-2 --model-dir runs/sst2 --json
    """
    with friendly_errors():
        report = run_benchmark(bundle_dir, options)
    click.echo(json.dumps(report, indent=2) if options["as_json"] else format_report(report))


def run_benchmark(bundle_dir: Path, options: dict) -> dict:
    batch_sizes = parse_batch_sizes(options["batch_sizes"])
    _, dataset, _ = open_labelled_data(bundle_dir, options)
    runtime = EarlyExitRuntime.from_bundle(bundle_dir, backend="onnxruntime-cpu", intra_op_threads=options["intra_op_threads"])
    batch = runtime.tokenizer.encode_texts(dataset.texts, dataset.text_pairs)
    if options["max_rows"]:
        batch = batch.select(np.arange(min(options["max_rows"], len(batch))))
    exits = record_all_exits(runtime, batch, progress=not options["no_progress"]).exits
    point = runtime.operating_point
    expected_speedup = layer_speedup(simulate(build_policy(point, runtime.num_layers, runtime.manifest.model.learned_confidence), exits).exit_layers, runtime.num_layers)
    pabee = closest_pabee(runtime, exits, expected_speedup)
    results = {}
    for batch_size in batch_sizes:
        contenders = [single_graph_contender(full_graph_path(runtime, options["model_dir"]), options["intra_op_threads"])]
        if options["model_dir"] is not None:
            contenders += [c for c in [torch_contender(options["model_dir"])] if c is not None]
        contenders += [
            runtime_contender("runtime_all_layers", runtime, OperatingPoint("full"), batch_size),
            runtime_contender("runtime_operating_point", runtime, point, batch_size),
            runtime_contender("runtime_pabee", runtime, pabee, batch_size),
        ]
        chunks = chunks_of(batch, batch_size)
        with tqdm(total=options["repeats"] * len(contenders), desc=f"batch size {batch_size}", disable=options["no_progress"]) as bar:
            timings = measure(contenders, chunks, options["repeats"], bar)
        results[str(batch_size)] = summarize(timings, contenders, len(batch), batch_size, runtime.num_layers)
    return {
        "bundle": str(bundle_dir), "rows": len(batch), "repeats": options["repeats"], "backend": runtime.backend_name,
        "device": runtime.device, "operating_point": point.to_dict(), "pabee_point": pabee.to_dict(), "results": results,
    }


def format_report(report: dict) -> str:
    lines = [f"{report['rows']} rows, {report['repeats']} repeats, {report['backend']} on {report['device']}; "
             f"operating point {OperatingPoint.from_dict(report['operating_point']).describe()}, PABEE patience {report['pabee_point']['patience']}"]
    for batch_size, figures in report["results"].items():
        lines.append(f"\nbatch size {batch_size}: chain_overhead {figures.get('chain_overhead')}, "
                     f"throughput vs single graph {figures.get('throughput_vs_single_graph')}")
        lines.append(f"{'contender':<26}{'rows/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'layer sp':>10}{'wall sp':>9}{'effic.':>8}")
        for name, entry in figures.items():
            if isinstance(entry, dict):
                cells = [entry.get(key) for key in ("rows_per_second", "p50_ms", "p99_ms", "layer_speedup", "wall_speedup", "efficiency")]
                lines.append(f"{name:<26}" + "".join(f"{'' if c is None else c:>{w}}" for c, w in zip(cells, (10, 9, 9, 10, 9, 8))))
    return "\n".join(lines)
