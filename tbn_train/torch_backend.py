"""The PyTorch backend: the export's own weights in the model's code, a ring of tensors.

Registered in tbn_runtime.backends by its import string ("tbn_train.torch_backend:
TorchBackend"): tbn_runtime never imports tbn_train, and this module imports torch only when a
backend is made. The weights are the export's `weights.safetensors` (sha256 in the manifest),
so a copied export runs anywhere; exports made before that name the checkpoint by path
(absolute, or relative to the export).

An engine rather than the training model run in eval mode:
- weights stored in the run precision: fp32, fp16 (LayerNorm, BatchNorm and Softmax computed in
  fp32, as in the fp16 ONNX graph: Swin's LayerNorm overflows in fp16) or bf16 (the feature
  half; the temporal half in fp32, as the bf16 export's compute_precision says), on the CPU too
  (AMX / AVX512-BF16 through oneDNN); no autocast re-casting the weights at every call. The run
  precision is the manifest's ("bf16" exports run in bf16) unless `precision=` says otherwise;
  an fp16 export on the CPU runs fp32, so does a bf16 export on a CPU without native bf16
  (emulated bf16 ran the feature half 6x slower than fp32 on AVX2), and an int8 export runs its
  fp32 weights (each said).
- fp32 on CUDA with TF32 matmuls and convolutions (`tf32=False` turns both off); in describe().
- Swin's shifted-window masks computed once per size, window attention fused
  (F.scaled_dot_product_attention) unless `fused_attention=False`.
- on CUDA: CUDA graphs of both halves for each batch size up to `batch_limit` (the streams),
  captured on first use; frames staged through pinned memory. A capture that fails
  runs that batch size eager and says so loudly: a warning, `capture_failures`, describe().
- `compile=True`: the two halves through torch.compile first (an opt-in to measure).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from tbn_runtime.backends.base import Backend, BackendError
from tbn_runtime.cpu import cpu_flags, has_native_bf16
from tbn_runtime.files import sha256_file
from tbn_runtime.manifest import Manifest, ManifestError
from tbn_runtime.preprocess import MEAN_RGB, STD_RGB

log = logging.getLogger("tbn_runtime")
_INSTALL = "pip install 'tbn-vit[train]' (torch and timm)"
RUN_PRECISIONS = ("fp32", "fp16", "bf16")
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def run_precision(manifest_precision: str, device: str,
                  asked: Optional[str] = None) -> Tuple[str, str]:
    """(the precision the torch backend computes in, a note when it differs from the export)."""
    if asked is not None:
        if asked not in RUN_PRECISIONS:
            raise BackendError(f"the torch backend runs {', '.join(RUN_PRECISIONS)}, not "
                               f"{asked!r}")
        if asked == "fp16" and device == "cpu":
            raise BackendError("fp16 in torch runs on CUDA only; on the CPU use bf16 or fp32")
        return asked, ("" if asked == manifest_precision else
                       f"{asked} asked, the export is {manifest_precision}")
    if manifest_precision == "fp16" and device == "cpu":
        return "fp32", "the fp16 export runs fp32 on the CPU (torch's fp16 is for CUDA)"
    if manifest_precision == "bf16" and device == "cpu" and cpu_flags() and \
            not has_native_bf16():  # emulated: the feature half 6x slower on AVX2
        return "fp32", ("this CPU has no native bf16 (no AMX / AVX512-BF16): the bf16 export "
                        "runs fp32")
    if manifest_precision == "int8":
        return "fp32", "the int8 export runs its fp32 weights in torch (no int8 path)"
    if manifest_precision not in RUN_PRECISIONS:
        raise BackendError(f"the torch backend cannot run a {manifest_precision!r} export")
    return manifest_precision, ""


def weights_path(export_dir: str, manifest: Manifest) -> str:
    """The weights file of an export, its sha256 checked: the bundled weights.safetensors, else
    the checkpoint the manifest names (absolute, or relative to the export)."""
    info = manifest.checkpoint or {}
    bundled = info.get("file")
    if bundled:
        try:
            return manifest.verify_file(export_dir, bundled)
        except ManifestError as e:
            raise BackendError(str(e)) from e
    path = info.get("path")
    if not path:
        raise BackendError(f"the manifest in {export_dir} names no weights; the torch backend "
                           f"needs them (export with tbn-export --checkpoint CKPT)")
    candidates = [path] if os.path.isabs(path) else [path, os.path.join(export_dir, path)]
    for p in candidates:
        if os.path.isfile(p):
            if info.get("sha256") and sha256_file(p) != info["sha256"]:
                raise BackendError(f"checkpoint {p} does not match the sha256 in the manifest of "
                                   f"{export_dir} (changed since export); export again")
            return p
    raise BackendError(f"checkpoint {path} named in the manifest of {export_dir} not found "
                       f"(this export predates bundled weights: export again with tbn-export)")


def _compute_in_fp32(module: Any) -> None:
    """module (fp32 weights) computes in fp32 and returns the input's dtype."""
    forward = module.forward

    def run(x, *args, **kwargs):
        return forward(x.float(), *args, **kwargs).to(x.dtype)

    module.forward = run


