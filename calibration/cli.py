"""`pcee-calibrate` and `pcee-eval`: choose a bundle's operating point from labelled data, and check it."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

from pcee.modeling.data import TextDataset
from pcee.runtime import (
    BACKEND_NAMES,
    DEFAULT_POLICY,
    MANIFEST_NAME,
    REPORTS_DIR,
    EarlyExitRuntime,
    Manifest,
    OperatingPoint,
    PceeError,
    policy_names,
    record_operating_point,
)

from .bundle import bundle_label_indices, load_labelled_data
from .calibrate import CalibrationResult, Objective, calibrate
from .collect import record_all_exits
from .errors import OptionError
from .evaluate import evaluate_bundle, held_out_rows, requested_point
from .options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_HOLDOUT_FRACTION,
    CalibrationOptions,
    EvaluationOptions,
    LabelledData,
    RunSettings,
)
from .report import format_table, load_report, report_dir_for, write_report
from .simulate import CalibrationRows

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}
REPORTS_DEFAULT = f"[default: BUNDLE_DIR/{REPORTS_DIR}]"


@contextmanager
def friendly_errors():
    """Our typed errors (PceeError and its subclasses) become one-line messages, never tracebacks; a bad
    option is a usage error (exit status 2), as click's own."""
    try:
        yield
    except OptionError as error:
        raise click.UsageError(str(error), click.get_current_context(silent=True)) from None
    except PceeError as error:
        raise click.ClickException(str(error)) from None


@contextmanager
def writing(path: Path):
    """A write that fails (read-only file system, full disk) becomes one line naming what was being written."""
    try:
        yield
    except OSError as error:
        raise click.ClickException(
            f"could not write {path}: {error.strerror or error}; make room there or make it writable, then run again"
        ) from None


def apply_options(command: Callable, options: list[Callable]) -> Callable:
    for option in reversed(options):
        command = option(command)
    return command


def data_options(command: Callable) -> Callable:
    """The labelled data: --data and how to read it."""
    return apply_options(
        command,
        [
            click.option(
                "--data",
                required=True,
                type=click.Path(path_type=Path),
                help="Labelled data: a GLUE task directory (its dev split is used), one file in that task's GLUE format, "
                "or a generic .csv/.tsv/.jsonl with --text-column/--label-column.",
            ),
            click.option(
                "--task", help="GLUE task of a GLUE file or directory (default: the bundle's task)."
            ),
            click.option("--text-column", help="Generic files: the column holding the text."),
            click.option(
                "--text-pair-column", help="Generic files: the column holding the second text of a pair."
            ),
            click.option(
                "--label-column",
                help="Generic files: the column holding the label (names must be the bundle's labels).",
            ),
        ],
    )


def run_options(command: Callable) -> Callable:
    """How the bundle runs: --backend and --batch-size."""
    return apply_options(
        command,
        [
            click.option(
                "--backend",
                metavar=choices_metavar(BACKEND_NAMES),
                default="auto",
                help="The backend the bundle will be deployed on.",
            ),
            click.option(
                "--batch-size",
                type=int,
                default=DEFAULT_BATCH_SIZE,
                help="Rows per batch through the runtime (at least 1).",
            ),
        ],
    )


def choices_metavar(choices) -> str:
    """The --help metavar of an option whose value the typed options check: its choices, as click.Choice shows them."""
    return "[" + "|".join(choices) + "]"


def labelled_data(options: dict) -> LabelledData:
    """--data and how to read it, taken out of click's values (the rest go to the command's own options)."""
    return LabelledData(
        options.pop("data"),
        options.pop("task"),
        options.pop("text_column"),
        options.pop("text_pair_column"),
        options.pop("label_column"),
    )


def run_settings(options: dict) -> RunSettings:
    """--backend and --batch-size, taken out of click's values."""
    return RunSettings(options.pop("backend"), options.pop("batch_size"))


def open_labelled_data(bundle_dir: Path, data: LabelledData) -> tuple[Manifest, TextDataset, np.ndarray]:
    """Check the bundle's labels and the data before any model is loaded, so bad input fails fast."""
    manifest = Manifest.load(bundle_dir, verify_hashes=False)
    dataset = load_labelled_data(
        data.path, manifest, data.task, data.text_column, data.text_pair_column, data.label_column
    )
    return manifest, dataset, bundle_label_indices(dataset, manifest.model.labels)


def emit(document: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(document, indent=2) if as_json else text)


# ------------------------------------------------------------------------------------ calibrate


