"""INT8 feature graphs: explicit Q/DQ nodes from ONNX Runtime's static quantizer, calibrated on
frames decoded from real video.

TensorRT 11 has no INT8 builder flag or calibrator: INT8 is QuantizeLinear/DequantizeLinear
pairs in the ONNX graph (explicit quantization), and ONNX Runtime's CPU provider fuses the same
pairs into integer kernels. One feature.onnx serves both, so the settings are TensorRT's:

- symmetric signed INT8 for activations and weights (zero point 0; TensorRT takes nothing
  else), weights per tensor, biases float, ranges by MinMax calibration;
- Q/DQ on the inputs of Conv and of the MatMuls with a weight (Swin's qkv, proj, fc1, fc2,
  patch merging). MatMul outputs stay float (ONNX Runtime: MatMulIntegerToFloat; TensorRT: an
  INT8 GEMM with a float output), Conv outputs are quantized too (ONNX Runtime's QLinearConv
  needs the output Q; TensorRT fuses the pair);
- float, because they cost accuracy or gain nothing: LayerNorm, Softmax, GELU, the residual
  Adds and every other elementwise op, and the attention products q @ k^T and attn @ v (two
  activations; measured on this CPU: keeping them float is faster as well as more exact).
- float too: the fusion module's Conv over the Concat of both paths, which OpenVINO computes
  wrongly when it is quantized (`concat_convs`): one int8 graph that both CPU engines agree on.

Measured on the trained demo model (tbn-synth val, 120 frames): labels agree with the fp32
graph on 99.82% of pixels. The temporal engine stays float (fp32 or fp16).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np
import onnx

from tbn_runtime.preprocess import resize_frame

from .errors import Int8Error

#: op types whose inputs get Q/DQ.
QUANTIZED_OPS = ("Conv", "MatMul")
#: op types that must stay float in the INT8 graph (checked by check_float_ops and the tests).
FLOAT_OPS = ("LayerNormalization", "Softmax", "Erf", "Gelu", "Add", "Div", "Sub", "Mul",
             "Sigmoid")
CALIB_METHODS = ("minmax", "entropy", "percentile")
#: frames between two calibration frames of a video: neighbours add little information.
CALIB_STRIDE = 5
DEFAULT_CALIB_FRAMES = 64


# -- calibration frames ------------------------------------------------------------------------
@dataclass
class CalibrationFrames:
    """Frames to calibrate on, and consecutive frames calibration did not see (for --verify)."""

    frames: List[np.ndarray]
    source: str
    videos: List[str]
    held_out: List[np.ndarray] = field(default_factory=list)
    held_out_from: str = ""

    def record(self) -> Dict[str, Any]:
        return {"source": os.path.abspath(self.source) if os.path.exists(self.source)
                else self.source, "frames": len(self.frames), "videos": len(self.videos),
                "stride": CALIB_STRIDE}


def read_calibration(source: str, n: int, height: int, width: int,
                     held_out: int = 0) -> CalibrationFrames:
    """n frames of `source` (anything tbn_runtime.sources.open_source reads, or a VSPW split list
    such as ROOT/train.txt) at the export size: every CALIB_STRIDE-th frame, spread over up to
    n videos evenly chosen from the source.

    With held_out > 0, also `held_out` consecutive frames calibration does not see: the last
    video's first frames when the source has several videos (that video is then not used for
    calibration), else the frames after the last calibration frame of the only video.
    """
    from tbn_runtime.sources import SourceError, open_source

    if n < 1:
        raise Int8Error(f"--calib-frames must be >= 1, got {n}")
    try:
        videos = open_source(source)   # a split list (ROOT/train.txt): that split's videos
    except SourceError as e:
        raise Int8Error(f"cannot read calibration source {source}: {e}") from None
    videos = [v for v in videos if v.kind in ("file", "frames")]
    if not videos:
        raise Int8Error(f"calibration source {source} holds no video files or frame folders")
    holdout_video = videos.pop() if held_out and len(videos) > 1 else None
    if len(videos) > n:  # n videos, evenly spread over the source
        videos = [videos[round(i * (len(videos) - 1) / max(n - 1, 1))] for i in range(n)]
    quota = math.ceil(n / len(videos))
    frames: List[np.ndarray] = []
    names: List[str] = []
    rest: List[np.ndarray] = []
    try:
        for v in videos:
            taken = 0
            with contextlib.closing(v.frames()) as it:  # closes the decoder when done early
                for i, (_, frame) in enumerate(it):
                    if taken < quota and len(frames) < n:
                        if i % CALIB_STRIDE == 0:
                            frames.append(resize_frame(frame, height, width))
                            taken += 1
                    elif (holdout_video is None and held_out and v is videos[-1]
                          and len(rest) < held_out):
                        rest.append(resize_frame(frame, height, width))
                    else:
                        break
            if taken:
                names.append(v.name)
        if holdout_video is not None:
            with contextlib.closing(holdout_video.frames()) as it:
                for _, (_, frame) in zip(range(held_out), it):
                    rest.append(resize_frame(frame, height, width))
    except SourceError as e:
        raise Int8Error(f"cannot read calibration source {source}: {e}") from None
    if not frames:
        raise Int8Error(f"no frames could be decoded from calibration source {source}")
    where = (f"{holdout_video.name} (not used for calibration)" if holdout_video is not None
             else f"{videos[-1].name} after its calibration frames")
    return CalibrationFrames(frames, source, names, rest, where)


# -- quantization --------------------------------------------------------------------------------
def activation_matmuls(model: onnx.ModelProto) -> List[str]:
    """MatMuls whose inputs are both activations (attention's q @ k^T and attn @ v)."""
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


def concat_convs(model: onnx.ModelProto) -> List[str]:
    """Convs that read a Concat (the fusion module's conv over [spatial, context]): kept float.

    Its input joins two branches quantized at different scales, and OpenVINO 2026.4 computes
    the quantized form wrongly: on the demo model its features came out 0.18 (relative) off
    where ONNX Runtime's were 0.02, labels 98.8% equal to PyTorch on the val split and mVC16
    5.9 points down (0.79 off on a random tbn_tiny; bypassing any other group of Q/DQ pairs
    changed little). With this conv in float both engines agree on the labels (99.9%). One
    conv at 1/8 resolution, no slower measured (docs/performance.md)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "Conv" and n.input[0] in producer
            and producer[n.input[0]].op_type == "Concat"]


def settings(method: str = "minmax") -> Dict[str, Any]:
    """The quantizer and its settings, as the manifest records them."""
    return {
        "quantizer": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activations": "int8 symmetric (zero point 0), per tensor",
        "weights": "int8 symmetric (zero point 0), per tensor; biases float",
        "calibration_method": method,
        "quantized_ops": list(QUANTIZED_OPS),
        "float_ops": "LayerNorm, Softmax, GELU, residual Adds, attention products q@k^T and "
                     "attn@v, the Convs reading a Concat (the fusion module's), preprocessing",
        "matmul_output": "float",
    }


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # quantize_static logs through the root logger ("consider pre-processing", per-node notes).
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


class _FrameReader:
    """onnxruntime's CalibrationDataReader protocol over uint8 frames."""

    def __init__(self, frames: Sequence[np.ndarray], input_name: str):
        self._it = iter(frames)
        self._name = input_name

    def get_next(self):
        frame = next(self._it, None)
        return None if frame is None else {self._name: frame[None]}

    def __iter__(self):  # the protocol's iteration form (used by some calibrators)
        return iter(self.get_next, None)


def quantize_feature_graph(model: onnx.ModelProto, frames: Sequence[np.ndarray],
                           method: str = "minmax") -> onnx.ModelProto:
    """The fp32 feature graph with Q/DQ nodes (settings above), calibrated on `frames`."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise Int8Error(f"unknown calibration method {method!r}; choose from "
                        f"{', '.join(CALIB_METHODS)}")
    if not frames:
        raise Int8Error("no calibration frames")
    input_name = model.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="tbn-int8-") as tmp, _quiet_quantizer():
        out = os.path.join(tmp, "feature.int8.onnx")
        try:
            quantize_static(
                model, out, _FrameReader(frames, input_name),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_exclude=activation_matmuls(model) + concat_convs(model),
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=False,
                calibrate_method=methods[method],
                extra_options={
                    "ActivationSymmetric": True,   # zero point 0: what TensorRT takes
                    "WeightSymmetric": True,
                    # float MatMul outputs: MatMulIntegerToFloat in ORT, the Q/DQ placement
                    # TensorRT recommends (inputs of the GEMMs only)
                    "OpTypesToExcludeOutputQuantization": ["MatMul"],
                    # float biases: TensorRT dequantizes only INT8 (not an int32 bias); ONNX
                    # Runtime still fuses DQ -> Conv(float bias) -> Q into QLinearConv
                    "QuantizeBias": False,
                })
        except Exception as e:  # the quantizer raises whatever its internals raise
            raise Int8Error(f"quantization failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from e
        return onnx.load(out)


# -- checks -------------------------------------------------------------------------------------
def _initializers(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    from onnx import numpy_helper
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(a.t)
    return values


def tensorrt_qdq_problems(model: onnx.ModelProto) -> List[str]:
    """Why the Q/DQ graph is not explicit-quantization input TensorRT takes ([] if it is):
    every Q/DQ must have a constant positive scale and a constant int8 zero point of 0."""
    values = _initializers(model)
    problems = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = values.get(n.input[1])
        if scale is None or not np.all(scale > 0):
            problems.append(f"{n.name}: scale is not a positive constant")
        zp = values.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            continue  # no zero point: uint8 by the ONNX default, unless the input says int8
        if zp.dtype != np.int8:
            problems.append(f"{n.name}: zero point is {zp.dtype}, TensorRT needs int8")
        elif np.any(zp != 0):
            problems.append(f"{n.name}: zero point {zp.ravel()[:3]} is not 0 (TensorRT "
                            f"quantizes symmetrically)")
    return problems


def int8_ops(model: onnx.ModelProto) -> Dict[str, int]:
    """Op types the runtime computes in INT8, with counts: Conv/MatMul/Gemm that read a
    DequantizeLinear output, and any other op between DQ inputs and Q outputs (the pattern
    ONNX Runtime fuses into a QLinear op and TensorRT runs in INT8)."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    readers: Dict[str, List[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    counts: Dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or not any(
                i in dq_out for i in n.input):
            continue
        outs = [r for o in n.output for r in readers.get(o, [])]
        if n.op_type in ("Conv", "MatMul", "Gemm") or (
                outs and all(r.op_type == "QuantizeLinear" for r in outs)):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def qdq_summary(model: onnx.ModelProto) -> Dict[str, Any]:
    """Q/DQ counts, the INT8 op types (int8_ops) and those of FLOAT_OPS among them (none)."""
    ops = [n.op_type for n in model.graph.node]
    int8 = int8_ops(model)
    return {"QuantizeLinear": ops.count("QuantizeLinear"),
            "DequantizeLinear": ops.count("DequantizeLinear"),
            "int8_ops": int8,
            "float_ops_in_int8": sorted(op for op in int8 if op in FLOAT_OPS)}


