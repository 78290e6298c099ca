"""Exported tiny bundles shared by the runtime, calibration and CLI tests."""

from __future__ import annotations

from pathlib import Path

from tiny_models import make_tiny_model_dir

from pcee.exporter.bundle import ExportOptions, export_bundle

SENTENCES = [
    "the movie was good",
    "a dull story",
    "what a great film and the actors were fun",
    "i hate this plot",
    "best day",
    "it was not very good but not bad",
    "love it",
    "the worst film of the year, really awful",
    "quite fun",
    "who did this",
    "no",
    "an old story told in a new way, with great actors and a really fun plot",
]


def export_tiny_bundle(tmp_path: Path, **model_options) -> Path:
    model_dir = make_tiny_model_dir(tmp_path, **model_options)
    return export_bundle(model_dir, tmp_path / (model_dir.name + "-pcee"), ExportOptions()).bundle_dir


def entropy_quantile_point(runtime, texts, quantile: float, patience: int = 1):
    """A pcee point whose tau sits at a quantile of the observed entropies, so exits really vary."""
    from pcee.runtime import OperatingPoint

    exits = runtime.run_all_exits(runtime.tokenizer.encode_texts(texts))
    tau = float(sorted(exits.entropy.ravel())[int(quantile * (exits.entropy.size - 1))])
    return OperatingPoint("pcee", tau=tau, patience=patience)
