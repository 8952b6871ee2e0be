"""Export a model as two ONNX graphs (feature.onnx, temporal.onnx) plus manifest.json.

feature.onnx   frame uint8 [1, H, W, 3] BGR -> feature [1, C, h, w] (h = ceil32(H) / 8)
               BGR->RGB, float, (x - mean) / std and NHWC->NCHW happen inside the graph, exactly
               as tbn_runtime.preprocess.normalize_bgr does on the host.
temporal.onnx  current, past_3, past_6, past_9 (past_{k} for k in model.temporal_offsets, in
               that order; only `current` for image models) -> labels uint8 [1, H, W] (the
               argmax of the upsampled logits, computed without upsampling all K classes: see
               upsampled_argmax), plus logits float32 [1, K, H, W] with logits=True.

Shapes are static but for a batch axis (named "batch") on every input and output: one frame
per live stream (tbn-run --streams N; TensorRT builds an optimization profile of 1..max_batch).
The runtime pins it to 1 for a single stream (ONNX Runtime then folds the shape arithmetic it
costs away, as for a static graph). With fp16=True both graphs are converted by
tbn_export.fp16 (fp16 weights and arithmetic; LayerNorm, Softmax and reductions in fp32); the
feature then travels between the engines as float16, which halves the ring.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import shutil
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from tbn_runtime.classes import VSPW_CLASSES, make_palette
from tbn_runtime.files import atomic_write, sha256_file
from tbn_runtime.manifest import BATCH_AXIS, MAX_SIDE, Manifest
from tbn_runtime.preprocess import MEAN_RGB, STD_RGB

from .errors import ExportError

log = logging.getLogger("tbn_export")

#: opset 17 is the first with LayerNormalization as one op (kept fp32 by the fp16 pass, fused by
#: TensorRT); TensorRT 10 and 11 and onnxruntime >= 1.12 all read it.
OPSET = 17
MIN_SIZE = 32
FEATURE_ONNX = "feature.onnx"
TEMPORAL_ONNX = "temporal.onnx"
#: the checkpoint, copied into the export for the torch backend
WEIGHTS_FILE = "weights.safetensors"
#: ops a deployable graph must not contain (training-only, or not eval-folded).
TRAINING_OPS = ("Dropout", "BatchNormalization")


# -- the two deployable halves ---------------------------------------------------------------
class FeatureGraph(nn.Module):
    """uint8 [1, H, W, 3] BGR frame -> the frame's feature F_t (preprocessing in the graph)."""

    def __init__(self, model: nn.Module, mean: Sequence[float] = MEAN_RGB,
                 std: Sequence[float] = STD_RGB):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        # Cast first: TensorRT takes a uint8 network input only straight into a Cast to
        # float32/float16 (DataType.UINT8 in its API reference). Then NHWC->NCHW, BGR->RGB and
        # the same subtract-then-divide as normalize_bgr, so the two agree to float rounding.
        x = frame.float().permute(0, 3, 1, 2).flip(1)
        x = (x - self.mean) / self.std
        return self.model.frame_features(x)


#: classes upsampled_argmax interpolates per cell of four feature pixels. 8 of 124: on the
#: trained demo model (40 frames) labels agree with the full upsample + argmax on 100% of
#: pixels (4: 99.72%, 6: 99.999%); the time it saves is in the README's profile.
LABEL_CANDIDATES = 8


