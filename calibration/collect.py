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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pcee.runtime import DEFAULT_BATCH_SIZE, AllExits, EarlyExitRuntime, EncodedBatch, write_file_atomically

CACHE_DIRECTORY = ".pcee-cache"
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


def record_all_exits(runtime: EarlyExitRuntime, batch: EncodedBatch, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> Recording:
    """Every exit of every row of `batch`, from the cache when this model and data were recorded before."""
    model_hash, data_hash = model_sha256(runtime), data_sha256(batch)
    cache_file = runtime.bundle_dir / CACHE_DIRECTORY / f"exits-{model_hash[:16]}-{data_hash[:16]}.npz"
    cached = load_exits(cache_file, len(batch)) if cache_file.is_file() else None
    if cached is not None:
        return Recording(cached, cache_file, True, model_hash, data_hash)
    exits = run_with_progress(runtime, batch, batch_size, progress)
    save_exits(cache_file, exits)
    return Recording(exits, cache_file, False, model_hash, data_hash)


def run_with_progress(runtime: EarlyExitRuntime, batch: EncodedBatch, batch_size: int, progress: bool) -> AllExits:
    with tqdm(total=len(batch), unit="rows", desc="Recording every exit", disable=not progress) as bar:
        return runtime.run_all_exits(batch, batch_size, on_chunk=bar.update)


def load_exits(path: Path, num_rows: int) -> AllExits | None:
    """The cached recording, or None when it is unreadable (it is then recorded again)."""
    try:
        with np.load(path) as stored:
            exits = AllExits(*(stored[name] if name in stored else None for name in EXIT_ARRAYS))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return exits if exits.logits.shape[0] == num_rows else None


def save_exits(path: Path, exits: AllExits) -> None:
    """Atomic (temporary file, then rename); an unwritable bundle only costs the cache."""
    arrays = {name: getattr(exits, name) for name in EXIT_ARRAYS if getattr(exits, name) is not None}
    try:
        write_file_atomically(path, lambda handle: np.savez(handle, **arrays))
    except OSError as error:
        warnings.warn(f"could not cache the recorded exits in {path.parent} ({error}); the next calibration will run the model again", stacklevel=2)
