"""Tiny bundles shared by the whole session: each is exported once, the first time a test asks for it.

A shared bundle is read-only for the tests: a test that writes into a bundle (a manifest, a cache,
a report) takes a private copy first (the default `bundle` fixture, or a module fixture that copies).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


class TinyBundles:
    """Tiny model directories and their default exports, made once per options and kept for the session."""

    def __init__(self, root: Path):
        self.root = root
        self.made: dict[tuple, Path] = {}
        self.snapshots: dict[Path, dict[str, tuple[int, int]]] = {}

    def model_dir(self, **model_options) -> Path:
        key = ("model", *sorted(model_options.items()))
        if key not in self.made:
            from tiny_models import make_tiny_model_dir

            self.made[key] = make_tiny_model_dir(self.root / f"model-{len(self.made)}", **model_options)
        return self.made[key]

    def bundle(self, with_full_graph: bool = False, **model_options) -> Path:
        """The export of `model_dir(**model_options)`, named as pcee-export names it (MODEL_DIR-pcee)."""
        key = ("bundle", with_full_graph, *sorted(model_options.items()))
        if key not in self.made:
            from pcee.exporter.bundle import ExportOptions, export_bundle

            model_dir = self.model_dir(**model_options)
            output = model_dir.with_name(
                model_dir.name + ("-with-full-graph" if with_full_graph else "") + "-pcee"
            )
            options = ExportOptions(with_full_graph=with_full_graph)
            self.made[key] = export_bundle(model_dir, output, options).bundle_dir
            self.snapshots[self.made[key]] = snapshot(self.made[key])
        return self.made[key]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory):
    pytest.importorskip("torch", reason="building a tiny bundle needs the export extras (torch)")
    bundles = TinyBundles(tmp_path_factory.mktemp("tiny-bundles"))
    yield bundles
    written = {
        str(bundle)
        for key, bundle in bundles.made.items()
        if key[0] == "bundle" and snapshot(bundle) != bundles.snapshots[bundle]
    }
    assert not written, f"a test wrote into a shared bundle (copy it first): {sorted(written)}"


@pytest.fixture(scope="session")
def sst2_model_dir(tiny_bundles) -> Path:
    """A 3-layer BERT model directory of the SST-2 task."""
    return tiny_bundles.model_dir(task="sst2")


@pytest.fixture(scope="session")
def sst2_bundle(tiny_bundles) -> Path:
    """Its bundle as pcee-export writes it by default: MODEL_DIR-pcee, no single graph inside."""
    return tiny_bundles.bundle(task="sst2")


@pytest.fixture(scope="session")
def sst2_single_graph_bundle(tiny_bundles) -> Path:
    """The same model exported with its single graph (--with-full-graph) too."""
    return tiny_bundles.bundle(with_full_graph=True, task="sst2")


@pytest.fixture(scope="session")
def four_layer_bundle(tiny_bundles) -> Path:
    return tiny_bundles.bundle(num_layers=4)


@pytest.fixture(scope="session")
def pair_bundle(tiny_bundles) -> Path:
    """A 2-layer sentence-pair (QNLI) bundle."""
    return tiny_bundles.bundle(task="qnli", num_layers=2)


@pytest.fixture
def bundle(sst2_bundle, tmp_path) -> Path:
    """By default `bundle` is a private copy of the SST-2 bundle, which a test may write into
    (manifests, caches, reports); modules about another bundle define their own `bundle`."""
    return Path(shutil.copytree(sst2_bundle, tmp_path / "bundle"))


@pytest.fixture
def data_csv(tmp_path) -> Path:
    """By default `data_csv` is 120 labelled rows (text,label) in the tiny models' words."""
    from bundles import write_labelled_csv

    return write_labelled_csv(tmp_path / "reviews.csv", 120)