def upsampled_argmax(logits: torch.Tensor, out_size: Tuple[int, int], stride: int,
                     candidates: int = LABEL_CANDIDATES) -> torch.Tensor:
    """argmax over classes of the logits bilinearly upsampled by `stride` (align_corners=False,
    as VideoSegmenter.upsample) and cropped to out_size, without upsampling every class.

    Upsampling 124 class maps to the full frame and reading them back for the argmax cost more
    than the temporal engine's convolutions (ORT profile in the README). Every output pixel
    lies in a cell between four feature pixels (the borders replicated, which is what clamping
    the source coordinate does) and is a convex combination of those four. A class can win
    there only if its largest corner value is high, so per cell the `candidates` classes with
    the largest corner maximum are interpolated, with the fixed stride x stride weights of the
    cell, and the best one is taken. Where the four corners agree on the winner the result is
    exact; at class boundaries it is exact unless more than `candidates` classes compete.
    Returns int64 labels [B, H, W].
    """
    b, c, h, w = logits.shape
    k, s = min(int(candidates), c), int(stride)
    padded = F.pad(logits, (1, 1, 1, 1), mode="replicate")            # [b, c, h+2, w+2]
    corner_max = F.max_pool2d(padded, 2, stride=1)                       # [b, c, h+1, w+1]
    cand = corner_max.topk(k, dim=1).indices                             # [b, k, h+1, w+1]
    # The corner (dy, dx) of cell (i, j) is padded[..., i + dy, j + dx]. Gather from the whole
    # padded map with the candidates shifted into place, then crop (the same values): gathering
    # from a crop of it, OpenVINO (2026.4) folds the crop that starts at 0 into the gather and
    # then refuses the smaller index ("data and indices must have equal or intersecting
    # dimensions"); with data and indices of one shape there is nothing to fold.
    corners = [torch.gather(padded, 1, F.pad(cand, (dx, 1 - dx, dy, 1 - dy)))
               [:, :, dy:dy + h + 1, dx:dx + w + 1] for dy in (0, 1) for dx in (0, 1)]
    values = torch.stack(corners, 2).flatten(3)                          # [b, k, 4, cells]
    # Output pixel x sits at (x + 0.5) / s + 0.5 in padded coordinates: cell floor(.), and
    # sub-pixel t = 0..s-1 of a cell (the cell starts at x = s * cell - s // 2) has fraction:
    t = torch.arange(s, dtype=torch.float64)
    frac = (t - s // 2 + 0.5) / s + 0.5
    fy = frac.view(s, 1).expand(s, s).reshape(-1)
    fx = frac.view(1, s).expand(s, s).reshape(-1)
    weights = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], 1)
    interp = torch.matmul(weights.to(logits.dtype), values)              # [b, k, s*s, cells]
    best = interp.argmax(1)                                              # [b, s*s, cells]
    cells = (h + 1) * (w + 1)
    labels = torch.gather(cand.flatten(1), 1, (best * cells + torch.arange(cells)).flatten(1))
    labels = labels.view(b, s, s, h + 1, w + 1).permute(0, 3, 1, 4, 2)
    labels = labels.reshape(b, (h + 1) * s, (w + 1) * s)
    o = s // 2
    return labels[:, o:o + out_size[0], o:o + out_size[1]]


class TemporalGraph(nn.Module):
    """F_t and the past features (offsets order) -> uint8 labels [1, H, W] (+ float logits)."""

    def __init__(self, model: nn.Module, height: int, width: int, logits: bool = False):
        super().__init__()
        self.model = model
        self.out_size = (int(height), int(width))
        self.with_logits = logits

    def forward(self, current: torch.Tensor, *past: torch.Tensor):
        # The classifier's logits at feature scale (temporal_head = _head + upsample); the
        # labels come from them directly, the full-size logits only when asked for.
        small = self.model._head(current, list(past))
        labels = upsampled_argmax(small, self.out_size, self.model.feature_stride)
        # Train ids fit a byte, so uint8 labels leave the graph; the detour through float is
        # for TensorRT, which converts to uint8 only from float32/float16 (not from int64).
        labels = labels.to(small.dtype).to(torch.uint8)
        if self.with_logits:
            return labels, self.model.upsample(small, self.out_size).float()
        return labels


