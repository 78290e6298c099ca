"""The calibration report: JSON, the Pareto frontiers as CSV, two plots, and a terminal table.

One report per point name: REPORTS_ROOT/NAME/ (REPORTS_ROOT defaults to BUNDLE/reports), so a
calibration replaces only the report of the point it saves.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from pcee.runtime import (
    DEFAULT_POLICY,
    temporary_file_pattern,
    write_file_atomically,
    written_before_this_process,
)

from .calibrate import CalibrationResult
from .errors import CalibrationError
from .noise import SIGNIFICANCE, SMALL_DATA_ROWS
from .search import TARGET_BAND, best_reaching

REPORT_JSON = "calibration-report.json"
FRONTIER_CSV = "calibration-frontier.csv"
FRONTIER_PLOT = "calibration-frontier.png"
PATIENCE_PLOT = "calibration-patience.png"
REPORT_FILES = (REPORT_JSON, FRONTIER_CSV, FRONTIER_PLOT, PATIENCE_PLOT)
FRONTIER_COLUMNS = ("policy", "tau", "patience", "layer", "layer_speedup", "metric")
PLOTS_SKIPPED = "plots skipped: matplotlib is not installed; pip install 'pcee[export]'"
MAIN_POLICY_STYLE = {"linewidth": 2.6, "zorder": 3}
BASELINE_STYLE = {"linewidth": 1.2, "zorder": 2}
TEMPORARY_NAMES = [
    temporary_file_pattern(name) for name in REPORT_FILES
]  # write_file_atomically's, for our files


@dataclass(frozen=True)
class WrittenReport:
    files: list[Path]
    notes: list[str] = field(default_factory=list)  # one line each, for the user


def report_dir_for(reports_root: Path, point_name: str) -> Path:
    return reports_root / point_name


def load_report(report_dir: Path, point_name: str) -> dict:
    path = report_dir / REPORT_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(
            f"no calibration report for point {point_name!r} at {path}; calibrate it with pcee-calibrate --name {point_name}, "
            "or give the --report-dir it was written to"
        ) from None
    except (OSError, ValueError) as error:
        raise CalibrationError(
            f"{path} is not a readable calibration report ({error}); calibrate point {point_name!r} again"
        ) from None


def outcome_row(outcome) -> dict:
    """An outcome or sweep state: its point's fields (OperatingPoint.to_dict), layer speed-up and metric."""
    return {
        **outcome.point.to_dict(),
        "layer_speedup": round(outcome.layer_speedup, 6),
        "metric": round(outcome.metric, 6),
    }


def frontier_rows(result: CalibrationResult) -> list[dict]:
    rows = [outcome_row(state) for states in result.frontiers.values() for state in states]
    return rows + [outcome_row(result.full_search)]


def frontier_csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, FRONTIER_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_report(result: CalibrationResult, report_dir: Path, context: dict) -> WrittenReport:
    """Write every report file into `report_dir`; the plots only where matplotlib is installed."""
    remove_stale_temporaries(report_dir)
    rows = frontier_rows(result)
    document = {**result.to_dict(), **context, "frontiers": rows}
    contents = {
        REPORT_JSON: (json.dumps(document, indent=2) + "\n").encode(),
        FRONTIER_CSV: frontier_csv(rows).encode(),
    }
    for name, content in contents.items():
        write_file_atomically(report_dir / name, lambda handle, content=content: handle.write(content))
    written = [report_dir / name for name in contents]
    try:
        import matplotlib
    except ImportError:
        return WrittenReport(written, [PLOTS_SKIPPED])
    matplotlib.use("Agg")
    for name, draw in ((FRONTIER_PLOT, draw_frontiers), (PATIENCE_PLOT, draw_patience_scatter)):
        figure = draw(result)
        write_file_atomically(
            report_dir / name, lambda handle, figure=figure: figure.savefig(handle, format="png", dpi=120)
        )
        written.append(report_dir / name)
    return WrittenReport(written)


def remove_stale_temporaries(report_dir: Path) -> None:
    """Remove what a killed run left of its atomic writes: temporary files of our report files, written
    before this process could write any (a younger one may be a concurrent run's)."""
    if not report_dir.is_dir():
        return
    for path in report_dir.iterdir():
        ours = any(pattern.fullmatch(path.name) for pattern in TEMPORARY_NAMES)
        if ours and path.is_file() and written_before_this_process(path):
            path.unlink(missing_ok=True)


def frontier_lines(result: CalibrationResult) -> list[tuple[list[str], list]]:
    """The frontiers to draw, one per distinct curve: policies whose frontiers are identical share one line,
    the calibrated policy first in its group (on two-class tasks the entropy and max-prob rules decide alike)."""
    groups: dict[tuple, tuple[list[str], list]] = {}
    for policy, states in result.frontiers.items():
        curve = tuple((state.layer_speedup, state.metric) for state in states)
        groups.setdefault(curve, ([], states))[0].append(policy)
    for policies, _ in groups.values():
        policies.sort(key=lambda policy: policy != result.point.policy)
    return list(groups.values())


def line_label(policies: list[str]) -> str:
    """'pcee', or 'pcee (= pcee-maxprob, branchynet)' for one line standing for several policies."""
    return policies[0] if len(policies) == 1 else f"{policies[0]} (= {', '.join(policies[1:])})"


