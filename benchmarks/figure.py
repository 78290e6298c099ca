"""pcee-bench's bar chart: rows/s of every contender, as a multiple of the plain single graph, per batch size."""

from __future__ import annotations

from pathlib import Path

from pcee.runtime import write_file_atomically

from .bench import BenchmarkError

SINGLE_GRAPH_COLOR, CHAIN_COLOR, OTHER_COLOR = "#8c8c8c", "#1f77b4", "#d9a13b"
MATPLOTLIB_MISSING = "--plot needs matplotlib: pip install 'pcee[export]'"


def contender_color(name: str) -> str:
    if name.startswith("single_graph"):
        return SINGLE_GRAPH_COLOR
    return CHAIN_COLOR if name.startswith("runtime_") else OTHER_COLOR


def draw_throughput(report: dict):
    """One panel per batch size: a horizontal bar per contender, its rows/s over the plain single graph's."""
    from matplotlib.figure import Figure

    results = report["results"]
    names = [name for name, entry in next(iter(results.values())).items() if isinstance(entry, dict)]
    figure = Figure(figsize=(6 * len(results), 0.32 * len(names) + 1.6))
    for column, (batch_size, figures) in enumerate(results.items(), start=1):
        axes = figure.add_subplot(1, len(results), column)
        values = [figures[name]["versus_plain"] for name in names]
        bars = axes.barh(names, values, color=[contender_color(name) for name in names])
        axes.bar_label(bars, labels=[f"{value:.2f}" for value in values], padding=2, fontsize="small")
        axes.axvline(1.0, color="black", linewidth=0.8)
        axes.invert_yaxis()
        axes.set(title=f"batch size {batch_size}", xlabel="rows/s, x the plain single graph")
        axes.margins(x=0.12)
        if column > 1:
            axes.tick_params(labelleft=False)
    figure.suptitle(
        f"pcee-bench: {report['rows']} rows, median of {report['repeats']} interleaved passes",
        fontsize="medium",
    )
    figure.tight_layout()
    return figure


def write_throughput_plot(report: dict, path: Path) -> None:
    """The chart as PNG at `path`, written atomically (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise BenchmarkError(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")
    figure = draw_throughput(report)
    write_file_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
