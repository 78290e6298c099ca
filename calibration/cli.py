"""`pcee-calibrate` and `pcee-eval`: choose a bundle's operating point from labelled data, and check it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

from pcee.modeling.data import TextDataset
from pcee.runtime import (
    BACKEND_NAMES,
    MANIFEST_NAME,
    POLICY_NAMES,
    REPORTS_DIR,
    EarlyExitRuntime,
    Manifest,
    OperatingPoint,
    PceeError,
    record_operating_point,
)

from .bundle import bundle_label_indices, load_labelled_data
from .calibrate import CalibrationResult, Objective, calibrate
from .collect import record_all_exits
from .evaluate import evaluate_bundle, held_out_rows, requested_point
from .report import format_table, load_report, report_dir_for, write_report
from .search import CALIBRATION_POLICIES
from .simulate import CalibrationRows

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


class OpenFraction(click.FloatRange):
    """A fraction strictly between 0 and 1; a percentage (50) is refused with the fraction to pass (0.5)."""

    def __init__(self) -> None:
        super().__init__(0, 1, min_open=True, max_open=True)

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if 1 < number < 100:
            self.fail(
                f"{number:g} is a percentage; this option takes a fraction between 0 and 1: "
                f"pass {number / 100:g}",
                param,
                ctx,
            )
        return super().convert(number, param, ctx)


OPEN_UNIT_INTERVAL = OpenFraction()
POINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # also the name of the point's report folder
REPORTS_DEFAULT = f"[default: BUNDLE_DIR/{REPORTS_DIR}]"


@contextmanager
def friendly_errors():
    """Our typed errors (PceeError and its subclasses) become one-line messages, never tracebacks."""
    try:
        yield
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
                type=click.Choice(BACKEND_NAMES),
                default="auto",
                help="The backend the bundle will be deployed on.",
            ),
            click.option(
                "--batch-size",
                type=click.IntRange(min=1),
                default=32,
                help="Rows per batch through the runtime.",
            ),
        ],
    )


def check_point_name(context: click.Context, parameter: click.Parameter, name: str | None) -> str | None:
    if name is not None and not POINT_NAME.fullmatch(name):
        raise click.BadParameter(
            f"{name!r} cannot name a point and its report folder; use letters, digits, '.', '_' and '-'"
        )
    return name


def open_labelled_data(bundle_dir: Path, options: dict) -> tuple[Manifest, TextDataset, np.ndarray]:
    """Check the bundle's labels and the data before any model is loaded, so bad input fails fast."""
    manifest = Manifest.load(bundle_dir, verify_hashes=False)
    bundle_labels = manifest.model.labels
    dataset = load_labelled_data(
        options["data"],
        manifest,
        options["task"],
        options["text_column"],
        options["text_pair_column"],
        options["label_column"],
    )
    return manifest, dataset, bundle_label_indices(dataset, bundle_labels)


def emit(document: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(document, indent=2) if as_json else text)


# ------------------------------------------------------------------------------------ calibrate


