"""Checkpoints: model weights as safetensors, with the model's name and config in the metadata.

One self-describing file (`best.safetensors`, `last.safetensors`) is all export and evaluation
need: `load_model(path)` rebuilds the variant from the metadata and loads the weights. Nothing is
unpickled. Files are written atomically (temporary name, then rename).

Beside `last.safetensors`, training keeps `last.state.pt` (optimizer, scheduler, step, RNG, best
mIoU: what --resume needs): tensors and plain containers written by torch.save and read back
with `weights_only=True`, so a file holding anything else is refused, never unpickled.
"""

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from tbn_runtime.files import atomic_write

from .errors import CheckpointError
from .models import VideoSegmenter, build_model

FORMAT = "tbn-vit-checkpoint"
FORMAT_VERSION = 1
STATE_KEYS = ("stage", "step", "total", "done", "best_miou", "global_batch", "optimizer",
              "scheduler", "rng_cpu")


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
        raise CheckpointError(f"checkpoint {path} {unreadable_reason(path)}: pass a "
                              f".safetensors checkpoint written by tbn-train") from e
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
        raise CheckpointError(f"checkpoint {path} {unreadable_reason(path)}: use another "
                              f"checkpoint or train again") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"checkpoint {path}: its weights do not match its config "
                              f"(model '{meta['model']}'): {first}") from e
    return model.eval(), meta


def unreadable_reason(path: str) -> str:
    """Why a file safetensors cannot open is not a checkpoint, told from its first bytes."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "is empty"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return ("is a PyTorch/pickle file (torch.save's format, .pt/.pth), not safetensors; "
                "tbn-vit never unpickles what it is given")
    if len(head) == 9 and head[8:9] == b"{":
        header = int.from_bytes(head[:8], "little")
        return (f"is truncated (its header says {header} bytes of header, the file holds "
                f"{size - 8} bytes after the length)" if size < 8 + header else
                "is truncated or damaged (its tensors do not fill the file as its header says)")
    return "is not a safetensors file"


# -- training state (for --resume) ---------------------------------------------------------------
def save_train_state(path: str, state: Dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_train_state(stage_dir: Path) -> Optional[Dict[str, Any]]:
    """The state saved beside `stage_dir/last.safetensors` (plus "config": the config the stage
    was trained with), or None when there is none. CheckpointError, naming the file and the
    fix, for a state that is corrupt, pickled by something else, or not last.safetensors'."""
    path = Path(stage_dir) / "last.state.pt"
    if not path.is_file():
        return None
    again = (f"start the stage again with --overwrite (or delete {stage_dir}), or put back "
             f"the run's own file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on the way
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path} is truncated or corrupt; {again}") from e
        raise CheckpointError(f"{path} holds pickled Python objects, which tbn-train never "
                              f"writes: it is not this run's training state and will not be "
                              f"unpickled; {again}") from e
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for damage
        raise CheckpointError(f"{path} is truncated or corrupt ({e.__class__.__name__}); "
                              f"{again}") from e
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise CheckpointError(f"{path} is not a tbn-train training state (keys missing); "
                              f"{again}")
    weights = Path(stage_dir) / "last.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} is there but {weights} is missing; {again}")
    meta = read_metadata(str(weights))
    if meta["extra"].get("step") != state["step"]:
        raise CheckpointError(f"{path} (step {state['step']}) does not belong to {weights} "
                              f"(step {meta['extra'].get('step')}); {again}")
    state["config"] = meta["config"]
    return state