@click.command(context_settings=CONTEXT)
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@data_options
@run_options
@click.option(
    "--target-speedup",
    type=float,
    help="Layer speed-up to reach, in (0, 1) (Eq. 4: 1 - layers run / (rows x layers)).",
)
@click.option(
    "--at-least",
    is_flag=True,
    help="With --target-speedup: go above the target's band where a faster point's gain beats the metric's noise.",
)
@click.option(
    "--max-speedup",
    type=float,
    help="With --target-speedup: like --at-least, up to this layer speed-up.",
)
@click.option(
    "--max-drop", type=float, help="Largest accuracy drop against the full model to certify, in (0, 1)."
)
@click.option(
    "--confidence",
    type=float,
    default=0.95,
    help="With --max-drop: probability that the drop bound holds, in (0, 1).",
)
@click.option(
    "--policy",
    metavar=choices_metavar(policy_names(calibrated_only=True)),
    default=DEFAULT_POLICY,
    help="Exit policy to calibrate.",
)
@click.option(
    "--holdout-fraction",
    type=float,
    default=DEFAULT_HOLDOUT_FRACTION,
    help="Share of the rows held out of the search, in (0, 1); the chosen point is reported on them.",
)
@click.option("--seed", type=int, default=0, help="Seed of the random hold-out split.")
@click.option(
    "--name",
    help="Name of the new operating point and of its report folder. [default: speedup-S or max-drop-D]",
)
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Folder of per-point report folders: this run writes REPORT_DIR/NAME/. {REPORTS_DEFAULT}",
)
@click.option("--dry-run", is_flag=True, help="Report only; leave the manifest unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def calibrate_main(bundle_dir: Path, **options) -> None:
    """Choose the bundle's operating point (policy, tau, patience) from labelled data.

    The bundle runs once over the data with every exit reported (cached in
    BUNDLE_DIR/.pcee-cache, so calibrating again on the same data costs no model
    time); every policy and threshold is then simulated exactly, offline.

    \b
    Two objectives:
      --target-speedup S   of every (tau, patience) whose layer speed-up on the search
                           rows lies in [S, S + 0.02], the one with the best task
                           metric (ties go to the higher speed-up, then the lower
                           patience). With --at-least (or --max-speedup M) a faster
                           point replaces it only if it is right on significantly
                           more rows (exact sign test on the rows where they differ).
      --max-drop D         the largest speed-up whose accuracy drop against the full
                           model is at most D with probability --confidence (exact
                           binomial test, fixed-sequence along the frontier; assumes
                           the data are exchangeable with production traffic).

    A --holdout-fraction of the rows is kept out of the search; the chosen point's
    held-out layer speed-up and metric are what production will see (run them for
    real with: pcee-eval BUNDLE_DIR --data ... --holdout-of NAME). The point is
    written into BUNDLE_DIR/manifest.json (earlier points stay in operating_points,
    by name) unless --dry-run.

    \b
    The report goes to one folder per point name; a run replaces only its own:
      REPORT_DIR/NAME/calibration-report.json    everything, with the hold-out split
      REPORT_DIR/NAME/calibration-frontier.csv   exact Pareto frontier of every policy
      REPORT_DIR/NAME/calibration-frontier.png   the frontiers (plots need matplotlib)
      REPORT_DIR/NAME/calibration-patience.png   reachable speed-ups per patience

    \b
    Examples:
      pcee-calibrate runs/sst2-pcee --data data/glue/SST-2 --target-speedup 0.5
      pcee-calibrate runs/sst2-pcee --data data/glue/SST-2 --max-drop 0.01 --confidence 0.9 --dry-run
      pcee-calibrate runs/tickets-bundle --data tickets.jsonl --text-column text \\
                     --label-column label --target-speedup 0.4 --name peak-hours --json
    """
    as_json = options.pop("as_json")
    with friendly_errors():
        run_calibration(bundle_dir, calibration_options(options), as_json)


def calibration_options(options: dict) -> CalibrationOptions:
    """The typed options from click's values; they check themselves."""
    data, run = labelled_data(options), run_settings(options)
    objective = Objective(
        options.pop("target_speedup"),
        options.pop("max_drop"),
        options.pop("confidence"),
        options.pop("at_least"),
        options.pop("max_speedup"),
    )
    return CalibrationOptions(data, objective, run=run, progress=not options.pop("no_progress"), **options)


def run_calibration(bundle_dir: Path, options: CalibrationOptions, as_json: bool) -> None:
    manifest, dataset, labels = open_labelled_data(bundle_dir, options.data)
    runtime = EarlyExitRuntime.from_bundle(bundle_dir, backend=options.run.backend)
    batch = runtime.tokenizer.encode_texts(dataset.texts, dataset.text_pairs)
    recording = record_all_exits(runtime, batch, options.run.batch_size, progress=options.progress)
    result = calibrate(
        CalibrationRows(recording.exits, labels),
        manifest.model.metric,
        options.objective,
        options.policy,
        options.holdout_fraction,
        options.seed,
        manifest.model.learned_confidence,
        options.name,
    )
    context = {
        "bundle": str(bundle_dir),
        "data": {"source": dataset.source, "rows": len(dataset), "sha256": recording.data_sha256},
        "backend": runtime.backend_name,
        "holdout_fraction": options.holdout_fraction,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    report_dir = report_dir_for(reports_root(bundle_dir, options.report_dir), result.point.name)
    with writing(report_dir):
        report = write_report(result, report_dir, context)
    for note in report.notes:
        click.echo(note, err=True)
    if not options.dry_run:
        with writing(bundle_dir / MANIFEST_NAME):
            record_operating_point(bundle_dir, result.point, {**result.to_dict(), **context})
    document = {
        **result.to_dict(),
        **context,
        "manifest_updated": not options.dry_run,
        "recording": {"cache_file": str(recording.cache_file), "from_cache": recording.from_cache},
        "report_files": [str(path) for path in report.files],
    }
    emit(document, as_json, closing_text(result, document))


def reports_root(bundle_dir: Path, report_dir: Path | None) -> Path:
    return report_dir or bundle_dir / REPORTS_DIR


def closing_text(result: CalibrationResult, document: dict) -> str:
    source = "cached recording" if document["recording"]["from_cache"] else "new recording"
    outcome = "written to the manifest" if document["manifest_updated"] else "not written (--dry-run)"
    return "\n".join(
        [
            format_table(result),
            f"\nOperating point {result.point.name!r} {outcome}. Exits from the {source} {document['recording']['cache_file']}.",
            "Report: " + ", ".join(document["report_files"]),
        ]
    )


# ------------------------------------------------------------------------------------ eval


@click.command(context_settings=CONTEXT)
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@data_options
@run_options
@click.option(
    "--holdout-of",
    metavar="NAME",
    help="Evaluate only the rows that the calibration of point NAME held out of its search (give the same "
    "--data; the split is read from NAME's report), at point NAME unless --point or --policy is given.",
)
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"With --holdout-of: the folder of per-point report folders pcee-calibrate wrote to. {REPORTS_DEFAULT}",
)
@click.option(
    "--point", "point_name", help="A named operating point of the manifest (see pcee-calibrate --name)."
)
@click.option(
    "--policy",
    metavar=choices_metavar(policy_names()),
    help="Evaluate this policy instead of the bundle's point.",
)
@click.option(
    "--tau", type=float, help="Threshold (entropy: confident below it; max-prob / learned: above it)."
)
@click.option("--patience", type=int, help="Consecutive confident layers needed to exit (at least 1).")
@click.option("--layer", type=int, help="Exit layer of the budgeted policy (at least 1).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_main(bundle_dir: Path, **options) -> None:
    """Run the bundle with early exit over labelled data and report what it achieves.

    Uses the real runtime, not a simulation: layer speed-up, task metric, the exit
    layer histogram and wall time, with the full model's metric and wall time beside
    them. The bundle's operating point is used unless --point, --policy or a knob is
    given (a knob alone adjusts the bundle's point).

    The rows a calibration searched on flatter the point it chose. --holdout-of NAME
    runs only the rows that NAME's calibration held out: the production estimate.

    \b
    Examples:
      pcee-eval runs/sst2-pcee --data data/glue/SST-2 --holdout-of speedup-0.50
      pcee-eval runs/sst2-pcee --data data/glue/SST-2/dev.tsv --task sst2 --policy pcee --tau 0.3 --patience 2 --json
    """
    as_json = options.pop("as_json")
    with friendly_errors():
        data, run = labelled_data(options), run_settings(options)
        run_evaluation(bundle_dir, EvaluationOptions(data, run, **options), as_json)


def run_evaluation(bundle_dir: Path, options: EvaluationOptions, as_json: bool) -> None:
    _, dataset, labels = open_labelled_data(bundle_dir, options.data)
    runtime = EarlyExitRuntime.from_bundle(bundle_dir, backend=options.run.backend)
    batch = runtime.tokenizer.encode_texts(dataset.texts, dataset.text_pairs)
    default_point = runtime.operating_point
    if options.holdout_of is not None:
        report_dir = report_dir_for(reports_root(bundle_dir, options.report_dir), options.holdout_of)
        report = load_report(report_dir, options.holdout_of)
        rows = held_out_rows(report, batch)
        batch, labels = batch.select(rows), labels[rows]
        default_point = OperatingPoint.from_dict(report["operating_point"])
    point = requested_point(
        runtime,
        default_point,
        options.point_name,
        options.policy,
        options.tau,
        options.patience,
        options.layer,
    )
    evaluation = evaluate_bundle(runtime, batch, labels, point, options.run.batch_size)
    emit(evaluation, as_json, evaluation_text(evaluation))


def evaluation_text(evaluation: dict) -> str:
    metric = evaluation["metric_name"]
    histogram = "  ".join(
        f"L{layer}:{count}" for layer, count in enumerate(evaluation["exit_histogram"], start=1)
    )
    full_seconds, seconds = evaluation["full_model"]["wall_time_s"], evaluation["wall_time_s"]
    wall = (
        f"{full_seconds / seconds:.2f}x the full model's speed"
        if full_seconds and seconds
        else "not measured"
    )
    return "\n".join(
        [
            f"{OperatingPoint.from_dict(evaluation['operating_point']).describe()} on {evaluation['rows']} rows ({evaluation['backend']})",
            f"layers saved {evaluation['layer_speedup']:.1%} (layer speed-up {evaluation['layer_speedup']:.4f})   "
            f"wall clock {wall}",
            f"{metric} {evaluation['metric']:.4f}   (full model {evaluation['full_model']['metric']:.4f})",
            f"wall time {evaluation['wall_time_s']:.3f} s   (full model {evaluation['full_model']['wall_time_s']:.3f} s)",
            f"exits per layer: {histogram}",
        ]
    )