def draw_frontiers(result: CalibrationResult):
    """Metric against layer speed-up per policy, like Figure 3 of the PCEE-BERT paper; the calibrated policy on top."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for policies, states in frontier_lines(result):
        style = MAIN_POLICY_STYLE if result.point.policy in policies else BASELINE_STYLE
        axes.plot(
            [s.layer_speedup for s in states],
            [s.metric for s in states],
            marker="o",
            markersize=3,
            label=line_label(policies),
            **style,
        )
    axes.axhline(result.full_search.metric, color="grey", linestyle="--", linewidth=1.0, label="full model")
    axes.plot(
        [result.chosen.layer_speedup],
        [result.chosen.metric],
        marker="*",
        markersize=14,
        color="black",
        linestyle="none",
        label="chosen",
        zorder=4,
    )
    axes.set(
        xlabel="layer speed-up",
        ylabel=result.metric_name,
        title=f"Pareto frontiers on {len(result.chosen.exit_layers)} calibration rows",
    )
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def draw_patience_scatter(result: CalibrationResult):
    """Layer speed-ups reachable per patience over a tau grid (PCEE, entropy), like Figure 8 of the paper."""
    from matplotlib.figure import Figure

    outcomes = result.patience_grid
    figure = Figure(figsize=(6, 4.5))
    axes = figure.add_subplot()
    dots = axes.scatter(
        [o.point.patience for o in outcomes],
        [o.layer_speedup for o in outcomes],
        c=[o.point.tau for o in outcomes],
        cmap="viridis",
        s=14,
    )
    figure.colorbar(dots, ax=axes, label="tau (normalized entropy)")
    axes.set(
        xlabel="patience",
        ylabel="layer speed-up",
        title=f"Reachable layer speed-ups per patience ({DEFAULT_POLICY})",
    )
    axes.set_xticks(range(1, result.num_layers + 1))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def target_lines(result: CalibrationResult) -> list[str]:
    """The requested target, the speed-ups reached, and what going further (--at-least) found."""
    target = result.target
    if target is None:
        return []
    requested = result.objective.target_speedup
    lines = [
        f"Requested layer speed-up {requested:g} (band {requested:g} to {requested + TARGET_BAND:g} on the search rows): "
        f"{result.chosen.layer_speedup:.4f} on the search rows, {result.holdout.layer_speedup:.4f} on the held-out rows"
    ]
    further = target.further
    if further is not None:
        verdict = "taken" if further.accepted else "not taken: its gain is within noise"
        lines.append(
            f"Faster candidate {further.outcome.point.describe()} at {further.outcome.layer_speedup:.4f} "
            f"({result.metric_name} {further.outcome.metric:.4f} against {target.band_choice.metric:.4f}): {verdict} "
            f"(right on {further.test.wins} vs {further.test.losses} of the rows where they disagree, "
            f"p = {further.test.p_value:.3g}, needed <= {SIGNIFICANCE / further.candidates:.3g})"
        )
    return lines


def format_table(result: CalibrationResult) -> str:
    """The chosen point on calibration and held-out rows, and every policy's best at the chosen speed-up."""
    metric = result.metric_name
    lines = [
        f"Chosen operating point: {result.point.describe()}"
        + (f"  (name {result.point.name})" if result.point.name else "")
    ]
    lines += target_lines(result)
    small = len(result.chosen.exit_layers) < SMALL_DATA_ROWS
    lines.append(
        f"{'':<22}{'rows':>7}{'layer speed-up':>16}{metric:>12}" + ("   95% interval" if small else "")
    )
    for label, outcome, part in (
        ("calibration", result.chosen, "calibration"),
        ("held-out", result.holdout, "holdout"),
        ("full model, held-out", result.full_holdout, "full_model"),
    ):
        low, high = result.intervals[part]
        lines.append(
            f"{label:<22}{len(outcome.exit_layers):>7}{outcome.layer_speedup:>16.4f}{outcome.metric:>12.4f}"
            + (f"   [{low:.3f}, {high:.3f}]" if small else "")
        )
    if small:
        lines.append(
            f"Small data: {len(result.chosen.exit_layers)} search rows; the intervals are 95% bootstrap intervals over rows."
        )
    histogram = result.summarize(result.holdout, "holdout")["exit_histogram"]
    lines.append(
        "Held-out exits per layer: "
        + "  ".join(f"L{layer}:{count}" for layer, count in enumerate(histogram, start=1))
    )
    lines += [f"Warning: {warning}" for warning in result.warnings]
    if result.certification is not None:
        guarantee = result.certification
        lines.append(
            f"Certified: accuracy drop <= {guarantee.max_drop:g} with confidence {guarantee.confidence:g} "
            f"({guarantee.chosen.losses} losses in {guarantee.testing_rows} testing rows, p = {guarantee.chosen.p_value:.3g})"
        )
    lines.append(
        f"\nBest {metric} per policy at layer speed-up >= {result.chosen.layer_speedup:.4f} (calibration rows, every threshold):"
    )
    lines.append(f"{'policy':<14}{'point':<34}{'layer speed-up':>16}{metric:>12}")
    for policy, states in result.frontiers.items():
        best = best_reaching(states, result.chosen.layer_speedup)
        if best is None:
            lines.append(f"{policy:<14}{'(cannot reach this speed-up)':<34}")
        else:
            lines.append(
                f"{policy:<14}{best.point.describe():<34}{best.layer_speedup:>16.4f}{best.metric:>12.4f}"
            )
    return "\n".join(lines)
