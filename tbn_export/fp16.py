"""fp16 ONNX graphs for a strongly typed TensorRT build (precision lives in the graph).

Weights and arithmetic become float16 except the ops in FP32_OPS: LayerNormalization (Swin's
LayerNorm overflows in fp16), Softmax and every reduction, which onnxconverter-common keeps in
float32 behind Cast nodes. The inputs and outputs keep their types where they are not float:
the uint8 frame goes in and uint8 labels come out. The feature between the two graphs becomes
float16 (half the ring), so the temporal graph takes float16 inputs. In the feature graph the
preprocessing (Cast, Sub mean, Div std) stays float32 too: mean/std are not exact in fp16.
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Set

import onnx

#: op types that stay float32 in an fp16 graph.
FP32_OPS = (
    "LayerNormalization", "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    # ops onnxconverter-common lists as unsafe in fp16 that could appear in a traced graph
    "Range", "CumSum", "TopK", "NonMaxSuppression", "RoiAlign",
)


def preprocess_nodes(model: onnx.ModelProto) -> List[str]:
    """Nodes of the feature graph that belong to the in-graph preprocessing.

    The exported graph is topologically sorted and starts with FeatureGraph's preprocessing:
    Transpose, Slice (BGR->RGB), Cast, Sub(mean), Div(std). It ends at the node that reads the
    `std` initializer; everything up to it is preprocessing.
    """
    names: List[str] = []
    for node in model.graph.node:
        names.append(node.name)
        if "std" in node.input:
            return names
    raise ValueError("feature graph has no node reading the 'std' initializer: not a graph "
                     "exported by tbn_export.onnx_export.FeatureGraph")


def _fix_cast_value_info(model: onnx.ModelProto) -> None:
    """Make the value_info of every Cast output agree with its `to` attribute.

    onnxconverter-common leaves a stale float32 value_info on the output of the Cast it puts
    after a blocked node, which onnxruntime rejects at load time ("Type (tensor(float)) of
    output arg ... does not match expected type (tensor(float16))").
    """
    cast_to = {}
    for node in model.graph.node:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            cast_to[node.output[0]] = to
    for value in list(model.graph.value_info) + list(model.graph.output):
        if value.name in cast_to:
            value.type.tensor_type.elem_type = cast_to[value.name]


def _unshare_initializers(model: onnx.ModelProto, blocked: Set[str]) -> None:
    """Give fp32 (blocked) consumers their own copy of initializers shared with fp16 ones.

    The exporter and onnxslim deduplicate equal constants, so e.g. one zero bias can feed both a
    Conv and a LayerNormalization; onnxconverter-common then keeps it float32 for both and the
    Conv ends up with mixed input types, which onnxruntime and TensorRT reject.
    """
    inits = {i.name: i for i in model.graph.initializer}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                consumers.setdefault(name, []).append(node)
    for name, nodes in consumers.items():
        fp32_nodes = [n for n in nodes if _is_blocked(n, blocked)]
        if fp32_nodes and len(fp32_nodes) < len(nodes):
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = name + "_fp32"
            model.graph.initializer.append(copy)
            for node in fp32_nodes:
                node.input[:] = [copy.name if i == name else i for i in node.input]


#: inputs that the ONNX spec types as float32 whatever the data type (Resize's roi and scales).
FLOAT32_INPUTS = {"Resize": (1, 2)}


def _restore_float32_inputs(model: onnx.ModelProto) -> None:
    """Turn constant inputs the spec requires as float32 back from float16 (Resize's scales)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        for index in FLOAT32_INPUTS.get(node.op_type, ()):
            if index >= len(node.input) or not node.input[index]:
                continue
            name = node.input[index]
            if name in inits:
                tensor = inits[name]
            elif name in constants:
                tensor = next(a.t for a in constants[name].attribute if a.name == "value")
            else:
                continue
            if tensor.data_type != onnx.TensorProto.FLOAT16:
                continue
            value = numpy_helper.to_array(tensor).astype("float32")
            fixed = numpy_helper.from_array(value, name + "_fp32")
            if fixed.name not in inits:
                model.graph.initializer.append(fixed)
                inits[fixed.name] = fixed
            node.input[index] = fixed.name


def _is_blocked(node: onnx.NodeProto, blocked_nodes: Set[str]) -> bool:
    return node.op_type in FP32_OPS or node.name in blocked_nodes


def _convert(model: onnx.ModelProto, node_block_list: Iterable[str] = ()) -> onnx.ModelProto:
    try:
        from onnxconverter_common import float16
    except ImportError as e:
        from .errors import ExportError
        raise ExportError(f"--fp16 needs onnxconverter-common ({e}): pip install "
                          f"'tbn-vit[export]'") from e

    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    model = model_copy
    _unshare_initializers(model, set(node_block_list))

    with warnings.catch_warnings():
        # one "float32 number ... will be truncated to 1e-07" per tiny weight: expected, noise
        warnings.filterwarnings("ignore", message=".*will be truncated to.*")
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=False,          # float inputs/outputs become float16 (the feature)
            op_block_list=list(FP32_OPS),
            node_block_list=list(node_block_list),
            check_fp16_ready=True,
        )
    _fix_cast_value_info(converted)
    _restore_float32_inputs(converted)
    return converted


def convert_feature_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """feature graph -> fp16: uint8 frame in, float16 feature out."""
    return _convert(model, preprocess_nodes(model))


def convert_temporal_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """temporal graph -> fp16: float16 features in, uint8 labels (and logits) out."""
    return _convert(model)
