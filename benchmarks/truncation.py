"""The physical limit of a layer saving: the same model cut to the layers a point runs on average.

A point with layer speed-up S runs L x (1 - S) of L layers on average, so its limit is the model cut
to round(L x (1 - S)) layers (its first layers and their exit) as one graph, exported the way the
bundle was (fused or not, int8 with --quantize int8). That truncation is what a user would deploy
instead of early exit; `limit_ratio` = rows/s at the point / rows/s of its truncation.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from pcee.calibration.simulate import simulate
from pcee.runtime import build_policy

from .bench import Contender, cached_single_graph, quantized_copy, single_graph_contender

PREFIX = "truncated_"


def truncated_layers(num_layers: int, layer_speedup: float) -> int:
    """round(L x (1 - S)), at least one layer."""
    return max(1, min(num_layers, round(num_layers * (1 - layer_speedup))))


def truncation_name(layers: int, precision: str) -> str:
    return f"{PREFIX}{layers}_layers" + ("" if precision == "fp32" else f"_{precision}")


def plan_limits(chains, exits, learned_confidence: bool, quantize: str | None) -> dict[str, str]:
    """For every measured point of every chain, the name of its truncation contender.

    S is each point's layer speed-up simulated on the benchmark rows' exits (the first bundle's
    recording: every bundle holds the same model). A chain of a precision with no truncation
    (int8 without --quantize int8, fp16) gets none.
    """
    limits = {}
    for chain in chains:
        precision = chain.runtime.manifest.model.precision
        if precision not in ("fp32", quantize):
            continue
        for name, point in chain.points:
            policy = build_policy(point, exits.num_layers, learned_confidence)
            layers = truncated_layers(exits.num_layers, simulate(policy, exits).layer_speedup)
            limits[name + chain.suffix] = truncation_name(layers, precision)
    return limits


def truncation_contenders(
    model_dir: Path, cache_dir: Path, fuse: bool, limits: dict[str, str], threads: int | None
) -> list[Contender]:
    """One contender per truncation named in `limits`: layer-free, never a single-graph reference."""
    contenders = []
    with tempfile.TemporaryDirectory(prefix="pcee-truncation-") as workdir:  # sessions keep what they load
        for name in sorted(set(limits.values())):
            layers, precision = parse_name(name)
            graph = cached_single_graph(model_dir, cache_dir, fuse=fuse, num_layers=layers).path
            if precision != "fp32":
                graph = quantized_copy(graph, Path(workdir) / f"{name}.onnx")
            contender = single_graph_contender(graph, threads, name, precision)
            contenders.append(dataclasses.replace(contender, single_graph=False, layer_based=False))
    return contenders


def parse_name(name: str) -> tuple[int, str]:
    layers, _, rest = name[len(PREFIX) :].partition("_layers")
    return int(layers), rest.lstrip("_") or "fp32"


def add_limit_ratios(figures: dict, limits: dict[str, str]) -> None:
    """Each point's rows/s over its truncation's, in place (`limit_ratio`, `limit`)."""
    for name, truncation in limits.items():
        if name in figures and truncation in figures:
            point, limit = figures[name], figures[truncation]
            point["limit"] = truncation
            point["limit_ratio"] = round(limit["seconds_per_pass"] / point["seconds_per_pass"], 4)
