"""Frame preprocessing shared by training, export and the runtime (numpy only).

Frames arrive as decoded by OpenCV: uint8, H x W x 3, BGR. The model wants float RGB, scaled by
ImageNet mean/std (timm's Swin and ResNet weights were trained that way), channels first.
The exported feature engine does exactly this inside its graph; these functions are the
reference the graph is checked against and what the PyTorch paths use.

The engines run at the export size: a frame of another size is resized to it (`resize_frame`,
bilinear) on the way in, and its labels back to the frame's size (`resize_labels`, nearest: a
label is a class, not a quantity) on the way out. The runtime, the export's verification and
calibration, and the accuracy benchmark all resize with these two, so they see the same pixels.
"""

import numpy as np

# ImageNet statistics on the 0..255 scale, RGB order.
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)


def normalize_bgr(frame_bgr: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 BGR -> float32 3 x H x W, RGB, (x - mean) / std."""
    if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
        raise ValueError(f"expected a frame shaped H x W x 3, got {frame_bgr.shape}")
    rgb = frame_bgr[:, :, ::-1].astype(np.float32)
    rgb -= np.asarray(MEAN_RGB, dtype=np.float32)
    rgb /= np.asarray(STD_RGB, dtype=np.float32)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def resize_frame(frame_bgr: np.ndarray, height: int, width: int) -> np.ndarray:
    """A frame at height x width (bilinear; the frame itself if it has that size already)."""
    import cv2  # not at import: the module stays numpy-only for what needs no resizing

    if frame_bgr.shape[:2] == (height, width):
        return np.ascontiguousarray(frame_bgr)
    return cv2.resize(frame_bgr, (width, height), interpolation=cv2.INTER_LINEAR)


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Labels at height x width (nearest; the labels themselves if they have that size)."""
    import cv2

    if labels.shape[:2] == (height, width):
        return labels
    return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
