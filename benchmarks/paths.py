"""The inference paths latency.py times, one object per row, built on the runtime's backends.

A path is built once (`build_path(row, source, device)`), warmed up, then called frame by frame;
it raises Skip with the reason when it cannot run on this machine (not installed, no GPU, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional

import numpy as np


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked; one line for the user."""


class Skip(Exception):
    """A row that cannot run here; the message says why (reported in the table)."""


# -- the model and its exports -------------------------------------------------------------------
@dataclasses.dataclass
class Source:
    """Where the rows get their model: a checkpoint, a manifest, and export dirs per precision."""

    model_name: str
    height: int
    width: int
    checkpoint: Optional[str]
    manifest: Any                       # tbn_runtime.manifest.Manifest (fp32 or the first given)
    exports: Dict[str, str]             # precision -> export dir
    random_weights: bool
    tmp: str
    export_seconds: Dict[str, float] = dataclasses.field(default_factory=dict)
    #: () -> tbn_export.int8.CalibrationFrames, for an int8 export made on the fly
    calibration: Optional[Callable[[], Any]] = None

    def export_dir(self, precision: str, device: str) -> str:
        """The export of `precision`, made on the fly from the checkpoint if there is none."""
        if precision in self.exports:
            return self.exports[precision]
        if not self.checkpoint:
            raise Skip(f"no {precision} export given and no checkpoint to export one from")
        from tbn_export.onnx_export import export_onnx
        from tbn_train.checkpoint import load_model
        out = os.path.join(self.tmp, f"export-{precision}")
        print(f"latency: exporting {self.model_name} {precision} at {self.height}x{self.width} "
              f"into {out} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        model, _ = load_model(self.checkpoint)
        export_onnx(model, out, self.height, self.width, fp16=(precision == "fp16"),
                    bf16=(precision == "bf16"), checkpoint_path=self.checkpoint)
        if precision == "int8":
            from tbn_export.int8 import Int8Error, quantize_export
            if self.calibration is None:
                raise Skip("no int8 export given and no calibration frames to make one")
            try:
                quantize_export(out, self.calibration())
            except Int8Error as e:
                raise Skip(f"cannot make the int8 export: {e}") from None
        self.export_seconds[precision] = time.perf_counter() - t0
        self.exports[precision] = out
        return out


def make_source(args: argparse.Namespace, tmp: str) -> Source:
    from tbn_runtime.manifest import ManifestError, load_manifest
    if args.export:
        exports: Dict[str, str] = {}
        manifests = []
        for d in [d for d in args.export.split(",") if d]:
            try:
                m = load_manifest(d)
            except ManifestError as e:
                raise BenchError(str(e)) from None
            if m.precision in exports:
                raise BenchError(f"two {m.precision} exports given: {exports[m.precision]}, {d}")
            exports[m.precision] = d
            manifests.append(m)
        first = manifests[0]
        for m, d in zip(manifests[1:], list(exports.values())[1:]):
            if (m.model, m.height, m.width) != (first.model, first.height, first.width):
                raise BenchError(f"exports differ: {first.model} {first.height}x{first.width} "
                                 f"and {m.model} {m.height}x{m.width} ({d})")
        ckpt = (first.checkpoint or {}).get("path")
        if ckpt and not os.path.isabs(ckpt) and not os.path.isfile(ckpt):
            ckpt = os.path.join(list(exports.values())[0], ckpt)
        if ckpt and not os.path.isfile(ckpt):
            ckpt = None
        return Source(first.model, first.height, first.width, ckpt, first, exports, False, tmp)

    # random weights: build, randomise BatchNorm, save a checkpoint so that every path (the
    # runtime's torch backend, the exports) loads exactly the same weights.
    import torch
    from tbn_train.checkpoint import save_checkpoint
    from tbn_train.models import build_model, randomize_batchnorm
    h, w = args.size
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model)
    except ValueError as e:
        raise BenchError(str(e)) from None
    randomize_batchnorm(model, args.seed)
    model.eval()
    ckpt = os.path.join(tmp, f"{args.model}-random.safetensors")
    save_checkpoint(ckpt, model, {"note": "random weights for benchmarks/latency.py"})
    manifest = torch_manifest(model, h, w, ckpt)
    return Source(args.model, h, w, ckpt, manifest, {}, True, tmp)


