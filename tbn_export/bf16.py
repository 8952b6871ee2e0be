"""A bf16-typed feature graph, for the TensorRT engine of a bf16 export.

A bf16 export's files are fp32 graphs whose manifest asks the runtime to compute the feature
engine in bf16 (`compute_precision`): OpenVINO takes that as its inference precision and the
torch backend as its weights' dtype. A strongly typed TensorRT network (the only kind
TensorRT 11 builds: it removed the BF16 builder flag) computes what the graph's types say, so
its feature engine is built from a graph typed bf16. NVIDIA's ModelOpt AutoCast writes it (the
replacement TensorRT 11's migration notes name for the flag), with the same ops kept fp32 as
in an fp16 graph (tbn_export.fp16.FP32_OPS: LayerNorm, Softmax, reductions) and the
in-graph preprocessing fp32 (the mean and std are not exact in bf16); the inputs and outputs
keep their types: uint8 frames in, the fp32 feature out (the ring is the export's, fp32).

Why not ship this graph as the export's feature.onnx: OpenVINO computes the typed graph no
faster than the fp32 graph at its bf16 precision hint (measured on an AVX512-BF16 EPYC,
docs/performance.md), ONNX Runtime has no bf16 kernels for most of it, and one fp32 file is
the one graph `--verify` checks. This one is made where the engine is built and not kept.
"""

from __future__ import annotations

import logging
import re
from typing import Tuple

import numpy as np
import onnx

from .errors import ExportError
from .fp16 import FP32_OPS, preprocess_nodes

#: what AutoCast needs beyond onnx (ModelOpt's own `[onnx]` extra would replace onnxruntime
#: with onnxruntime-gpu and pin an older onnx, so the extra lists its pieces instead)
INSTALL = "pip install 'tbn-vit[trt-bf16]'"


def autocast_available() -> Tuple[bool, str]:
    """(True, "") where ModelOpt's AutoCast imports, else (False, why and the install line)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision  # noqa: F401
    except Exception as e:  # ImportError, or one of its own imports missing
        return False, (f"a TensorRT bf16 engine is built from a bf16-typed graph, which needs "
                       f"ModelOpt's AutoCast ({type(e).__name__}: {str(e).splitlines()[0]}): "
                       f"{INSTALL}")
    return True, ""


def convert_feature_graph(onnx_path: str) -> onnx.ModelProto:
    """The fp32 feature graph at onnx_path, typed bf16 but for FP32_OPS and preprocessing."""
    ok, why = autocast_available()
    if not ok:
        raise ExportError(why)
    from modelopt.onnx.autocast import convert_to_mixed_precision
    keep = preprocess_nodes(onnx.load(onnx_path, load_external_data=False))
    # AutoCast logs each of its steps to stdout through its own handler (and warnings about
    # the shared constants it duplicates and the opset converter it falls back to): errors
    # only, while it runs
    loggers = [logging.root] + [logging.getLogger(name)    # (the root: its opset notes)
                                for name in list(logging.root.manager.loggerDict)
                                if name.startswith(("modelopt", "onnxscript"))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        return convert_to_mixed_precision(
            onnx_path=onnx_path, low_precision_type="bf16", keep_io_types=True,
            op_types_to_exclude=list(FP32_OPS),
            nodes_to_exclude=[f"^{re.escape(name)}$" for name in keep],
            # bf16 has fp32's range: no node needs keeping fp32 for its values, so AutoCast
            # needs no reference run of the model to find them
            data_max=np.inf, init_max=np.inf)
    except Exception as e:  # AutoCast raises whatever its graph passes raise
        raise ExportError(f"ModelOpt AutoCast could not type {onnx_path} bf16 "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                          ) from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
