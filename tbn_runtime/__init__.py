"""tbn_runtime: video scene parsing with an exported TBN-ViT, and the vocabulary tbn-vit shares.

    from tbn_runtime import CLASSES, Segmenter, colorize

    with Segmenter("runs/tbn/export") as seg:       # backend="auto", device=None: best present
        labels = seg.segment(frame_bgr)              # H x W uint8 train ids at the frame's size
        seg.reset()                                  # a new video: the ring starts again
        for r in seg.stream("video.mp4"):            # r.video, r.name, r.frame, r.labels
            cv2.imshow("tbn", colorize(r.labels))    # BGR colours of the VSPW palette

The base package of tbn-vit. It imports neither torch nor tbn_train (only the PyTorch backend
does, lazily), so it deploys with numpy, OpenCV, Pillow, tqdm and ONNX Runtime and/or TensorRT
(`pip install tbn-vit`). It also holds the numpy-only vocabulary the three packages share: VSPW
classes and palette, mask PNG I/O, the metrics, the past-frame rule and the manifest schema.
"""

from .classes import PALETTE, VSPW_CLASSES

__version__ = "0.1.0"

#: the 124 VSPW class names, indexed by train id (the values of the labels)
CLASSES = VSPW_CLASSES

# Segmenter and colorize import OpenCV and Pillow: loaded on first use (PEP 562), so that
# `import tbn_runtime` stays light for the vocabulary.
_LAZY = {"Segmenter": "segmenter", "Result": "segmenter", "colorize": "masks",
         "run_stream": "stream", "open_source": "sources", "load_manifest": "manifest"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CLASSES", "PALETTE", "Segmenter", "Result", "colorize", "run_stream", "open_source",
           "load_manifest"]
