"""tbn_runtime: stream video through exported TBN-ViT engines.

The base package of tbn-vit. It imports neither torch nor tbn_train (only the PyTorch backend
does, lazily), so it deploys on a box with numpy, OpenCV, ONNX Runtime and/or TensorRT. It also
holds the numpy-only vocabulary the three packages share: VSPW classes and palette, mask PNG I/O,
the metrics, the past-frame rule and the manifest schema.
"""

__version__ = "0.1.0"
