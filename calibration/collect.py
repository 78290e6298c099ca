"""The one pass of the model over the calibration data: every exit of every row, cached next to the bundle.

The cache file is named by two hashes: the bundle's graphs (and engines) with the backend that
ran them, and the data as the model sees it (token ids, masks, type ids), so a changed model,
backend, tokenizer or data set never reuses a stale recording.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pcee.runtime import (
    CACHE_DIR,
    DEFAULT_BATCH_SIZE,
    AllExits,
    EarlyExitRuntime,
    EncodedBatch,
    write_file_atomically,
)

EXIT_ARRAYS = ("logits", "entropy", "max_probability", "confidence_score")


@dataclass(frozen=True)
class Recording:
    exits: AllExits
    cache_file: Path
    from_cache: bool
    model_sha256: str
    data_sha256: str


def model_sha256(runtime: EarlyExitRuntime) -> str:
    manifest = runtime.manifest
    facts = {
        "files": [entry.sha256 for entry in manifest.listed_files()],
        "backend": runtime.backend_name,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def data_sha256(batch: EncodedBatch) -> str:
    digest = hashlib.sha256()
    for array in (batch.input_ids, batch.attention_mask, batch.token_type_ids):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def record_all_exits(
    runtime: EarlyExitRuntime,
    batch: EncodedBatch,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> Recording:
    """Every exit of every row of `batch`, from the cache when this model and data were recorded before."""
    model_hash, data_hash = model_sha256(runtime), data_sha256(batch)
    cache_file = runtime.bundle_dir / CACHE_DIR / f"exits-{model_hash[:16]}-{data_hash[:16]}.npz"
    cached = load_exits(cache_file, expected_shapes(runtime, len(batch))) if cache_file.exists() else None
    if cached is not None:
        return Recording(cached, cache_file, True, model_hash, data_hash)
    exits = run_with_progress(runtime, batch, batch_size, progress)
    save_exits(cache_file, exits)
    return Recording(exits, cache_file, False, model_hash, data_hash)


def run_with_progress(
    runtime: EarlyExitRuntime, batch: EncodedBatch, batch_size: int, progress: bool
) -> AllExits:
    with tqdm(total=len(batch), unit="rows", desc="Recording every exit", disable=not progress) as bar:
        return runtime.run_all_exits(batch, batch_size, on_chunk=bar.update)


def expected_shapes(runtime: EarlyExitRuntime, num_rows: int) -> dict[str, tuple[int, ...]]:
    """The arrays a recording of `num_rows` rows through this model holds, with their shapes."""
    model = runtime.manifest.model
    per_exit = (num_rows, model.num_layers)
    shapes = {"logits": (*per_exit, model.num_labels), "entropy": per_exit, "max_probability": per_exit}
    return shapes | ({"confidence_score": per_exit} if model.learned_confidence else {})


def load_exits(path: Path, shapes: dict[str, tuple[int, ...]]) -> AllExits | None:
    """The cached recording; None, with a warning naming the file, when it is unreadable or does not fit
    this model and data (the exits are then recorded again and the file replaced)."""
    try:
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        problem = f"it cannot be read ({type(error).__name__}: {error})"
    else:
        problem = shape_problem(arrays, shapes)
    if problem is None:
        return AllExits(**arrays)
    warnings.warn(
        f"discarding the cached recording {path}: {problem}; recording the exits again", stacklevel=3
    )
    return None


def shape_problem(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> str | None:
    if set(arrays) != set(shapes):
        return f"it holds the arrays {sorted(arrays)}, expected {sorted(shapes)}"
    for name, shape in shapes.items():
        if arrays[name].shape != shape or not np.issubdtype(arrays[name].dtype, np.floating):
            return f"{name} is {arrays[name].dtype} {arrays[name].shape}, expected floats of shape {shape}"
    return None


def save_exits(path: Path, exits: AllExits) -> None:
    """Atomic (temporary file, then rename); an unwritable bundle only costs the cache."""
    arrays = {name: getattr(exits, name) for name in EXIT_ARRAYS if getattr(exits, name) is not None}
    try:
        write_file_atomically(path, lambda handle: np.savez(handle, **arrays))
    except OSError as error:
        warnings.warn(
            f"could not cache the recorded exits in {path.parent} ({error}); the next calibration will run the model again",
            stacklevel=2,
        )
