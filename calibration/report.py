"""The calibration report: JSON, the Pareto frontiers as CSV, two plots, and a terminal table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .calibrate import CalibrationResult
from ..runtime.atomic import write_file_atomically
from .simulate import Outcome

REPORT_JSON = "calibration-report.json"
FRONTIER_CSV = "calibration-frontier.csv"
FRONTIER_PLOT = "calibration-frontier.png"
PATIENCE_PLOT = "calibration-patience.png"
FRONTIER_COLUMNS = ("policy", "tau", "patience", "layer", "layer_speedup", "metric")


def frontier_rows(result: CalibrationResult) -> list[dict]:
    rows = [outcome_row(outcome) for outcomes in result.frontiers.values() for outcome in outcomes]
    return rows + [outcome_row(result.full_search)]


def outcome_row(outcome: Outcome) -> dict:
    point = outcome.point
    return {"policy": point.policy, "tau": point.tau, "patience": point.patience, "layer": point.layer,
            "layer_speedup": round(outcome.layer_speedup, 6), "metric": round(outcome.metric, 6)}


def frontier_csv(result: CalibrationResult) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, FRONTIER_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(frontier_rows(result))
    return text.getvalue()


def write_report(result: CalibrationResult, report_dir: Path, context: dict) -> list[Path]:
    """Write every report file into `report_dir`; the plots only where matplotlib is installed."""
    document = {**result.to_dict(), **context, "frontiers": frontier_rows(result)}
    files = {
        REPORT_JSON: (json.dumps(document, indent=2) + "\n").encode(),
        FRONTIER_CSV: frontier_csv(result).encode(),
    }
    for name, content in files.items():
        write_file_atomically(report_dir / name, lambda handle, content=content: handle.write(content))
    written = [report_dir / name for name in files]
    try:
        import matplotlib
    except ImportError:
        return written
    matplotlib.use("Agg")
    for name, draw in ((FRONTIER_PLOT, draw_frontiers), (PATIENCE_PLOT, draw_patience_scatter)):
        figure = draw(result)
        write_file_atomically(report_dir / name, lambda handle, figure=figure: figure.savefig(handle, format="png", dpi=120))
        written.append(report_dir / name)
    return written


def draw_frontiers(result: CalibrationResult):
    """Metric against layer speed-up per policy, like Figure 3 of the PCEE-BERT paper."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for policy, outcomes in result.frontiers.items():
        axes.plot([o.layer_speedup for o in outcomes], [o.metric for o in outcomes], marker="o", markersize=3, label=policy)
    axes.axhline(result.full_search.metric, color="grey", linestyle="--", label="full model")
    axes.plot([result.chosen.layer_speedup], [result.chosen.metric], marker="*", markersize=14, color="black", linestyle="none", label="chosen")
    axes.set(xlabel="layer speed-up", ylabel=result.metric_name, title=f"Pareto frontiers on {len(result.chosen.exit_layers)} calibration rows")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def draw_patience_scatter(result: CalibrationResult):
    """Layer speed-ups reachable per patience over a tau grid (PCEE, entropy), like Figure 8 of the paper."""
    from matplotlib.figure import Figure

    outcomes = result.grids["pcee"]
    figure = Figure(figsize=(6, 4.5))
    axes = figure.add_subplot()
    dots = axes.scatter([o.point.patience for o in outcomes], [o.layer_speedup for o in outcomes], c=[o.point.tau for o in outcomes], cmap="viridis", s=14)
    figure.colorbar(dots, ax=axes, label="tau (normalized entropy)")
    axes.set(xlabel="patience", ylabel="layer speed-up", title="Reachable layer speed-ups per patience (pcee)")
    axes.set_xticks(range(1, result.num_layers + 1))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def format_table(result: CalibrationResult) -> str:
    """The chosen point on calibration and held-out rows, and every policy at the chosen speed-up."""
    metric = result.metric_name
    lines = [f"Chosen operating point: {result.point.describe()}" + (f"  (name {result.point.name})" if result.point.name else "")]
    lines.append(f"{'':<22}{'rows':>7}{'layer speed-up':>16}{metric:>12}")
    for label, outcome in (("calibration", result.chosen), ("held-out", result.holdout), ("full model, held-out", result.full_holdout)):
        lines.append(f"{label:<22}{len(outcome.exit_layers):>7}{outcome.layer_speedup:>16.4f}{outcome.metric:>12.4f}")
    histogram = result.summarize(result.holdout)["exit_histogram"]
    lines.append("Held-out exits per layer: " + "  ".join(f"L{layer}:{count}" for layer, count in enumerate(histogram, start=1)))
    if result.certification is not None:
        guarantee = result.certification
        lines.append(
            f"Certified: accuracy drop <= {guarantee.max_drop:g} with confidence {guarantee.confidence:g} "
            f"({guarantee.chosen.losses} losses in {guarantee.testing_rows} testing rows, p = {guarantee.chosen.p_value:.3g})"
        )
    lines.append(f"\nBest {metric} per policy at layer speed-up >= {result.chosen.layer_speedup:.4f} (calibration rows):")
    lines.append(f"{'policy':<14}{'point':<34}{'layer speed-up':>16}{metric:>12}")
    for policy, outcomes in result.frontiers.items():
        reaching = [o for o in outcomes if o.layer_speedup >= result.chosen.layer_speedup]
        if reaching:
            best = max(reaching, key=lambda o: o.metric)
            lines.append(f"{policy:<14}{best.point.describe():<34}{best.layer_speedup:>16.4f}{best.metric:>12.4f}")
        else:
            lines.append(f"{policy:<14}{'(cannot reach this speed-up)':<34}")
    return "\n".join(lines)
