"""The bf16-typed feature graph a TensorRT bf16 engine is built from (tbn_export.bf16, ModelOpt
AutoCast), checked on the CPU: what is bf16 and what stays fp32, the graph's inputs and outputs,
its values in OpenVINO against the fp32 graph, and the engine build's choice of graph (the
build itself runs in tests/test_cuda.py where TensorRT and a GPU are).

A random-init tbn_tiny (BatchNorm statistics randomised) at 64 x 96.
"""

import os

import numpy as np
import onnx
import pytest

from export_helpers import TINY_H, TINY_W, checkpoint, tiny  # noqa: F401 (fixtures)
from runtime_helpers import synthetic_frames
from tbn_export import tensorrt_build
from tbn_export.bf16 import autocast_available, convert_feature_graph
from tbn_export.fp16 import FP32_OPS, preprocess_nodes
from tbn_export.onnx_export import export_onnx
from tbn_runtime.manifest import load_manifest

pytestmark = pytest.mark.skipif(not autocast_available()[0], reason=autocast_available()[1])
BF16, FP32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def exports(tiny, checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = str(root / precision)
        export_onnx(tiny, out[precision], TINY_H, TINY_W, bf16=precision == "bf16",
                    checkpoint_path=checkpoint)
    return out


@pytest.fixture(scope="module")
def typed(exports):
    return convert_feature_graph(os.path.join(exports["bf16"], "feature.onnx"))


def _types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) +
             list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


def test_weights_are_bf16_and_the_sensitive_ops_fp32(typed, exports):
    types = _types(typed)
    inits = {i.name for i in typed.graph.initializer}
    # the graph's own inputs and outputs as exported: uint8 frames in, the fp32 feature out
    assert [types[i.name] for i in typed.graph.input] == [onnx.TensorProto.UINT8]
    assert [types[o.name] for o in typed.graph.output] == [FP32]
    weights = [n.input[1] for n in typed.graph.node
               if n.op_type in ("Conv", "MatMul") and n.input[1] in inits]
    assert len(weights) >= 10 and all(types[w] == BF16 for w in weights)
    computed = [n for n in typed.graph.node if n.op_type in ("Conv", "MatMul")]
    assert computed and all(types[n.output[0]] == BF16 for n in computed)
    kept = [n for n in typed.graph.node if n.op_type in FP32_OPS]
    assert {n.op_type for n in kept} >= {"LayerNormalization", "Softmax"}
    assert all(types[n.input[0]] == FP32 and types[n.output[0]] == FP32 for n in kept)
    # the preprocessing (mean, std) stays fp32
    fp32_graph = onnx.load(os.path.join(exports["bf16"], "feature.onnx"))
    pre = set(preprocess_nodes(fp32_graph))
    assert all(types[o] == FP32 for n in typed.graph.node if n.name in pre
               for o in n.output if n.op_type in ("Sub", "Div"))


def test_its_values_are_the_fp32_graphs_within_bf16(typed, exports, tmp_path):
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed")
    path = str(tmp_path / "typed.onnx")
    onnx.save(typed, path)
    core = ov.Core()
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    ref = core.compile_model(os.path.join(exports["fp32"], "feature.onnx"), "CPU", f32)
    got = core.compile_model(path, "CPU", f32)   # the typed graph's own bf16 roundings
    for frame in synthetic_frames(4, TINY_H, TINY_W, seed=3):
        r, g = (np.asarray(m({"frame": frame[None]})[m.outputs[0]]) for m in (ref, got))
        rel = float(np.abs(r - g).max() / np.abs(r).max())
        assert 1e-4 < rel < 5e-2, rel   # bf16 rounding, not fp32, and not broken


def test_the_engine_build_takes_the_typed_graph_only_for_bf16(exports):
    fp32, bf16 = load_manifest(exports["fp32"]), load_manifest(exports["bf16"])
    assert tensorrt_build.builds_bf16(bf16, "feature.onnx")
    assert not tensorrt_build.builds_bf16(bf16, "temporal.onnx")
    assert not tensorrt_build.builds_bf16(fp32, "feature.onnx")
    source = os.path.join(exports["bf16"], "feature.onnx")
    with tensorrt_build._typed_graph(source, False) as path:
        assert path == source
    with pytest.raises(RuntimeError, match="build failed"):
        with tensorrt_build._typed_graph(source, True) as path:
            assert path != source and os.path.basename(path).startswith(".tbn-")
            assert onnx.load(path).graph.initializer[0] is not None
            kept = path
            raise RuntimeError("build failed")
    assert not os.path.exists(kept)   # removed when the build fails too
    assert not [f for f in os.listdir(exports["bf16"]) if f.startswith(".tbn-")]