# -- helpers -------------------------------------------------------------------------------------
def check_export_size(height: int, width: int) -> Tuple[int, int]:
    """Validate an export size: integers >= 32 (the graph pads to a multiple of 32 itself)."""
    try:
        h, w = int(height), int(width)
    except (TypeError, ValueError):
        raise ExportError(f"export size must be integers, got {height!r} x {width!r}") from None
    if h != height or w != width:
        raise ExportError(f"export size must be integers, got {height!r} x {width!r}")
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ExportError(f"export size {h}x{w} is too small: height and width must be at least "
                          f"{MIN_SIZE} (any size >= {MIN_SIZE} works; the graph pads to 32)")
    if h > MAX_SIDE or w > MAX_SIDE:  # the runtime refuses a manifest beyond it
        raise ExportError(f"export size {h}x{w} is too large: height and width must be at most "
                          f"{MAX_SIDE} (the runtime refuses larger exports)")
    return h, w


def feature_shape_of(model: nn.Module, height: int, width: int) -> List[int]:
    """[1, C, ceil32(H)/s, ceil32(W)/s] for the model's feature_chs and feature_stride."""
    d, s = model.size_divisor, model.feature_stride
    ph, pw = -(-height // d) * d, -(-width // d) * d
    return [1, int(model.feature_chs), ph // s, pw // s]


def class_vocabulary(num_classes: int) -> Tuple[List[str], List[List[int]]]:
    """Class names and RGB palette for the manifest (VSPW's 124, else generic names)."""
    if num_classes == len(VSPW_CLASSES):
        names = list(VSPW_CLASSES)
    else:
        names = [f"class_{i}" for i in range(num_classes)]
    palette = make_palette(max(256, num_classes))[:num_classes]
    return names, [[int(c) for c in rgb] for rgb in palette]


def package_versions() -> Dict[str, Optional[str]]:
    """Versions of the libraries the export was made with (None where absent)."""
    versions: Dict[str, Optional[str]] = {"torch": torch.__version__, "onnx": onnx.__version__}
    for name in ("onnxruntime", "onnxslim", "onnxconverter_common", "timm", "tensorrt"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "unknown")
        except Exception:  # absent, or a broken install (tensorrt without its libraries)
            versions[name] = None
    return versions


#: the default largest batch (streams batched in one engine call) of the TensorRT profile
MAX_BATCH = 8


def _torch_onnx_export(module: nn.Module, args: Tuple[torch.Tensor, ...], input_names: List[str],
                       output_names: List[str]) -> onnx.ModelProto:
    buf = io.BytesIO()
    kwargs = dict(input_names=input_names, output_names=output_names, opset_version=OPSET,
                  dynamic_axes={name: {0: BATCH_AXIS} for name in input_names + output_names},
                  do_constant_folding=True, export_params=True,
                  training=torch.onnx.TrainingMode.EVAL)
    # The TorchScript exporter (dynamo=False): it exists from torch 2.4 to 2.14, needs nothing
    # beyond torch, folds eval-mode BatchNorm into the convolutions and traces the static shapes
    # we want. The dynamo exporter needs onnxscript (not a dependency), and torch 2.4 has no
    # `dynamo` argument at all (it was added in 2.5; from 2.9 it defaults to True), hence the
    # signature check.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of the TorchScript exporter
        with torch.no_grad():
            torch.onnx.export(module, args, buf, **kwargs)
    return onnx.load_from_string(buf.getvalue())


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim (constant folding, dead-node removal, shape inference); if it is missing or
    fails, the graph as exported (valid: the TorchScript exporter already folds constants)."""
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim is not installed: the graphs are written as exported, not "
                    "simplified (pip install 'tbn-vit[export]')")
        return model

    try:
        slim = onnxslim.slim(model)
    except Exception as e:  # a slim failure must not lose the export
        log.warning("onnxslim failed (%s: %s); keeping the graph as exported",
                    e.__class__.__name__, e)
        return model
    return slim if isinstance(slim, onnx.ModelProto) else model


def check_graph(model: onnx.ModelProto, name: str) -> None:
    """onnx.checker plus: no training-only nodes."""
    onnx.checker.check_model(model)
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in TRAINING_OPS})
    if bad:
        raise ExportError(f"{name} contains training-only nodes {bad}; export the model in eval "
                          f"mode")


def save_onnx(model: onnx.ModelProto, path: str) -> None:
    """Write an ONNX graph atomically (the int8 pass saves its graph with it too)."""
    atomic_write(path, lambda tmp: onnx.save_model(model, tmp))


def _declare_output_shapes(model: onnx.ModelProto, shapes: Dict[str, List[int]]) -> None:
    """Write the static sizes of the outputs (all but the batch axis) into the graph: shape
    inference through the upsample of a batch-agnostic graph leaves them symbolic, and
    TensorRT and the runtime read the output sizes from the graph."""
    for out in model.graph.output:
        if out.name in shapes:
            dims = out.type.tensor_type.shape.dim
            for d, size in zip(list(dims)[1:], shapes[out.name][1:]):
                d.ClearField("dim_param")
                d.dim_value = int(size)


def _fix_output_dtype(model: onnx.ModelProto, name: str, elem_type: int) -> None:
    """Make graph output `name` elem_type, appending a Cast where the fp16 pass changed it."""
    for out in model.graph.output:
        if out.name == name and out.type.tensor_type.elem_type != elem_type:
            inner = name + "_before_cast"
            for node in model.graph.node:
                node.output[:] = [inner if o == name else o for o in node.output]
                node.input[:] = [inner if i == name else i for i in node.input]
            model.graph.node.append(onnx.helper.make_node(
                "Cast", [inner], [name], to=elem_type, name=name + "_cast"))
            out.type.tensor_type.elem_type = elem_type


# -- the export ------------------------------------------------------------------------------------
#: what a bf16 export's engines compute in. The graphs stay fp32 and the runtime is told the
#: precision: OpenVINO's bf16 is a setting on a float graph (INFERENCE_PRECISION_HINT; its CPU
#: plugin chooses which ops run in bf16), PyTorch casts its weights, and ONNX Runtime, which
#: has no bf16 CPU kernels, would gain nothing from a bf16-typed file; one fp32 file is also
#: one verified graph. (A TensorRT bf16 engine, strongly typed, would need a bf16-typed graph:
#: not built.) The temporal graph stays fp32, as for int8: its label arithmetic (the
#: interpolation and the argmax over close logits) is what an 8-bit mantissa hurts most.
BF16_COMPUTE = {"graph": "fp32", "feature": "bf16", "temporal": "fp32"}


def _feature_onnx(model: nn.Module, height: int, width: int
                  ) -> Tuple[onnx.ModelProto, torch.Tensor, List[int]]:
    """The feature graph traced and simplified; (graph, a feature it gives, its shape)."""
    feature_graph = FeatureGraph(model).eval()
    frame = torch.randint(0, 256, (1, height, width, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feature = feature_graph(frame)
    expected = feature_shape_of(model, height, width)
    if list(feature.shape) != expected:
        raise ExportError(f"{model.__class__.__name__}.frame_features gives {list(feature.shape)} "
                          f"at {height}x{width}, expected {expected}")
    return (simplify(_torch_onnx_export(feature_graph, (frame,), ["frame"], ["feature"])),
            feature, expected)


def _temporal_onnx(model: nn.Module, feature: torch.Tensor, past_names: List[str], height: int,
                   width: int, logits: bool) -> onnx.ModelProto:
    """The temporal graph traced on `feature` (as current and every past input), simplified."""
    temporal_graph = TemporalGraph(model, height, width, logits=logits).eval()
    inputs = (feature,) + tuple(feature.clone() for _ in past_names)
    out_names = ["labels", "logits"] if logits else ["labels"]
    temp_onnx = simplify(_torch_onnx_export(temporal_graph, inputs, ["current"] + past_names,
                                            out_names))
    _declare_output_shapes(temp_onnx, {"labels": [1, height, width],
                                       "logits": [1, int(model.num_classes), height, width]})
    return temp_onnx


def export_onnx(model: nn.Module, out_dir: str, height: int, width: int, fp16: bool = False,
                logits: bool = False, checkpoint_path: Optional[str] = None,
                max_batch: int = MAX_BATCH, bf16: bool = False,
                bundle_weights: bool = True) -> Manifest:
    """Write feature.onnx, temporal.onnx and manifest.json for `model` into out_dir.

    bf16=True: fp32 graphs whose manifest asks the runtime to compute the feature engine in
    bf16 (BF16_COMPUTE); precision "bf16".
    With checkpoint_path, the checkpoint is copied in as weights.safetensors (listed with its
    sha256; the manifest's checkpoint "file"), so that a copied export runs on the torch
    backend anywhere; bundle_weights=False records only the checkpoint's path and sha256.

    The model is put in eval mode. The files are written in place (each one atomically); the
    CLI exports into a temporary directory and renames it, so a whole export appears at once.
    """
    height, width = check_export_size(height, width)
    if fp16 and bf16:
        raise ExportError("fp16 and bf16 exclude each other; choose one")
    # The auxiliary training heads (aux16/aux32) are not on the path frame_features ->
    # temporal_head, so tracing leaves them out; check_graph rejects training-only nodes.
    model = model.eval()
    offsets = [int(k) for k in getattr(model, "temporal_offsets", ())]
    past_names = [f"past_{k}" for k in offsets]
    os.makedirs(out_dir, exist_ok=True)

    feat_onnx, feature, expected = _feature_onnx(model, height, width)
    temp_onnx = _temporal_onnx(model, feature, past_names, height, width, logits)

    feature_dtype = "float32"
    if fp16:
        from .fp16 import convert_feature_graph, convert_temporal_graph
        feat_onnx = convert_feature_graph(feat_onnx)
        temp_onnx = convert_temporal_graph(temp_onnx)
        if logits:
            _fix_output_dtype(temp_onnx, "logits", onnx.TensorProto.FLOAT)
        feature_dtype = "float16"

    check_graph(feat_onnx, FEATURE_ONNX)
    check_graph(temp_onnx, TEMPORAL_ONNX)
    save_onnx(feat_onnx, os.path.join(out_dir, FEATURE_ONNX))
    save_onnx(temp_onnx, os.path.join(out_dir, TEMPORAL_ONNX))

    names, palette = class_vocabulary(int(model.num_classes))
    checkpoint: Dict[str, Any] = {"path": None, "sha256": None}
    if checkpoint_path is not None:
        checkpoint = {"path": os.path.abspath(checkpoint_path),
                      "sha256": sha256_file(checkpoint_path)}
        if bundle_weights:  # the torch backend's weights travel with the export
            dst = os.path.join(out_dir, WEIGHTS_FILE)
            if not (os.path.exists(dst) and os.path.samefile(dst, checkpoint_path)):
                atomic_write(dst, lambda tmp: shutil.copyfile(checkpoint_path, tmp))
            checkpoint["file"] = WEIGHTS_FILE
    manifest = Manifest(
        model=str(getattr(model, "model_name", model.__class__.__name__)),
        num_classes=int(model.num_classes),
        class_names=names,
        palette=palette,
        height=height,
        width=width,
        mean=[float(v) for v in MEAN_RGB],
        std=[float(v) for v in STD_RGB],
        feature_shape=expected,
        feature_dtype=feature_dtype,
        temporal_offsets=offsets,
        precision="fp16" if fp16 else "bf16" if bf16 else "fp32",
        compute_precision=dict(BF16_COMPUTE) if bf16 else None,
        past_inputs=past_names,
        logits_output="logits" if logits else None,
        max_batch=int(max_batch),
        checkpoint=checkpoint,
        versions=package_versions(),
    )
    manifest.add_file(out_dir, FEATURE_ONNX)
    manifest.add_file(out_dir, TEMPORAL_ONNX)
    if checkpoint.get("file"):
        manifest.add_file(out_dir, WEIGHTS_FILE)
    manifest.save(out_dir)
    return manifest