def head_modules(model: Any) -> List[Any]:
    """The modules the temporal half runs (those temporal_head calls, found by running it once
    on a small input): for a bf16 run they keep fp32, as the bf16 export computes its temporal
    graph in fp32 (the manifest's compute_precision, what --verify checked)."""
    import torch

    used: List[Any] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: used.append(m))
             for m in model.modules()]
    p = next(model.parameters())
    x = torch.zeros((1, int(model.feature_chs), 6, 6), dtype=p.dtype, device=p.device)
    try:
        with torch.no_grad():
            model.temporal_head(x, [x] * len(model.temporal_offsets))
    finally:
        for h in hooks:
            h.remove()
    return list({id(m): m for m in used}.values())


def to_run_precision(model: Any, precision: str) -> Any:
    """The model's weights in `precision`; for fp16, LayerNorm, BatchNorm and Softmax kept in
    fp32 (inputs cast up, outputs back down), as the fp16 ONNX export keeps them; for bf16, the
    temporal half kept in fp32 (the bf16 export's compute_precision)."""
    import torch
    import torch.nn as nn

    head = head_modules(model) if precision == "bf16" else []
    model.to(getattr(torch, _TORCH_DTYPES[precision]))
    for m in head:
        m.float()
    if precision == "fp16":
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                              nn.Softmax)):
                m.float()
                _compute_in_fp32(m)
    return model


