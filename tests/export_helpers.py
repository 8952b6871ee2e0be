"""Helpers of the export tests: what an ONNX graph takes, gives and computes in; the module
fixtures `tiny` (a random-init tbn_tiny, BatchNorm statistics randomised) and `checkpoint` (it,
saved as tbn-train would, for TINY_H x TINY_W)."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import onnx
import pytest

TINY_H, TINY_W = 64, 96


@pytest.fixture(scope="module")
def tiny():
    import torch
    from tbn_train.models import build_model, randomize_batchnorm

    torch.manual_seed(0)
    return randomize_batchnorm(build_model("tbn_tiny"), seed=1).eval()


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    from tbn_train.checkpoint import save_checkpoint

    path = str(tmp_path_factory.mktemp("ckpt") / "best.safetensors")
    save_checkpoint(path, tiny, config={"model": "tbn_tiny", "crop_size": [TINY_H, TINY_W]})
    return path


def node_dtypes(model: onnx.ModelProto) -> dict:
    """{node name: (op_type, [elem types of its inputs])} after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + \
            list(inferred.graph.output):
        types[v.name] = v.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return {n.name: (n.op_type, [types.get(i) for i in n.input if i])
            for n in inferred.graph.node}


def graph_io(model: onnx.ModelProto) -> Dict[str, Dict[str, Tuple[str, List[int]]]]:
    """{"inputs": {name: (dtype, shape)}, "outputs": {...}} of an ONNX graph;
    a symbolic axis appears by its name ("batch")."""
    def describe(values) -> Dict[str, Tuple[str, List[int]]]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
            out[v.name] = (dtype, [d.dim_param or d.dim_value for d in t.shape.dim])
        return out
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
