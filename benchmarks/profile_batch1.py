"""Where batch-1 time goes: the early-exit chain taken apart step by step, next to the single graph.

python -m pcee.benchmarks.profile_batch1 BUNDLE_DIR --data data/glue/SST-2/dev.tsv
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

from pcee.runtime import (
    ATTENTION_BIAS,
    FULL_POLICY,
    HIDDEN_STATES,
    NEXT_HIDDEN_STATES,
    EarlyExitRuntime,
    EncodedBatch,
    GraphChain,
    OperatingPoint,
    PceeError,
    PolicyError,
    SingleGraphSession,
    compose_single_row_model,
    compose_truncated_model,
    layer_speedup,
    open_cpu_session,
)

from .bench import CLOCKS, BenchmarkError, quantized_copy, single_graph_contender
from .truncation import truncated_layers

Step = Callable[[EncodedBatch], object]
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


def bundle_and_sentences(command):
    """The BUNDLE_DIR argument and --data option of the tools that feed a bundle one sentence per call."""
    command = click.option(
        "--data",
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A TSV file with a header line whose first column holds the sentences, e.g. data/glue/SST-2/dev.tsv.",
    )(command)
    return click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))(
        command
    )


@click.command(context_settings=CONTEXT)
@bundle_and_sentences
@click.option("--rows", default=300, type=click.IntRange(min=1), help="How many sentences, one per call.")
@click.option(
    "--repeats",
    default=7,
    type=click.IntRange(min=1),
    help="Interleaved passes; the median pass is reported.",
)
@click.option(
    "--point",
    help="The saved operating point to profile (its name). Default: the bundle's default point.",
)
@click.option(
    "--single-graph",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The reference graph. Default: the bundle's own (pcee-export --with-full-graph), else the bundle's "
    "graphs composed into one. pcee-bench keeps the ones it exports under its --cache-dir, in "
    "single-graph/HASH[-fused]/full_model.onnx.",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    help="Quantize the --single-graph reference first, as pcee-bench --quantize does (the reference for an "
    "int8 bundle).",
)
@click.option(
    "--truncated",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A truncated single graph to time as well (quantized too with --quantize), e.g. the one pcee-bench "
    "--model-dir keeps in single-graph/HASH-fused-3layers/full_model.onnx under its --cache-dir.",
)
@click.option(
    "--intra-op-threads", default=1, type=click.IntRange(min=1), help="Threads per onnxruntime session."
)
@click.option(
    "--clock",
    type=click.Choice(sorted(CLOCKS)),
    default="wall",
    help="wall: elapsed time. cpu: this thread's CPU time (with --intra-op-threads 1), which leaves out time "
    "spent waiting for a core on a machine other jobs load.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def main(
    bundle_dir: Path,
    data: Path,
    rows: int,
    repeats: int,
    point: str | None,
    single_graph: Path | None,
    quantize: str | None,
    truncated: Path | None,
    intra_op_threads: int,
    clock: str,
    as_json: bool,
) -> None:
    """Take the batch-1 cost of the early-exit chain apart, next to the single graph and the truncated model.

    \b
    Each step adds one thing to the one before, over the same rows, one row per
    call, every step interleaved; ms per row, median pass:
      single_graph              the whole network as one graph (the reference)
      sessions_no_exit_heads    the chain's onnxruntime sessions called directly,
                                each layer graph cut down to its next hidden state
      sessions                  the same with the exit heads: what the graphs cost
      backend                   the runtime's backend over the same graphs
      runtime_all_layers        EarlyExitRuntime.predict_encoded at the full point,
                                through the chain of sessions
      runtime_operating_point   the same at the operating point
      compiled_all_layers       predict_encoded at the full point as it serves one
                                row: one call of the bundle's graphs composed at
                                full depth (a fixed exit layer needs no decisions)
      compiled_operating_point  the same at the operating point: one call of the
                                graph that decides each exit inside it
      truncated                 with --truncated: the model cut to fewer layers
      sessions_onnxruntime_defaults
                                `sessions` on onnxruntime's own settings, not the
                                runtime's (per-session arenas, every fusion)

    \b
    Then the operating point against its limit, k = round(L x (1 - S)) layers for
    the point's layer speed-up S on these rows (the truncation pcee-bench uses);
    each step adds one thing to the one before (all but the last call onnxruntime
    directly, as the truncation's user would):
      truncated_bundle_graphs   the bundle's own graphs cut to k layers, composed
                                into one plain graph (no control flow)
      row_depths_ideal          each row through the graph cut at the layer the
                                point exits it at, the rows of each depth
                                together: the point's exit layers and nothing
                                else (warm weights, no exit heads but the last)
      row_depths_exit_work      the same with the point's own work: every exit
                                head and decision up to the row's exit layer,
                                unrolled into one plain graph per depth
      compiled_graph_by_depth   the point's compiled graph, the rows of each depth
                                together: its control flow (an `If` per layer run)
      compiled_graph_call       the same, rows of every depth in turn, as served:
                                each layer's weights go through the caches as
                                the rows' depths change
      compiled_operating_point  predict_encoded at the point: the runtime's Python
                                around that call (the served path)
    limit_ratio: the truncation's ms per row over the step's.

    \b
    Example (an int8 bundle at its saved point speedup-0.5):
      python -m pcee.benchmarks.profile_batch1 runs/sst2-pcee-int8 \\
          --data data/glue/SST-2/dev.tsv --point speedup-0.5 --clock cpu
    """
    try:
        report = profile(
            bundle_dir, data, rows, repeats, single_graph, quantize, intra_op_threads, truncated, clock, point
        )
    except PceeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


def profile(
    bundle_dir: Path,
    data: Path,
    rows: int,
    repeats: int,
    single_graph: Path | None,
    quantize: str | None,
    threads: int,
    truncated: Path | None = None,
    clock: str = "wall",
    point: str | None = None,
) -> dict:
    runtime = EarlyExitRuntime.from_bundle(
        bundle_dir, backend="onnxruntime-cpu", operating_point=point, intra_op_threads=threads
    )
    singles = one_row_batches(runtime, data, rows)
    chain = runtime.manifest.graph_chain(bundle_dir)
    depths = [runtime.predict_encoded(row).predictions[0].exit_layer for row in singles]
    limit_layers = truncated_layers(
        runtime.num_layers, layer_speedup(sum(depths), len(depths), runtime.num_layers)
    )
    with tempfile.TemporaryDirectory(prefix="pcee-profile-") as workdir:  # sessions keep what they load
        workdir = Path(workdir)
        reference = reference_graph(bundle_dir, runtime, chain, single_graph, quantize, workdir)
        steps = {"single_graph": single_graph_contender(reference, threads).run}
        steps.update(chain_steps(runtime, chain, threads, workdir))
        if truncated is not None:
            cut = quantized_copy(truncated, workdir / "truncated.int8.onnx") if quantize else truncated
            steps["truncated"] = single_graph_contender(cut, threads).run
        steps.update(limit_steps(runtime, chain, limit_layers, singles, depths, threads, workdir))
    by_depth = sorted(range(len(singles)), key=lambda index: depths[index])
    orders = {
        name: by_depth for name in ("row_depths_ideal", "row_depths_exit_work", "compiled_graph_by_depth")
    }
    milliseconds = time_steps(steps, singles, repeats, clock, orders)
    base, limit = milliseconds["single_graph"], milliseconds["truncated_bundle_graphs"]
    return {
        "bundle": str(bundle_dir),
        "single_graph": str(single_graph or reference.name),
        "rows": len(singles),
        "repeats": repeats,
        "intra_op_threads": threads,
        "clock": clock,
        "operating_point": runtime.operating_point.to_dict(),
        "ms_per_row": {name: round(value, 4) for name, value in milliseconds.items()},
        "versus_single_graph": {name: round(value / base, 4) for name, value in milliseconds.items()},
        "exit_layers": np.bincount(depths, minlength=runtime.num_layers + 1)[1:].tolist(),
        "mean_exit_layer": round(float(np.mean(depths)), 4),
        "token_weighted_exit_layer": token_weighted_mean(depths, singles),
        "limit_layers": limit_layers,
        "limit_ratio": {name: round(limit / milliseconds[name], 4) for name in LIMIT_STEPS if name in steps},
    }


def reference_graph(
    bundle_dir: Path,
    runtime: EarlyExitRuntime,
    chain: GraphChain,
    given: Path | None,
    quantize: str | None,
    workdir: Path,
) -> Path:
    """The single graph to compare with: the one given or the bundle's own (quantized with --quantize), else
    the bundle's graphs composed into one, at the bundle's own precision."""
    full_graph = runtime.manifest.full_graph
    reference = given or (None if full_graph is None else bundle_dir / full_graph.file)
    if reference is not None:
        return quantized_copy(reference, workdir / "single_graph.int8.onnx") if quantize else reference
    if quantize:
        raise BenchmarkError(
            f"{bundle_dir} holds no single graph for --quantize to quantize: pass --single-graph PATH (pcee-bench "
            "--model-dir keeps one under its --cache-dir, in single-graph/HASH[-fused]/full_model.onnx), or drop "
            "--quantize to compare with the bundle's own graphs composed into one, at the bundle's precision"
        )
    return truncation_file(chain, runtime.num_layers, workdir / "bundle_graphs_composed.onnx")


def truncation_file(chain: GraphChain, layers: int, path: Path) -> Path:
    """The chain cut after `layers` layers, composed into one graph, written to `path`."""
    path.write_bytes(compose_truncated_model(chain, layers))
    return path


def chain_steps(runtime: EarlyExitRuntime, chain: GraphChain, threads: int, workdir: Path) -> dict[str, Step]:
    embeddings = open_cpu_session(chain.embeddings.path, threads)
    headless = [open_cpu_session(path, threads) for path in layers_without_exit_heads(chain, workdir)]
    return {
        "sessions_no_exit_heads": chain_step(embeddings, headless, chain),
        "sessions": chain_step(embeddings, [open_cpu_session(g.path, threads) for g in chain.layers], chain),
        "backend": backend_step(runtime.backend),  # the very sessions the runtime steps below call
        "runtime_all_layers": through_chain(runtime, OperatingPoint(FULL_POLICY)),
        "runtime_operating_point": through_chain(runtime, runtime.operating_point),
        "compiled_all_layers": lambda row: runtime.predict_encoded(row, OperatingPoint(FULL_POLICY)),
        "compiled_operating_point": lambda row: runtime.predict_encoded(row),
        "sessions_onnxruntime_defaults": chain_step(
            plain_session(chain.embeddings.path, threads),
            [plain_session(g.path, threads) for g in chain.layers],
            chain,
        ),
    }


LIMIT_STEPS = [
    "truncated_bundle_graphs",
    "row_depths_ideal",
    "row_depths_exit_work",
    "compiled_graph_by_depth",
    "compiled_graph_call",
    "compiled_operating_point",
]


def limit_steps(
    runtime: EarlyExitRuntime,
    chain: GraphChain,
    limit_layers: int,
    rows: list[EncodedBatch],
    depths: list[int],
    threads: int,
    workdir: Path,
) -> dict[str, Step]:
    """The truncation to `limit_layers`, then the point's rows (each exiting at its `depths` entry) with one cost
    added at a time; a point with no single-row graph gets the truncations only."""
    depth_of = {id(row): depth for row, depth in zip(rows, depths)}
    truncated = {
        layers: SingleGraphSession(
            truncation_file(chain, layers, workdir / f"truncated_{layers}.onnx"), threads
        )
        for layers in {limit_layers, *depths}
    }
    steps = {
        "truncated_bundle_graphs": truncated[limit_layers].logits,
        "row_depths_ideal": lambda row: truncated[depth_of[id(row)]].logits(row),
    }
    policy = runtime.make_policy(runtime.operating_point)
    try:
        compiled = graph_call(*compose_single_row_model(chain, policy), workdir / "compiled.onnx", threads)
    except PolicyError:  # its single rows run through the chain
        return steps
    unrolled = {
        layers: graph_call(
            *compose_single_row_model(chain, policy, unrolled_layers=layers),
            workdir / f"unrolled_{layers}.onnx",
            threads,
        )
        for layers in set(depths)
    }
    steps["row_depths_exit_work"] = lambda row: unrolled[depth_of[id(row)]](row)
    steps["compiled_graph_by_depth"] = steps["compiled_graph_call"] = compiled
    return steps


def token_weighted_mean(depths: list[int], rows: list[EncodedBatch]) -> float:
    """The rows' mean exit layer weighted by their token counts: a layer's work grows with a row's length."""
    tokens = [int(row.attention_mask.sum()) for row in rows]
    return round(float(np.average(depths, weights=tokens)), 4)


def graph_call(model: bytes, thresholds: dict[str, np.ndarray], path: Path, threads: int) -> Step:
    """One onnxruntime call of a composed graph per row, with its threshold feeds."""
    path.write_bytes(model)
    session = open_cpu_session(path, threads)
    names = [graph_input.name for graph_input in session.get_inputs() if graph_input.name not in thresholds]
    return lambda row: session.run(None, {name: getattr(row, name) for name in names} | thresholds)


def one_row_batches(runtime: EarlyExitRuntime, data: Path, rows: int) -> list[EncodedBatch]:
    batch = encoded_sentences(runtime, data, rows)
    return [batch.select(np.array([index])) for index in range(len(batch))]


def encoded_sentences(runtime: EarlyExitRuntime, data: Path, rows: int) -> EncodedBatch:
    """The first `rows` sentences of a TSV file (first column, below its header line), encoded."""
    lines = data.read_text(encoding="utf-8").splitlines()[1 : rows + 1]
    texts = [line.split("\t")[0] for line in lines if line.strip()]
    if not texts:
        raise BenchmarkError(f"{data} holds no sentences below its header line")
    return runtime.tokenizer.encode_texts(texts)


def layers_without_exit_heads(chain: GraphChain, workdir: Path) -> list[Path]:
    """Each layer graph cut down to what its next hidden state needs."""
    import onnx.utils

    paths = []
    for layer in chain.layers:
        path = workdir / layer.path.name
        onnx.utils.extract_model(str(layer.path), str(path), layer.spec.input_names, [NEXT_HIDDEN_STATES])
        paths.append(path)
    return paths


def plain_session(path: Path, threads: int):
    """A session on onnxruntime's own settings (its own memory arena, every fusion), spinning off as the runtime's.

    Left spinning, a chain of sessions measured ~2x slower still; that is not the comparison made here.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def chain_step(embeddings, layers: list, chain: GraphChain) -> Step:
    names = chain.embeddings.spec.input_names

    def run(row: EncodedBatch) -> None:
        hidden, bias = embeddings.run(None, {name: getattr(row, name) for name in names})
        for session in layers:
            hidden = session.run(None, {HIDDEN_STATES: hidden, ATTENTION_BIAS: bias})[0]

    return run


def through_chain(runtime: EarlyExitRuntime, point: OperatingPoint) -> Step:
    """predict_encoded with the chain's sessions, not the compiled single-row graph."""

    def run(row: EncodedBatch) -> None:
        runtime.backend.use_single_row_graph = False
        try:
            runtime.predict_encoded(row, point)
        finally:
            runtime.backend.use_single_row_graph = True

    return run


def backend_step(backend) -> Step:
    def run(row: EncodedBatch) -> None:
        state = backend.begin(row)
        try:
            backend.run_layers(state, 0, backend.num_layers)
        finally:
            backend.finish(state)

    return run


def time_steps(
    steps: dict[str, Step],
    rows: list[EncodedBatch],
    repeats: int,
    clock: str = "wall",
    orders: dict[str, list[int]] | None = None,
) -> dict[str, float]:
    """Median ms per row of each step; repeat r runs every step before repeat r+1, so drift hits all alike.

    clock "cpu" counts the calling thread's CPU time only (onnxruntime on one intra-op thread runs
    in it): on a machine other jobs load, time spent waiting for a core is left out. `orders` gives a
    step its own order of the rows (indices); the others take them as given.
    """
    now = CLOCKS[clock]
    ordered = {name: [rows[index] for index in (orders or {}).get(name, range(len(rows)))] for name in steps}
    for step in steps.values():
        step(rows[0])
    passes: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = now()
            for row in ordered[name]:
                step(row)
            passes[name].append((now() - started) / len(rows) * 1000)
    return {name: statistics.median(values) for name, values in passes.items()}


COMPARED_WITH = {  # the step each row's "added" column is measured against
    "sessions_no_exit_heads": "single_graph",
    "sessions": "sessions_no_exit_heads",
    "backend": "sessions",
    "runtime_all_layers": "backend",
    "sessions_onnxruntime_defaults": "sessions",
    "compiled_all_layers": "runtime_all_layers",
    "compiled_operating_point": "runtime_operating_point",
    "truncated": "compiled_operating_point",
}


def format_report(report: dict) -> str:
    point = OperatingPoint.from_dict(report["operating_point"]).describe()
    milliseconds = report["ms_per_row"]
    lines = [
        f"{report['rows']} rows one at a time, median of {report['repeats']} passes, {report['intra_op_threads']} thread(s); "
        f"operating point {point}",
        f"{'step':<31}{'ms/row':>9}{'x single':>10}{'added':>9}  to",
    ]
    for name, value in milliseconds.items():
        if name in LIMIT_STEPS[:-1]:
            continue
        before = COMPARED_WITH.get(name)
        added = f"{value - milliseconds[before]:>+9.3f}  {before}" if before else ""
        lines.append(f"{name:<31}{value:>9.3f}{report['versus_single_graph'][name]:>10.3f}{added}")
    lines += [
        "",
        f"the point against the model cut to {report['limit_layers']} layers "
        f"(rows leaving at layers 1..: {report['exit_layers']}; {report['mean_exit_layer']:.2f} layers a row, "
        f"{report['token_weighted_exit_layer']:.2f} weighted by the row's tokens)",
        f"{'step':<31}{'ms/row':>9}{'limit_ratio':>12}{'added':>9}",
    ]
    measured = [name for name in LIMIT_STEPS if name in milliseconds]
    for before, name in zip([None, *measured], measured):
        added = f"{milliseconds[name] - milliseconds[before]:>+9.3f}" if before else ""
        lines.append(f"{name:<31}{milliseconds[name]:>9.3f}{report['limit_ratio'][name]:>12.3f}{added}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
