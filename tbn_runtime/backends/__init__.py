"""Backend registry and selection. Importing this imports no backend library.

    backend, why = open_backend("auto", manifest, None, export_dir, streams=1)
    cls, device, why = select_backend("auto", manifest, None, export_dir)   # class only

`auto` takes the GPU when there is one, whatever runs on it: TensorRT if the export has engines,
tensorrt imports and a GPU is present; else ONNX Runtime's CUDA provider (onnxruntime-gpu); else
PyTorch on CUDA (the weights the export holds). Only then the CPU, fastest engine first:
OpenVINO, ONNX Runtime, PyTorch. A backend that refuses the export's precision (`accepts`:
ONNX Runtime a bf16 export, OpenVINO an int8 one on a CPU without VNNI) is passed over, said.
Any backend on a GPU beats any on the CPU for these models (a Swin-L frame is seconds on a CPU).
Whether there is a GPU is asked of the driver first (`cuda.driver_gpu_count`: no torch, no
cuda-python), so a CPU-only machine imports no GPU library and hears no CUDA install hints.
`open_backend` also constructs: a candidate whose constructor fails (BackendError, or a
ManifestError for one of its files) hands over to the next, and `why` says what failed. A named
backend that cannot run raises BackendError saying what to install. The torch backend belongs
to tbn_train (it runs the model's own code) and is registered here by its import string.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

from ..manifest import Manifest, ManifestError
from .base import Backend, BackendError

log = logging.getLogger("tbn_runtime")

# name -> "module:Class", imported on demand so that no backend library loads before it is used
_REGISTRY: Dict[str, str] = {
    "trt": "tbn_runtime.backends.trt:TrtBackend",
    "ort": "tbn_runtime.backends.ort:OrtBackend",
    "openvino": "tbn_runtime.backends.openvino:OpenVinoBackend",
    "torch": "tbn_train.torch_backend:TorchBackend",
}
BACKENDS: Tuple[str, ...] = tuple(_REGISTRY)
DEVICES = ("cpu", "cuda")
#: what `auto` tries, in order: every GPU backend before any CPU backend
AUTO_ORDER = (("trt", "cuda"), ("ort", "cuda"), ("torch", "cuda"), ("openvino", "cpu"),
              ("ort", "cpu"), ("torch", "cpu"))
#: what a backend module that cannot be imported needs
_INSTALL = {"torch": "pip install 'tbn-vit[train]' (torch and timm)"}


def backend_class(name: str) -> Type[Backend]:
    """The Backend subclass registered under name (imports its module, not its library)."""
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend '{name}' (choose from auto, {', '.join(_REGISTRY)})")
    module, cls = _REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:  # tbn_train (the torch backend's home) not installed
        raise BackendError(f"the {name} backend needs {module.split('.')[0]} ({e}): "
                           f"{_INSTALL.get(name, 'pip install tbn-vit[all]')}") from e


def gpu_present() -> bool:
    """A CUDA device the driver reports (no torch, no cuda-python imported)."""
    from ..cuda import driver_gpu_count
    return driver_gpu_count() > 0


def _has_engines(manifest: Manifest) -> bool:
    return "feature.engine" in manifest.files and "temporal.engine" in manifest.files


def _candidates(name: str, manifest: Manifest, device: Optional[str], export_dir: str,
                tried: List[str]) -> Iterator[Tuple[Type[Backend], str, str]]:
    """(class, device, what it will use) of each backend that says it can run, best first;
    what was passed over goes into `tried`."""
    if device is not None and device not in DEVICES:
        raise BackendError(f"unknown device '{device}' (choose from {', '.join(DEVICES)})")
    if name != "auto":
        cls = backend_class(name)
        if device is None:
            device = "cuda" if name == "trt" or (gpu_present() and cls.available("cuda")[0]) \
                else "cpu"
        if name == "trt" and not _has_engines(manifest):
            raise BackendError(f"{export_dir or 'the export'} has no TensorRT engines; build them "
                               f"with `tbn-export --engine-only` on this machine")
        ok, reason = cls.available(device)
        if not ok:
            raise BackendError(reason)
        fits, why_not = cls.accepts(manifest)
        if not fits:
            raise BackendError(why_not)
        yield cls, device, f"{name} as asked ({reason})"
        return
    gpu = None
    for cand, dev in AUTO_ORDER:
        if device is not None and dev != device:
            continue
        if dev == "cuda":
            if gpu is None:
                gpu = gpu_present()
                if not gpu:
                    tried.append("no CUDA device (the NVIDIA driver reports none)")
            if not gpu:
                continue
        if cand == "trt" and not _has_engines(manifest):
            tried.append("trt: the export has no engines")
            continue
        try:
            cls = backend_class(cand)
        except BackendError as e:
            tried.append(f"{cand} on {dev}: {e}")
            continue
        ok, reason = cls.available(dev)
        if ok:
            ok, why_not = cls.accepts(manifest)
            reason = reason if ok else why_not
        if ok:
            yield cls, dev, reason
        else:
            tried.append(f"{cand} on {dev}: {reason}")


def _because(cand: str, dev: str, reason: str, tried: List[str]) -> str:
    return f"{cand} on {dev} ({reason}" + (f"; not chosen: {'; '.join(tried)})" if tried
                                            else ")")


def _none_left(tried: List[str]) -> BackendError:
    return BackendError("no backend can run here: " + "; ".join(tried) +
                        " (pip install onnxruntime is the smallest fix)")


def select_backend(name: str, manifest: Manifest, device: Optional[str] = None,
                   export_dir: str = "") -> Tuple[Type[Backend], str, str]:
    """(Backend class, device, why it was chosen) of the first backend that says it can run;
    device None means the best one present. `open_backend` also constructs it."""
    tried: List[str] = []
    for cls, dev, reason in _candidates(name, manifest, device, export_dir, tried):
        return cls, dev, (reason if name != "auto" else _because(cls.name, dev, reason, tried))
    raise _none_left(tried)


def open_backend(name: str, manifest: Manifest, device: Optional[str] = None,
                 export_dir: str = "", streams: int = 1, threads: Optional[int] = None,
                 **kwargs: Any) -> Tuple[Backend, str]:
    """(the constructed backend, why it was chosen). With "auto", a candidate whose constructor
    raises BackendError or ManifestError (weights missing, an engine for another GPU, a file
    changed since export) is logged and the next one is tried; a named backend raises."""
    tried: List[str] = []
    for cls, dev, reason in _candidates(name, manifest, device, export_dir, tried):
        try:
            backend = cls(export_dir, manifest, dev, streams, threads=threads, **kwargs)
        except (BackendError, ManifestError) as e:
            if name != "auto":
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("%s on %s failed to load (%s); trying the next backend", cls.name, dev,
                        first)
            tried.append(f"{cls.name} on {dev} failed to load: {first}")
            continue
        why = reason if name != "auto" else _because(cls.name, dev, reason, tried)
        return backend, why
    raise _none_left(tried)


__all__ = ["AUTO_ORDER", "Backend", "BackendError", "BACKENDS", "backend_class", "gpu_present",
           "open_backend", "select_backend"]
