"""The torch room: the multi-exit model, its training, data loading and metrics.

Names are imported on first use, so `pcee.modeling.data` and `pcee.modeling.metrics` (which
calibration uses) load without torch.
"""

from __future__ import annotations

import importlib

_HOME_MODULES = {
    "MultiExitClassifier": "model",
    "PceeConfig": "config",
    "TrainingConfig": "train",
    "encode": "train",
    "train_model": "train",
    "predict_all_exits": "train",
    "load_data": "data",
    "TextDataset": "data",
    "DataError": "data",
    "ModelingError": "errors",
    "task_metric": "metrics",
    "MetricError": "metrics",
}

__all__ = sorted(_HOME_MODULES)


def __getattr__(name: str) -> object:
    module = _HOME_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
