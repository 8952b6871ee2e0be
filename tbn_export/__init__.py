"""tbn_export: checkpoint -> export directory for tbn_runtime.

onnx_export     feature.onnx + temporal.onnx + manifest.json (export_onnx)
fp16            the fp16 graph pass (LayerNorm, Softmax, reductions stay fp32)
verify          the exported graphs chained through a feature ring vs PyTorch
tensorrt_build  TensorRT engines (strongly typed) where TensorRT is installed
cli             the tbn-export command (python -m tbn_export)
"""