def manifest_for(model: Any, height: int, width: int, precision: str = "fp32",
                 max_batch: int = 8) -> Manifest:
    """The manifest an export of `model` at height x width would have, in memory only (no
    files): what TorchBackend.from_model runs on."""
    d, s = int(model.size_divisor), int(model.feature_stride)
    offsets = [int(k) for k in model.temporal_offsets]
    n = int(model.num_classes)
    return Manifest(
        model=str(getattr(model, "model_name", type(model).__name__)), num_classes=n,
        class_names=[f"class_{i}" for i in range(n)], palette=[[0, 0, 0]] * n,
        height=int(height), width=int(width), mean=[float(v) for v in MEAN_RGB],
        std=[float(v) for v in STD_RGB],
        feature_shape=[1, int(model.feature_chs), -(-height // d) * d // s,
                       -(-width // d) * d // s],
        feature_dtype="float16" if precision == "fp16" else "float32",
        temporal_offsets=offsets, precision=precision,
        past_inputs=[f"past_{k}" for k in offsets], max_batch=int(max_batch))


class _TorchEventClock:
    """Stage timestamps from CUDA events on the current stream (torch.cuda.Event): a CUDA graph
    replay returns before the GPU has finished, so the host clock would charge the feature
    engine's time to the temporal stage, which waits for it."""

    def __init__(self, torch: Any, marks: int = 3) -> None:
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(marks)]

    def mark(self, i: int) -> None:
        self.events[i].record()

    def seconds(self, a: int, b: int) -> float:
        self.events[b].synchronize()
        return self.events[a].elapsed_time(self.events[b]) / 1e3


class TorchBackend(Backend):
    name = "torch"

    @classmethod
    def available(cls, device: str = "cpu") -> Tuple[bool, str]:
        for mod in ("torch", "timm", "safetensors"):
            try:
                if importlib.util.find_spec(mod) is None:
                    return False, f"the torch backend needs {mod}: {_INSTALL}"
            except (ImportError, ValueError):
                return False, f"the torch backend needs {mod}: {_INSTALL}"
        if device == "cuda":
            from tbn_runtime.cuda import driver_gpu_count
            if not driver_gpu_count():  # asked without importing torch
                return False, "no CUDA device (the NVIDIA driver reports none; use --device cpu)"
            import torch
            if not torch.cuda.is_available():
                return False, (f"torch {torch.__version__} sees no CUDA device (a CPU build of "
                               f"torch?); use --device cpu")
        return True, "PyTorch"

    def __init__(self, export_dir: str, manifest: Manifest, device: str = "cpu",
                 streams: int = 1, cuda_graphs: bool = True, threads: Optional[int] = None,
                 precision: Optional[str] = None, fused_attention: bool = True,
                 tf32: bool = True, compile: bool = False, model: Any = None) -> None:
        super().__init__(export_dir, manifest, device, streams)
        ok, reason = self.available(device)
        if not ok:
            raise BackendError(reason)
        import torch

        from .checkpoint import CheckpointError, load_model
        from .models.backbones import cache_window_masks, set_fused_window_attention

        self._torch = torch
        if threads:  # torch's thread pool is the process's: one worker per process (Ray)
            torch.set_num_threads(int(threads))
        self.precision, self.precision_note = run_precision(manifest.precision, device,
                                                            precision)
        self.dtype = getattr(torch, _TORCH_DTYPES[self.precision])
        path = "the model given"
        if model is None:
            path = weights_path(export_dir, manifest)
            try:
                model, _ = load_model(path)
            except CheckpointError as e:
                raise BackendError(str(e)) from e
        if tuple(model.temporal_offsets) != tuple(manifest.temporal_offsets):
            raise BackendError(f"weights {path} have temporal offsets {model.temporal_offsets}, "
                               f"the manifest {manifest.temporal_offsets}; export again")
        self.tf32 = bool(tf32) and device == "cuda" and self.precision == "fp32"
        if device == "cuda":  # process-wide settings, said in describe()
            torch.set_float32_matmul_precision("high" if self.tf32 else "highest")
            torch.backends.cudnn.allow_tf32 = self.tf32
        self.dev = torch.device(device)
        self.masks_cached = cache_window_masks(model)
        fused = set_fused_window_attention(model, bool(fused_attention))
        self.fused_attention = bool(fused_attention) and fused > 0
        self.model = to_run_precision(model.to(self.dev).eval(), self.precision)
        # any batch runs here (max_batch bounds TensorRT's profiles): graphs per size up to this
        self.batch_limit = self.streams
        shape = tuple(int(d) for d in manifest.feature_shape)
        self._make_rings(lambda: torch.zeros(shape, dtype=self.dtype, device=self.dev))
        self._mean = torch.tensor(MEAN_RGB, dtype=torch.float32, device=self.dev).view(1, 3, 1, 1)
        self._std = torch.tensor(STD_RGB, dtype=torch.float32, device=self.dev).view(1, 3, 1, 1)
        self._feature_fn: Callable[[Any], Any] = self._features
        self._labels_fn: Callable[[Any, List[Any]], Any] = self._labels
        self.compiled = bool(compile)
        if compile:
            self._feature_fn = torch.compile(self._features, dynamic=False)
            self._labels_fn = torch.compile(self._labels, dynamic=False)
        self._graphs: Dict[int, Tuple[Any, ...]] = {}
        self._pool: Any = None
        self._pinned: Dict[int, Any] = {}
        #: batch size -> why its CUDA graph capture failed (that size runs eager)
        self.capture_failures: Dict[int, str] = {}
        self.use_graphs = device == "cuda" and bool(cuda_graphs)
        if device == "cuda":
            self.clock = _TorchEventClock(torch)
            self._pool = torch.cuda.graph_pool_handle()
            self._graph(1)  # capture the common case now, so that a failure shows at once

    @classmethod
    def from_model(cls, model: Any, height: int, width: int, device: str = "cpu",
                   streams: int = 1, max_batch: int = 8, **kwargs: Any) -> "TorchBackend":
        """A backend over a model in memory (no export: benchmarks and tests at the presets'
        sizes without an ONNX export). The backend takes the model over: its weights are
        converted in place to `precision=` (default fp32), run as asked whatever the CPU."""
        precision = kwargs.pop("precision", "fp32")
        mf = manifest_for(model, height, width, precision, max_batch)
        return cls("", mf, device, streams, model=model, precision=precision, **kwargs)

    # -- the two halves, in torch ---------------------------------------------------------------
    def _features(self, frame_u8: Any) -> Any:
        """uint8 n x H x W x 3 BGR tensor -> features (normalised exactly as normalize_bgr)."""
        x = frame_u8.flip(-1).permute(0, 3, 1, 2).float()
        x = ((x - self._mean) / self._std).to(self.dtype)
        return self.model.frame_features(x)

    def _labels(self, current: Any, past: List[Any]) -> Any:
        if self.precision == "bf16":  # the temporal half in fp32 (bf16 -> fp32 is exact)
            current, past = current.float(), [p.float() for p in past]
        logits = self.model.temporal_head(current, past, out_size=(self.height, self.width))
        return logits.argmax(1).to(self._torch.uint8)

    def _capture(self, n: int) -> Tuple[Any, ...]:
        torch = self._torch
        s_frame = torch.zeros((n, self.height, self.width, 3), dtype=torch.uint8, device=self.dev)
        slot = self.rings[0].storage[0]
        s_cur = torch.zeros((n,) + tuple(slot.shape[1:]), dtype=slot.dtype, device=self.dev)
        s_past = [torch.zeros_like(s_cur) for _ in self.offsets]

        def capture(fn: Callable[[], Any]) -> Tuple[Any, Any]:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):  # warm-up: cuDNN/cuBLAS choices, the window masks' cache
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
                out = fn()
            return graph, out

        g_feat, s_feat = capture(lambda: self._feature_fn(s_frame))
        g_temp, s_labels = capture(lambda: self._labels_fn(s_cur, s_past))
        return s_frame, g_feat, s_feat, s_cur, s_past, g_temp, s_labels

    def _graph(self, n: int) -> Optional[Tuple[Any, ...]]:
        """The CUDA graphs for batch size n (captured on first use), or None: eager."""
        if not self.use_graphs or n in self.capture_failures:
            return None
        if n not in self._graphs:
            try:
                self._graphs[n] = self._capture(n)
            except Exception as e:  # that size runs eager; said loudly, never silently
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                self.capture_failures[n] = f"{type(e).__name__}: {first}"
                log.warning("CUDA graph capture FAILED for batch %d (%s): that batch size runs "
                            "eager, slower", n, self.capture_failures[n])
                if self.device == "cuda":
                    self._torch.cuda.synchronize(self.dev)
                return None
        return self._graphs[n]

    @property
    def graph_note(self) -> str:
        if not self.use_graphs:
            return "eager"
        if self.capture_failures:
            sizes = ", ".join(map(str, sorted(self.capture_failures)))
            first = next(iter(self.capture_failures.values()))
            return f"CUDA GRAPH CAPTURE FAILED (batch {sizes}: {first}), eager"
        return f"CUDA graphs per batch size 1..{self.batch_limit}"

    def describe(self) -> str:
        prec = ("bf16 weights in the feature half, the temporal half in fp32"
                if self.precision == "bf16" else self.precision + " weights")
        if self.device == "cuda" and self.precision == "fp32":
            prec += ", TF32 matmuls and convolutions" if self.tf32 else ", TF32 off"
        parts = [prec, self.graph_note,
                 "fused attention" if self.fused_attention else "timm attention",
                 f"window masks cached ({self.masks_cached} blocks)"]
        if self.compiled:
            parts.append("torch.compile")
        if self.precision_note:
            parts.append(self.precision_note)
        parts.append(f"ring of {self.manifest.ring_size} tensors")
        if self.streams > 1:
            parts.append(f"{self.streams} streams batched")
        return f"torch {self._torch.__version__} on {self.device} ({', '.join(parts)})"

    def _to_device(self, frames: np.ndarray) -> Any:
        torch = self._torch
        x = torch.from_numpy(frames)
        if self.device != "cuda":
            return x
        n = frames.shape[0]
        pin = self._pinned.get(n)
        if pin is None:  # the previous copy has finished: labels or _synchronize waited
            pin = self._pinned[n] = torch.empty(tuple(frames.shape), dtype=torch.uint8,
                                                pin_memory=True)
        pin.copy_(x)
        return pin

    def _run_feature(self, frames: np.ndarray, slots: List[Any]) -> None:
        torch = self._torch
        with torch.inference_mode():
            x = self._to_device(frames)
            graph = self._graph(len(slots))
            if graph is not None:
                s_frame, g_feat, s_feat = graph[:3]
                s_frame.copy_(x, non_blocking=True)
                g_feat.replay()
                out = s_feat
            else:
                out = self._feature_fn(x.to(self.dev, non_blocking=True))
            for i, slot in enumerate(slots):
                slot.copy_(out[i:i + 1])

    def _run_temporal(self, current: List[Any], past: List[List[Any]]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            graph = self._graph(len(current))
            if graph is not None:
                s_cur, s_past, g_temp, s_labels = graph[3:]
                for i, slot in enumerate(current):
                    s_cur[i:i + 1].copy_(slot)
                    for dst, src in zip(s_past, past[i]):
                        dst[i:i + 1].copy_(src)
                g_temp.replay()
                labels = s_labels
            else:
                cur = torch.cat(current)
                columns = [torch.cat([p[k] for p in past]) for k in range(len(self.offsets))]
                labels = self._labels_fn(cur, columns)
            return labels.cpu().numpy()

    def _synchronize(self) -> None:
        if self.device == "cuda":
            self._torch.cuda.synchronize(self.dev)

    def close(self) -> None:
        self._graphs = {}
        self._pinned = {}
        self.model = None
        self.rings = []