def torch_manifest(model: Any, height: int, width: int, checkpoint: str,
                   precision: str = "fp32") -> Any:
    """A manifest for the runtime's torch backend (which reads only the checkpoint, no ONNX)."""
    from tbn_export.onnx_export import class_vocabulary, feature_shape_of
    from tbn_runtime.files import sha256_file
    from tbn_runtime.manifest import Manifest
    from tbn_runtime.preprocess import MEAN_RGB, STD_RGB
    names, palette = class_vocabulary(int(model.num_classes))
    offsets = [int(k) for k in model.temporal_offsets]
    return Manifest(
        model=model.model_name, num_classes=int(model.num_classes), class_names=names,
        palette=palette, height=height, width=width, mean=list(MEAN_RGB), std=list(STD_RGB),
        feature_shape=feature_shape_of(model, height, width),
        feature_dtype="float16" if precision == "fp16" else "float32",
        temporal_offsets=offsets, precision=precision,
        past_inputs=[f"past_{k}" for k in offsets],
        checkpoint={"path": os.path.abspath(checkpoint), "sha256": sha256_file(checkpoint)})


# -- the rows ----------------------------------------------------------------------------------
class NaivePath:
    """model(clip) per frame: the backbone over all 4 frames of the clip (the naive pipeline),
    through the clip-inference reference (tbn_train.reference.ClipReference)."""

    def __init__(self, checkpoint: Optional[str], device: str, fp16: bool, bf16: bool = False,
                 model: Any = None):
        from tbn_train.checkpoint import load_model
        from tbn_train.reference import ClipReference
        model = load_model(checkpoint)[0] if model is None else model
        self.ref = ClipReference(model, device, fp16, bf16)
        self.capture_failures: Dict[int, str] = {}  # none: eager (gpu_check reads it per row)

    def describe(self) -> str:
        import torch
        amp = ", fp16 autocast" if self.ref.fp16 else ", bf16 autocast" if self.ref.bf16 else ""
        return f"torch {torch.__version__} on {self.ref.device} (eager{amp}, model(clip))"

    def reset(self) -> None:
        self.ref.reset()

    def infer(self, frame: np.ndarray) -> np.ndarray:
        return self.ref.labels(frame)

    def close(self) -> None:
        self.ref = None


class BackendPath:
    """One of the runtime's backends (torch ring, ort, openvino, trt) on an export dir."""

    #: set by main(). ONNX Runtime's intra-op threads spin-wait between runs by default; in a
    #: process that also runs PyTorch on the same cores that steals the CPU from whatever runs
    #: next (on 2 cores it made the interleaved PyTorch rows several times slower). A
    #: deployment runs one engine per process and is not affected; the benchmark turns spinning
    #: off so that the rows do not distort each other.
    ort_no_spin = True

    def __init__(self, backend_name: str, export_dir: str, manifest: Any, device: str,
                 **kwargs: Any):
        from tbn_runtime.backends import BackendError, backend_class
        cls = backend_class(backend_name)
        ok, reason = cls.available(device)
        if not ok:
            raise Skip(reason)
        if backend_name == "ort":
            kwargs.setdefault("spinning", not self.ort_no_spin)
        try:
            self.backend = cls(export_dir, manifest, device, **kwargs)
        except BackendError as e:
            raise Skip(str(e)) from None

    def describe(self) -> str:
        return self.backend.describe()

    def reset(self) -> None:
        self.backend.reset()

    def infer(self, frame: np.ndarray) -> np.ndarray:
        return self.backend.infer(frame)

    def close(self) -> None:
        self.backend.close()


