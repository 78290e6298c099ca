"""`pcee-bench`: wall-clock against layer savings, every contender side by side in one run."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from tqdm.auto import tqdm

from pcee.calibration.cli import data_options, labelled_data, open_labelled_data
from pcee.calibration.collect import record_all_exits
from pcee.calibration.simulate import simulate
from pcee.runtime import (
    FULL_POLICY,
    PABEE_POLICY,
    EarlyExitRuntime,
    Manifest,
    OperatingPoint,
    PceeError,
    build_policy,
)

from .bench import (
    ALL_LAYERS,
    OPERATING_POINT,
    SAVED_POINT,
    BenchmarkError,
    Contender,
    SingleGraph,
    cached_single_graph,
    chunks_of,
    default_cache_dir,
    measure,
    runtime_contender,
    single_graph_contender,
    single_graph_for,
    single_graph_variants,
    summarize,
    torch_contender,
)
from .figure import MATPLOTLIB_MISSING, write_throughput_plot
from .machine import cpu_description, describe_cpu
from .truncation import add_limit_ratios, plan_limits, truncation_contenders

QUANTIZATIONS = ("int8",)


class PointNames(click.ParamType):
    """A comma-separated list of saved operating point names, e.g. speedup-0.5,speedup-0.75."""

    name = "NAME[,NAME...]"

    def convert(self, value, param, context) -> list[str]:
        if isinstance(value, list):
            return value
        names = [part.strip() for part in value.split(",") if part.strip()]
        if not names:
            self.fail(
                f"{value!r} names no operating point; give saved names, e.g. speedup-0.5,speedup-0.75",
                param,
                context,
            )
        return names


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


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}
)
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@data_options
@click.option(
    "--batch-sizes",
    type=BatchSizes(),
    default="1,32",
    help="Batch sizes to measure, comma-separated. Batch 1 gives p50/p99 latency per row; larger batches "
    "show throughput, where rows that exit early leave the batch.",
)
@click.option(
    "--points",
    type=PointNames(),
    help="Saved operating points (pcee-calibrate --name) to measure every chain at, comma-separated, each "
    "read from that bundle's own manifest. Default: each bundle's default point.",
)
@click.option(
    "--repeats",
    default=3,
    type=click.IntRange(min=1),
    help="Interleaved passes over the rows per contender; the median pass is reported. More repeats "
    "steady the figures on a busy machine.",
)
@click.option(
    "--max-rows",
    type=click.IntRange(min=1),
    help="Use only the first N rows of --data: a quick look. Below a few hundred rows p99 is noisy.",
)
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The pcee-train output the bundle was exported from. Adds the PyTorch eager contender (needs "
    "torch). REQUIRED when the bundle has no single-graph model (exported without "
    "--with-full-graph): that graph is then exported from here, once, into --cache-dir.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the single-graph model exported from --model-dir is kept for later runs, keyed by the "
    "model's hash, outside the bundle. [default: $XDG_CACHE_HOME/pcee or ~/.cache/pcee]",
)
@click.option(
    "--intra-op-threads",
    type=click.IntRange(min=1),
    help="Threads per onnxruntime session and for PyTorch, the same for every contender (default: each "
    "library's own, one per core). On a shared or loaded machine pass 1: threads fighting for "
    "busy cores slow PyTorch far more than onnxruntime and skew the comparison.",
)
@click.option(
    "--clock",
    type=click.Choice(["wall", "cpu"]),
    default="wall",
    help="wall: elapsed time. cpu: the measuring thread's CPU time, which leaves out waits for a core on a "
    "machine other jobs load; needs --intra-op-threads 1 (every library then computes in that thread).",
)
@click.option(
    "--also-bundle",
    "also_bundles",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Another bundle of the same model measured in the same run, e.g. one written with pcee-export "
    "--quantize int8 or --no-fuse (repeatable). Its chain contenders are named @BUNDLE_NAME and compared "
    "with the fastest single graph of its own precision, at its own operating point.",
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZATIONS),
    help="Also measure the optimized single graphs dynamically quantized (onnxruntime quantize_dynamic, int8 "
    "weights, per channel): the reference for int8 bundles.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a PNG bar chart of every contender's rows/s (as a multiple of the plain single graph's), "
    "one panel per batch size (needs matplotlib).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object, figures under results[<batch size>], instead of tables.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bars (they go to stderr).")
def main(bundle_dir: Path, **options) -> None:
    """Measure whether layer savings turn into wall-clock savings.

    \b
    Contenders, each run over the same rows, interleaved, in one process:
      single_graph_onnx         the whole network as one ONNX graph as exported (plain)
      single_graph_optimized    the same after onnxruntime's transformer optimizer
                                (model type bert: what Optimum's O2 ships)
      single_graph_fused        exported with pcee's fused attention, then optimized
                                (with --model-dir)
      single_graph_*_int8       the optimized ones dynamically quantized (--quantize int8)
      pytorch_eager             the PyTorch model, full depth (with --model-dir)
      runtime_all_layers        the per-layer chain, no early exit
      runtime_operating_point   the chain at the bundle's default operating point
      runtime_point_NAME        the chain at saved point NAME (--points)
      runtime_pabee             PABEE at the patience closest in layer speed-up
                                to the first point's
      ...@NAME                  the chain of each --also-bundle
      truncated_N_layers[_int8] the model cut to N = round(L x (1 - S)) layers for
                                a point's layer speed-up S, exported as the bundle
                                was (with --model-dir): the limit of that saving
    A batch of one row runs through the bundle's compiled single-row graph
    (one onnxruntime call, exits decided inside it), as the runtime serves it.
    Every onnxruntime session has the same settings.

    \b
    Figures per batch size: p50/p99 latency (batch 1), rows/s, versus_plain (rows/s
    as a multiple of single_graph_onnx's), layer speed-up, wall_speedup (1 - time /
    reference), efficiency (wall speed-up / layer speed-up), and per chain
    chain_overhead (all layers / reference) and throughput_vs_single_graph; per point
    limit_ratio (its rows/s / its truncation's: 1.0 is the limit). The
    reference of a contender is the FASTEST single graph of its precision measured in
    this run (fp32, or int8 with --quantize int8). The header and JSON name the CPU
    and its flags that matter (avx2, avx512f, avx512_vnni, amx): int8 figures depend
    on them.

    The plain single graph is the bundle's own (pcee-export --with-full-graph);
    otherwise --model-dir is required and the graph is exported from it once, into
    --cache-dir.

    \b
    Example (pcee-export runs/sst2 wrote runs/sst2-pcee; --quantize int8 -o runs/sst2-int8;
    both calibrated with --name speedup-0.5 and --name speedup-0.75):
      pcee-bench runs/sst2-pcee --data data/glue/SST-2 --model-dir runs/sst2 \\
          --also-bundle runs/sst2-int8 --quantize int8 \\
          --points speedup-0.5,speedup-0.75 --json
    """
    try:
        if options["clock"] == "cpu" and options["intra_op_threads"] != 1:
            raise BenchmarkError(
                "--clock cpu counts one thread's CPU time: pass --intra-op-threads 1 with it"
            )
        check_plot_path(options["plot"])
        report = run_benchmark(bundle_dir, options)
        if options["plot"]:
            write_throughput_plot(report, options["plot"])
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(report, indent=2) if options["as_json"] else format_report(report))


@dataclass
class Chain:
    """One bundle's per-layer chain and the points to measure it at; `suffix` tells its contenders apart ("" for the first)."""

    runtime: EarlyExitRuntime
    suffix: str
    points: list[tuple[str, OperatingPoint]]  # (contender name, point), all layers excluded
    pabee: OperatingPoint | None = None  # the first bundle also runs PABEE at a matched layer speed-up

    def contenders(self, batch_size: int) -> list[Contender]:
        points = [(ALL_LAYERS, OperatingPoint(FULL_POLICY)), *self.points]
        if self.pabee is not None:
            points.append(("runtime_pabee", self.pabee))
        return [
            runtime_contender(name + self.suffix, self.runtime, point, batch_size) for name, point in points
        ]

    def describe(self) -> dict:
        manifest = self.runtime.manifest
        return {
            "bundle": str(self.runtime.bundle_dir),
            "precision": manifest.model.precision,
            "fused_operators": manifest.layers[0].fused_operators,
            "operating_points": {name + self.suffix: point.to_dict() for name, point in self.points},
        }


def check_plot_path(path: Path | None) -> None:
    """Before minutes of timing: the chart must have somewhere to go, and matplotlib to draw it."""
    if path is None:
        return
    if path.suffix.lower() != ".png" or not path.parent.is_dir():
        raise BenchmarkError(f"--plot {path}: give a .png file in an existing directory")
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchmarkError(MATPLOTLIB_MISSING)


def run_benchmark(bundle_dir: Path, options: dict) -> dict:
    """Bad input (data, labels, model dir, missing single graph, another model's bundle) fails before the first timing."""
    manifest, dataset, _ = open_labelled_data(bundle_dir, labelled_data({**options}))
    check_same_model(manifest, options["also_bundles"])
    with tempfile.TemporaryDirectory(
        prefix="pcee-bench-"
    ) as workdir:  # sessions keep what they load; the files may go
        single_graph, references = reference_contenders(bundle_dir, manifest, options, Path(workdir))
    chains = [open_chain(bundle_dir, "", options)] + [
        open_chain(other, f"@{other.name}", options) for other in options["also_bundles"]
    ]
    first_point = chains[0].points[0][1]
    first = chains[0].runtime
    batch = first.tokenizer.encode_texts(dataset.texts, dataset.text_pairs)
    if options["max_rows"]:
        batch = batch.select(np.arange(min(options["max_rows"], len(batch))))
    exits = record_all_exits(first, batch, progress=not options["no_progress"]).exits
    expected_speedup = simulate(
        build_policy(first_point, first.num_layers, manifest.model.learned_confidence), exits
    ).layer_speedup
    chains[0].pabee = closest_pabee(first, exits, expected_speedup)
    limits = plan_limits(chains, exits, manifest.model.learned_confidence, options["quantize"])
    if options["model_dir"] is not None:
        references += truncation_contenders(
            options["model_dir"],
            options["cache_dir"] or default_cache_dir(),
            bool(manifest.layers[0].fused_operators),
            limits,
            options["intra_op_threads"],
        )
    results = {}
    for batch_size in options["batch_sizes"]:
        contenders = references + [
            contender for chain in chains for contender in chain.contenders(batch_size)
        ]
        results[str(batch_size)] = measure_batch_size(
            contenders, batch, batch_size, first.num_layers, options
        )
        add_limit_ratios(results[str(batch_size)], limits)
    return {
        "bundle": str(bundle_dir),
        "cpu": cpu_description(),
        "rows": len(batch),
        "repeats": options["repeats"],
        "backend": first.backend_name,
        "device": first.device,
        "intra_op_threads": options["intra_op_threads"],
        "clock": options["clock"],
        "single_graph": {"file": str(single_graph.path), "origin": single_graph.origin},
        "pabee_point": chains[0].pabee.to_dict(),
        "chains": {chain.suffix or "first": chain.describe() for chain in chains},
        "results": results,
    }


def check_same_model(manifest: Manifest, others: tuple[Path, ...]) -> None:
    """Every chain of one run reads the same tokens: the bundles must share the tokenizer and the labels."""
    for other in others:
        theirs = Manifest.load(other, verify_hashes=False)
        if (
            theirs.tokenizer.files[0].sha256 != manifest.tokenizer.files[0].sha256
            or theirs.model.labels != manifest.model.labels
        ):
            raise BenchmarkError(
                f"--also-bundle {other} holds another model (tokenizer or labels differ); compare bundles exported from one model"
            )
        if other.name in {path.name for path in others if path != other}:
            raise BenchmarkError(
                f"two --also-bundle directories are named {other.name}; their contenders would share a name"
            )


def open_chain(bundle_dir: Path, suffix: str, options: dict) -> Chain:
    runtime = EarlyExitRuntime.from_bundle(
        bundle_dir, backend="onnxruntime-cpu", intra_op_threads=options["intra_op_threads"]
    )
    if not options["points"]:
        return Chain(runtime, suffix, [(OPERATING_POINT, runtime.operating_point)])
    missing = [name for name in options["points"] if runtime.manifest.saved_point(name) is None]
    if missing:
        saved = [point.name for point in runtime.manifest.operating_points]
        runtime.close()
        raise BenchmarkError(
            f"{bundle_dir} has no saved operating point {', '.join(missing)} (saved: {saved}); calibrate it with pcee-calibrate --name"
        )
    return Chain(
        runtime,
        suffix,
        [(SAVED_POINT + name, runtime.manifest.saved_point(name)) for name in options["points"]],
    )


def reference_contenders(
    bundle_dir: Path, manifest: Manifest, options: dict, workdir: Path
) -> tuple[SingleGraph, list[Contender]]:
    """Every single graph (plain, optimized, fused, quantized), and PyTorch eager with --model-dir, on --intra-op-threads."""
    model_dir, threads = options["model_dir"], options["intra_op_threads"]
    if model_dir is not None:
        require_torch(model_dir)
    single_graph = single_graph_for(bundle_dir, manifest, model_dir, options["cache_dir"])
    if single_graph.origin == "exported":
        click.echo(
            f"Exported the single-graph model of {model_dir} to {single_graph.path} (reused by later runs).",
            err=True,
        )
    fused = (
        None
        if model_dir is None
        else cached_single_graph(model_dir, options["cache_dir"] or default_cache_dir(), fuse=True)
    )
    variants = single_graph_variants(single_graph, fused, options["quantize"], workdir)
    contenders = [
        single_graph_contender(variant.path, threads, variant.name, variant.precision) for variant in variants
    ]
    if model_dir is not None:
        contenders.append(torch_contender(model_dir, threads))
    return single_graph, contenders


def require_torch(model_dir: Path) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BenchmarkError(
            f"--model-dir {model_dir} needs PyTorch to run and export the model: pip install 'pcee[export]'"
        ) from None


def closest_pabee(runtime: EarlyExitRuntime, exits, target: float) -> OperatingPoint:
    """The PABEE patience whose simulated layer speed-up on these rows is closest to `target`."""
    layers = runtime.num_layers
    candidates = [OperatingPoint(PABEE_POLICY, patience=p) for p in range(1, layers)]
    speedups = [simulate(build_policy(p, layers), exits).layer_speedup for p in candidates]
    return candidates[int(np.argmin([abs(s - target) for s in speedups]))]


def measure_batch_size(
    contenders: list[Contender],
    batch,
    batch_size: int,
    num_layers: int,
    options: dict,
    reference: str | None = None,
) -> dict:
    with tqdm(
        total=options["repeats"] * len(contenders),
        desc=f"batch size {batch_size}",
        unit="pass",  # one contender over every row
        disable=options["no_progress"],
    ) as bar:
        timings = measure(contenders, chunks_of(batch, batch_size), options["repeats"], bar, options["clock"])
    return summarize(timings, contenders, len(batch), batch_size, num_layers, reference)


def format_report(report: dict) -> str:
    threads = report["intra_op_threads"] or "default"
    lines = [
        f"CPU: {describe_cpu(report['cpu'])}",
        f"{report['rows']} rows, {report['repeats']} repeats, {report['backend']} on {report['device']}, {threads} threads, {report['clock']} clock; "
        f"PABEE patience {report['pabee_point']['patience']}",
        *(
            f"{name}: {OperatingPoint.from_dict(point).describe()}"
            for chain in report["chains"].values()
            for name, point in chain["operating_points"].items()
        ),
        f"single graph ({report['single_graph']['origin']}): {report['single_graph']['file']}",
    ]
    columns = (
        ("rows_per_second", "rows/s", 10),
        ("versus_plain", "x plain", 9),
        ("p50_ms", "p50 ms", 9),
        ("p99_ms", "p99 ms", 9),
        ("layer_speedup", "layers saved", 14),  # fractions, as the --json fields; "x plain" is the multiple
        ("wall_speedup", "time saved", 12),
        ("efficiency", "effic.", 8),
        ("limit_ratio", "x limit", 9),
        ("reference", "  reference", 0),
    )
    for batch_size, figures in report["results"].items():
        chains = ", ".join(
            f"{name} {value}" for name, value in figures.items() if not isinstance(value, dict)
        )
        lines.append(f"\nbatch size {batch_size}: {chains}")
        lines.append(f"{'contender':<36}" + "".join(f"{title:>{width}}" for _, title, width in columns))
        for name, entry in figures.items():
            if isinstance(entry, dict):
                cells = [entry.get(key) for key, _, _ in columns]
                lines.append(
                    f"{name:<36}"
                    + "".join(f"{'' if c is None else c:>{w}}" for c, (_, _, w) in zip(cells, columns[:-1]))
                    + f"  {cells[-1]}"
                )
    return "\n".join(lines)