# -- the export -------------------------------------------------------------------------------------
def quantize_export(export_dir: str, calib: CalibrationFrames, method: str = "minmax"):
    """Replace the fp32 feature.onnx of export_dir by its INT8 Q/DQ graph; the manifest records
    precision int8, the quantizer, its settings and the calibration. Returns the manifest."""
    from tbn_runtime.manifest import load_manifest

    from .onnx_export import FEATURE_ONNX, save_onnx, check_graph

    manifest = load_manifest(export_dir)
    if manifest.precision != "fp32":
        raise Int8Error(f"INT8 is quantized from an fp32 export, not {manifest.precision}")
    path = os.path.join(export_dir, FEATURE_ONNX)
    fp32 = onnx.load(path)
    quantized = quantize_feature_graph(fp32, calib.frames, method)
    check_graph(quantized, FEATURE_ONNX)
    problems = tensorrt_qdq_problems(quantized)
    if problems:
        raise Int8Error(f"the quantized graph is not TensorRT explicit-quantization input: "
                        f"{problems[0]} ({len(problems)} such nodes)")
    summary = qdq_summary(quantized)
    if summary["float_ops_in_int8"]:
        raise Int8Error(f"the quantizer put {summary['float_ops_in_int8']} in INT8, which "
                        f"must stay float")
    save_onnx(quantized, path)
    manifest.precision = "int8"
    manifest.quantization = {**settings(method), "calibration": calib.record(),
                             "qdq": {k: summary[k] for k in ("QuantizeLinear",
                                                             "DequantizeLinear",
                                                             "int8_ops")}}
    manifest.add_file(export_dir, FEATURE_ONNX)
    manifest.save(export_dir)
    return manifest