def cuda_sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def row_precision(row: str) -> str:
    """The export precision a row runs: its suffix (ort-fp16, trt-fp32, openvino-bf16, ...); trt
    alone is fp16, the others fp32."""
    suffix = row.rsplit("-", 1)[-1]
    if suffix in ("fp32", "fp16", "bf16", "int8"):
        return suffix
    return "fp16" if row == "trt" else "fp32"


def build_path(row: str, src: Source, device: str, time_left: Optional[float] = None) -> Any:
    """The object that runs one row; Skip if it cannot run here. time_left bounds the TensorRT
    engine builds (seconds; None: no bound)."""
    fp16 = row_precision(row) == "fp16"
    if row in ("naive-fp16", "ring-fp16") and device != "cuda":
        raise Skip("fp16 autocast rows are for --device cuda")
    if row.startswith("naive") or row.startswith("ring"):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise Skip("torch is not installed") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise Skip("torch sees no CUDA device")
        if not src.checkpoint:
            raise Skip("the export's manifest names no checkpoint that exists here")
    if row.startswith("naive"):
        return NaivePath(src.checkpoint, device, fp16)
    if row.startswith("ring"):
        ckpt = {"path": os.path.abspath(src.checkpoint),
                "sha256": (src.manifest.checkpoint or {}).get("sha256")}
        precision = row_precision(row)  # the weights in the row's precision
        if precision == "bf16":  # the backend's own decision: where it would not run bf16
            from tbn_train.torch_backend import run_precision
            runs, note = run_precision(precision, device)
            if runs != precision:
                raise Skip(f"{note}: the ring row")
        manifest = dataclasses.replace(src.manifest, precision=precision, checkpoint=ckpt)
        return BackendPath("torch", src.tmp, manifest, device)
    for name in ("ort", "openvino"):  # the export's own graphs, as tbn-run runs them
        if row.startswith(name):
            from tbn_runtime.backends import backend_class
            ok, reason = backend_class(name).available(device)
            if not ok:
                raise Skip(reason)
            d = src.export_dir(row_precision(row), device)
            from tbn_runtime.manifest import load_manifest
            return BackendPath(name, d, load_manifest(d), device)
    if row.startswith("trt"):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise Skip("tensorrt not installed") from None
        except Exception as e:  # installed but broken (missing libraries)
            raise Skip(f"tensorrt does not import ({e.__class__.__name__}: {e})") from None
        if device != "cuda":
            raise Skip("TensorRT runs on a GPU only (--device cuda)")
        d = engine_export(src, row_precision(row), time_left)
        from tbn_runtime.manifest import load_manifest
        return BackendPath("trt", d, load_manifest(d), device)
    raise BenchError(f"unknown row {row}")


def engine_export(src: Source, precision: str, time_left: Optional[float] = None) -> str:
    """An export dir with TensorRT engines of `precision` (built by tbn-export on the fly, in at
    most time_left seconds)."""
    from tbn_runtime.manifest import load_manifest
    d = src.exports.get(precision)
    if d and "feature.engine" in load_manifest(d).files:
        return d
    if not src.checkpoint:
        raise Skip(f"no {precision} export with engines and no checkpoint to build one")
    out = os.path.join(src.tmp, f"engine-{precision}")
    cmd = [sys.executable, "-m", "tbn_export", "--checkpoint", src.checkpoint, "--out", out,
           "--height", str(src.height), "--width", str(src.width)]
    if precision == "fp16":
        cmd.append("--fp16")
    print(f"latency: building TensorRT {precision} engines: {' '.join(cmd)}", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=None if time_left is None else max(time_left, 1))
    except subprocess.TimeoutExpired:
        raise Skip(f"building the {precision} engines did not finish within the time "
                   f"budget") from None
    src.export_seconds[f"trt-{precision}"] = time.perf_counter() - t0
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Skip(f"tbn-export failed: {tail[0]}")
    if "feature.engine" not in load_manifest(out).files:
        raise Skip("tbn-export wrote no TensorRT engines here")
    return out
