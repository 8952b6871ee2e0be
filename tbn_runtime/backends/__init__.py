"""Backend registry and selection. Importing this imports no backend library.

    cls, device, reason = select_backend("auto", manifest, None, export_dir)
    backend = cls(export_dir, manifest, device)

`auto` takes the GPU when there is one, whatever runs on it: TensorRT if the export has engines,
tensorrt imports and a GPU is present; else ONNX Runtime's CUDA provider (onnxruntime-gpu); else
PyTorch on CUDA (the checkpoint the export names). Only then the CPU: ONNX Runtime, else
PyTorch. Any backend on a GPU beats any on the CPU for these models (a Swin-L frame is seconds
on a CPU). A named backend that cannot run raises BackendError saying what to install.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple, Type

from ..manifest import Manifest
from .base import Backend, BackendError

# name -> "module:Class", imported on demand so that no backend library loads before it is used
_REGISTRY: Dict[str, str] = {
    "trt": "tbn_runtime.backends.trt:TrtBackend",
    "ort": "tbn_runtime.backends.ort:OrtBackend",
    "openvino": "tbn_runtime.backends.openvino:OpenVinoBackend",
    "torch": "tbn_runtime.backends.torch_backend:TorchBackend",
}
BACKENDS: Tuple[str, ...] = tuple(_REGISTRY)
DEVICES = ("cpu", "cuda")
#: what `auto` tries, in order: every GPU backend before any CPU backend
AUTO_ORDER = (("trt", "cuda"), ("ort", "cuda"), ("torch", "cuda"), ("openvino", "cpu"),
              ("ort", "cpu"), ("torch", "cpu"))


def backend_class(name: str) -> Type[Backend]:
    """The Backend subclass registered under name (imports its module, not its library)."""
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend '{name}' (choose from auto, {', '.join(_REGISTRY)})")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _has_engines(manifest: Manifest) -> bool:
    return "feature.engine" in manifest.files and "temporal.engine" in manifest.files


def select_backend(name: str, manifest: Manifest, device: Optional[str] = None,
                   export_dir: str = "") -> Tuple[Type[Backend], str, str]:
    """(Backend class, device, why it was chosen). device None means the best one present."""
    if device is not None and device not in DEVICES:
        raise BackendError(f"unknown device '{device}' (choose from {', '.join(DEVICES)})")
    if name != "auto":
        cls = backend_class(name)
        if device is None:
            device = "cuda" if name == "trt" or cls.available("cuda")[0] else "cpu"
        if name == "trt" and not _has_engines(manifest):
            raise BackendError(f"{export_dir or 'the export'} has no TensorRT engines; build them "
                               f"with `tbn-export --engine-only` on this machine")
        ok, reason = cls.available(device)
        if not ok:
            raise BackendError(reason)
        fits, why_not = cls.accepts(manifest)
        if not fits:
            raise BackendError(why_not)
        return cls, device, f"{name} as asked ({reason})"

    tried: List[str] = []
    for cand, dev in AUTO_ORDER:
        if device is not None and dev != device:
            continue
        cls = backend_class(cand)
        if cand == "trt" and not _has_engines(manifest):
            tried.append("trt: the export has no engines")
            continue
        ok, reason = cls.available(dev)
        if ok:
            ok, why_not = cls.accepts(manifest)
            reason = reason if ok else why_not
        if ok:
            why = reason + (f"; not chosen: {'; '.join(tried)}" if tried else "")
            return cls, dev, f"{cand} on {dev} ({why})"
        tried.append(f"{cand} on {dev}: {reason}")
    raise BackendError("no backend can run here: " + "; ".join(tried) +
                       " (pip install onnxruntime is the smallest fix)")


__all__ = ["AUTO_ORDER", "Backend", "BackendError", "BACKENDS", "backend_class",
           "select_backend"]
