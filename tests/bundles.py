"""Texts and helpers shared by the tests of tiny bundles (the bundles themselves: conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


WORDS = "the a movie film story good bad great awful fun dull love hate plot actors very not really".split()


def write_labelled_csv(path: Path, count: int, labels=("0", "1"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = ["text,label"]
    for _ in range(count):
        lines.append(" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) + "," + str(rng.choice(labels)))
    path.write_text("\n".join(lines) + "\n")
    return path


def entropy_quantile_point(runtime, texts, quantile: float, patience: int = 1):
    """A pcee point whose tau sits at a quantile of the observed entropies, so exits really vary."""
    from pcee.runtime import OperatingPoint

    exits = runtime.run_all_exits(runtime.tokenizer.encode_texts(texts))
    tau = float(sorted(exits.entropy.ravel())[int(quantile * (exits.entropy.size - 1))])
    return OperatingPoint("pcee", tau=tau, patience=patience)
