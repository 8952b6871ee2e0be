"""Clip augmentation for training: random scale, random crop (with padding), horizontal flip.

Every frame of a clip and the label of its last frame get the *same* geometric transform, so
the past frames stay aligned with the current one. Order: scale (bilinear for frames, nearest
for the label), flip, normalise (`tbn_runtime.preprocess.normalize_bgr`), crop. Where the
scaled frame is smaller than the crop, the frame is padded with 0 after normalisation (the
ImageNet mean colour) and the label with IGNORE_INDEX; the frame sits at the top-left corner.

The random draws come from a `numpy.random.Generator` handed in by the caller (see
`VSPWClips` for how it is seeded), so the transforms themselves hold no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from tbn_runtime.classes import IGNORE_INDEX
from tbn_runtime.preprocess import normalize_bgr

Size = Tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class AugParams:
    """One draw of the clip augmentation.

    `size` is the frame size after scaling, `crop` the (top, left) corner of the crop in the
    scaled frame (None: no crop), `crop_size` the output size when cropping, `flip` whether to
    mirror horizontally.
    """

    size: Size
    crop: Optional[Tuple[int, int]]
    crop_size: Optional[Size]
    flip: bool


def sample_params(rng: np.random.Generator, frame_size: Size, crop_size: Optional[Size],
                  scale_range: Tuple[float, float] = (0.5, 2.0), flip: bool = True) -> AugParams:
    """Draw scale, crop corner and flip for a frame of `frame_size` (height, width).

    The scale factor is uniform in `scale_range` and relative to the frame's own size. The crop
    corner is uniform over the positions that keep the crop inside the scaled frame (0 along a
    side where the frame is smaller than the crop; that side is padded).
    """
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    h, w = frame_size
    s = float(rng.uniform(lo, hi)) if hi > lo else lo
    size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
    crop = None
    if crop_size is not None:
        ch, cw = int(crop_size[0]), int(crop_size[1])
        top = int(rng.integers(0, max(size[0] - ch, 0) + 1))
        left = int(rng.integers(0, max(size[1] - cw, 0) + 1))
        crop = (top, left)
        crop_size = (ch, cw)
    do_flip = bool(flip and rng.random() < 0.5)
    return AugParams(size=size, crop=crop, crop_size=crop_size, flip=do_flip)


def crop_pad(arr: np.ndarray, top: int, left: int, size: Size, fill: float) -> np.ndarray:
    """Cut a `size` window at (top, left) from the last two axes of `arr`, padding with `fill`.

    Works for H x W labels and C x H x W images. The part of the window that lies outside
    `arr` (bottom/right, where `arr` is smaller than the window) is `fill`.
    """
    ch, cw = size
    out = np.full(arr.shape[:-2] + (ch, cw), fill, dtype=arr.dtype)
    part = arr[..., top:top + ch, left:left + cw]
    out[..., :part.shape[-2], :part.shape[-1]] = part
    return out


def _resize(img: np.ndarray, size: Size, nearest: bool) -> np.ndarray:
    if img.shape[:2] == tuple(size):
        return img
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(img, (size[1], size[0]), interpolation=interp)


def augment_clip(frames_bgr: Sequence[np.ndarray], label: Optional[np.ndarray],
                 params: Optional[AugParams]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Apply one transform to every frame of a clip and to the label of its last frame.

    `frames_bgr`: uint8 H x W x 3 BGR frames (all the same size); `label`: uint8 H x W train
    ids or None. With `params=None` the frames are only normalised (evaluation).
    Returns (float32 T x 3 x H' x W' normalised RGB clip, uint8 H' x W' label or None).
    """
    out = []
    for frame in frames_bgr:
        if params is not None:
            frame = _resize(frame, params.size, nearest=False)
            if params.flip:
                frame = frame[:, ::-1]
        chw = normalize_bgr(frame)
        if params is not None and params.crop is not None and params.crop_size is not None:
            chw = crop_pad(chw, params.crop[0], params.crop[1], params.crop_size, 0.0)
        out.append(chw)
    clip = np.stack(out, axis=0)
    if label is not None and params is not None:
        label = _resize(label, params.size, nearest=True)
        if params.flip:
            label = label[:, ::-1]
        if params.crop is not None and params.crop_size is not None:
            label = crop_pad(label, params.crop[0], params.crop[1], params.crop_size,
                             IGNORE_INDEX)
        label = np.ascontiguousarray(label)
    return clip, label
