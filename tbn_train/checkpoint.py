"""Checkpoints: model weights as safetensors, with the model's name and config in the metadata.

One self-describing file (`best.safetensors`, `last.safetensors`) is all export and evaluation
need: `load_model(path)` rebuilds the variant from the metadata and loads the weights. Nothing is
unpickled. Files are written atomically (temporary name, then rename).
"""

import json
import os
from typing import Any, Dict, Optional, Tuple

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from tbn_runtime.files import atomic_write

from .models import VideoSegmenter, build_model

FORMAT = "tbn-vit-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def save_checkpoint(path: str, model: VideoSegmenter, config: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> None:
    """Write model weights + {model name, num_classes, model kwargs, config} atomically."""
    model = getattr(model, "module", model)  # unwrap DDP
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model": model.model_name,
        "num_classes": str(model.num_classes),
        "model_kwargs": json.dumps(getattr(model, "model_kwargs", {})),
        "config": json.dumps(config or {}),
        "extra": json.dumps(extra or {}),
    }
    # safetensors refuses shared storage; contiguous clones on the CPU are always valid.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_metadata(path: str) -> Dict[str, Any]:
    """The checkpoint's metadata, decoded; raises CheckpointError for unusable files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (train one with tbn-train, or pass "
                              f"--checkpoint PATH)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({e}); it may "
                              f"be truncated: use another checkpoint or train again") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a tbn-vit checkpoint (no "
                              f"'{FORMAT}' metadata); tbn-train writes checkpoints")
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(f"{path} is checkpoint format {meta['format_version']}, newer than "
                              f"this tbn-vit reads ({FORMAT_VERSION}); upgrade tbn-vit")
    return {
        "model": meta["model"],
        "num_classes": int(meta["num_classes"]),
        "model_kwargs": json.loads(meta.get("model_kwargs", "{}")),
        "config": json.loads(meta.get("config", "{}")),
        "extra": json.loads(meta.get("extra", "{}")),
    }


def load_model(path: str, map_location: str = "cpu") -> Tuple[VideoSegmenter, Dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    meta = read_metadata(path)
    try:
        model = build_model(meta["model"], num_classes=meta["num_classes"], **meta["model_kwargs"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} describes a model this version cannot build: "
                              f"{e}") from e
    try:
        state = load_file(path, device=map_location)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} could not be read ({e}); it may be "
                              f"truncated") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"checkpoint {path}: its weights do not match its config "
                              f"(model '{meta['model']}'): {first}") from e
    return model.eval(), meta