@click.command(context_settings=CONTEXT)
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@data_options
@run_options
@click.option(
    "--target-speedup",
    type=OPEN_UNIT_INTERVAL,
    help="Layer speed-up to reach (Eq. 4: 1 - layers run / (rows x layers)).",
)
@click.option(
    "--max-drop", type=OPEN_UNIT_INTERVAL, help="Largest accuracy drop against the full model to certify."
)
@click.option(
    "--confidence",
    type=OPEN_UNIT_INTERVAL,
    default=0.95,
    help="With --max-drop: probability that the drop bound holds.",
)
@click.option(
    "--policy", type=click.Choice(CALIBRATION_POLICIES), default="pcee", help="Exit policy to calibrate."
)
@click.option(
    "--holdout-fraction",
    type=OPEN_UNIT_INTERVAL,
    default=0.2,
    help="Share of the rows held out of the search; the chosen point is reported on them.",
)
@click.option("--seed", type=int, default=0, help="Seed of the random hold-out split.")
@click.option(
    "--name",
    callback=check_point_name,
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
                           rows reaches S, the one with the best task metric (ties go
                           to the higher speed-up, then the lower patience).
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
    if (options["target_speedup"] is None) == (options["max_drop"] is None):
        raise click.UsageError("give exactly one of --target-speedup and --max-drop")
    with friendly_errors():
        run_calibration(bundle_dir, options)


def run_calibration(bundle_dir: Path, options: dict) -> None:
    objective = Objective(options["target_speedup"], options["max_drop"], options["confidence"])
    manifest, dataset, labels = open_labelled_data(bundle_dir, options)
    runtime = EarlyExitRuntime.from_bundle(bundle_dir, backend=options["backend"])
    batch = runtime.tokenizer.encode_texts(dataset.texts, dataset.text_pairs)
    recording = record_all_exits(runtime, batch, options["batch_size"], progress=not options["no_progress"])
    result = calibrate(
        CalibrationRows(recording.exits, labels),
        manifest.model.metric,
        objective,
        options["policy"],
        options["holdout_fraction"],
        options["seed"],
        manifest.model.learned_confidence,
        options["name"],
    )
    context = {
        "bundle": str(bundle_dir),
        "data": {"source": dataset.source, "rows": len(dataset), "sha256": recording.data_sha256},
        "backend": runtime.backend_name,
        "holdout_fraction": options["holdout_fraction"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    report_dir = report_dir_for(reports_root(bundle_dir, options), result.point.name)
    with writing(report_dir):
        report = write_report(result, report_dir, context)
    for note in report.notes:
        click.echo(note, err=True)
    if not options["dry_run"]:
        with writing(bundle_dir / MANIFEST_NAME):
            record_operating_point(bundle_dir, result.point, {**result.to_dict(), **context})
    document = {
        **result.to_dict(),
        **context,
        "manifest_updated": not options["dry_run"],
        "recording": {"cache_file": str(recording.cache_file), "from_cache": recording.from_cache},
        "report_files": [str(path) for path in report.files],
    }
    emit(document, options["as_json"], closing_text(result, document))


def reports_root(bundle_dir: Path, options: dict) -> Path:
    return options["report_dir"] or bundle_dir / REPORTS_DIR


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
    callback=check_point_name,
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
    "--policy", type=click.Choice(POLICY_NAMES), help="Evaluate this policy instead of the bundle's point."
)
@click.option(
    "--tau", type=float, help="Threshold (entropy: confident below it; max-prob / learned: above it)."
)
@click.option("--patience", type=click.IntRange(min=1), help="Consecutive confident layers needed to exit.")
@click.option("--layer", type=click.IntRange(min=1), help="Exit layer of the budgeted policy.")
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
    with friendly_errors():
        run_evaluation(bundle_dir, options)


def run_evaluation(bundle_dir: Path, options: dict) -> None:
    _, dataset, labels = open_labelled_data(bundle_dir, options)
    runtime = EarlyExitRuntime.from_bundle(bundle_dir, backend=options["backend"])
    batch = runtime.tokenizer.encode_texts(dataset.texts, dataset.text_pairs)
    default_point = runtime.operating_point
    if options["holdout_of"] is not None:
        report = load_report(
            report_dir_for(reports_root(bundle_dir, options), options["holdout_of"]), options["holdout_of"]
        )
        rows = held_out_rows(report, batch)
        batch, labels = batch.select(rows), labels[rows]
        default_point = OperatingPoint.from_dict(report["operating_point"])
    point = requested_point(
        runtime,
        default_point,
        options["point_name"],
        options["policy"],
        options["tau"],
        options["patience"],
        options["layer"],
    )
    evaluation = evaluate_bundle(runtime, batch, labels, point, options["batch_size"])
    emit(evaluation, options["as_json"], evaluation_text(evaluation))


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
