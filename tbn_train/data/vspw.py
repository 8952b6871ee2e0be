"""The VSPW reader: split index, training clips, whole-video iteration.

Layout::

    ROOT/{train,val,test}.txt            one video folder name per line
    ROOT/data/<video>/origin/<name>.jpg  frames, ordered by name
    ROOT/data/<video>/mask/<name>.png    raw masks: 0 others, 1..124 classes, 255 void

Raw mask values become train ids with `tbn_runtime.classes.raw_to_train_ids` (value - 1; 0 and
255 -> IGNORE_INDEX). `index_split` checks only that the files exist (cheap); sizes and label
values are checked when a mask is read. Every problem raises `DatasetError` with a one-line
message that names the file and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from tbn_runtime.classes import IGNORE_INDEX, NUM_CLASSES, raw_to_train_ids
from tbn_runtime.files import UnsafePathError, inside
from tbn_runtime.masks import read_label_png
from tbn_runtime.temporal import DEFAULT_OFFSETS, clip_indices

from ..errors import DatasetError
from .transforms import Size, augment_clip, sample_params

__all__ = ["DatasetError", "Video", "VSPWClips", "check_class_count", "check_train_ids",
           "index_split", "iter_video", "read_frame", "read_mask"]

PathLike = Union[str, "os.PathLike[str]"]

# Raw mask values a VSPW mask may hold: 0..124 and 255.
_VALID_RAW = np.zeros(256, dtype=bool)
_VALID_RAW[:NUM_CLASSES + 1] = True
_VALID_RAW[255] = True



@dataclass(frozen=True)
class Video:
    """One video of a split: its name, frame paths (sorted by name), mask paths or None."""

    name: str
    frames: List[Path]
    masks: Optional[List[Path]]

    def __len__(self) -> int:
        return len(self.frames)


def check_data_root(root: PathLike) -> None:
    """DatasetError unless `root` (--data) is a folder: missing, or a file, each said so."""
    root = Path(root)
    if root.is_dir():
        return
    if root.exists():
        raise DatasetError(f"--data {root} is a file, not a folder: pass the dataset root (the "
                           f"folder that holds train.txt, val.txt and data/)")
    raise DatasetError(f"data root {root} not found; pass --data ROOT (a VSPW folder), or "
                       f"make demo data with: tbn-synth --out data/synth")


def index_split(root: PathLike, split: str, with_masks: bool = True) -> List[Video]:
    """List the videos of `split` under `root`, checking that the files exist.

    Raises DatasetError for a missing root or split file, a listed video without frames, or
    (with `with_masks`) a frame without its mask.
    """
    root = Path(root)
    check_data_root(root)
    split_file = root / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"{split_file} is missing; a VSPW root lists the video folders of "
                           f"split '{split}' in it, one per line")
    try:
        names = [line.strip() for line in split_file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{split_file}: cannot read the split list ({e}); it lists video "
                           f"folder names, one per line, in UTF-8") from None
    videos = []
    for line, name in enumerate(names, 1):
        if not name:
            continue
        try:  # a downloaded split list must not reach outside ROOT/data (../../x, /abs)
            origin = Path(inside(str(root / "data"), name, f"{split_file} line {line}")) / "origin"
        except UnsafePathError as e:
            raise DatasetError(f"{e} (a split list names video folders of ROOT/data/, one "
                               f"per line): fix or remove the line") from None
        frames = sorted(origin.glob("*.jpg")) if origin.is_dir() else []
        if not frames:
            raise DatasetError(f"{origin} has no frames (*.jpg) for video '{name}' listed in "
                               f"{split_file}; add its frames or remove the line")
        masks = None
        if with_masks:
            masks = [root / "data" / name / "mask" / (f.stem + ".png") for f in frames]
            for frame, mask in zip(frames, masks):
                if not mask.is_file():
                    raise DatasetError(f"{mask} is missing (the mask of {frame}); add it, "
                                       f"or remove video '{name}' from {split_file}")
        videos.append(Video(name=name, frames=frames, masks=masks))
    return videos


def read_frame(path: PathLike) -> np.ndarray:
    """Read a frame as uint8 H x W x 3 BGR; DatasetError if it cannot be decoded."""
    try:  # imdecode rather than imread: no OpenCV warning on stderr, any path encoding
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        data = np.zeros(0, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None or img.ndim != 3:
        raise DatasetError(f"{path}: cannot read the image (missing, truncated or not an "
                           f"image); replace the file")
    return img


def read_mask(path: PathLike, frame_path: Optional[PathLike] = None,
              frame_size: Optional[Size] = None) -> np.ndarray:
    """Read a raw VSPW mask and return its train ids (uint8 H x W, ignore 255).

    Checks the label values (0..124 and 255) and, when `frame_size` is given, that the mask is
    as large as its frame `frame_path`.
    """
    try:
        raw = read_label_png(path)
    except (OSError, ValueError) as e:
        reason = str(e).replace(f"{path}: ", "")  # named once, at the front
        raise DatasetError(f"{path}: cannot read the mask ({reason}); replace the file") from e
    if frame_size is not None and raw.shape != tuple(frame_size):
        raise DatasetError(f"{path}: mask is {raw.shape[0]}x{raw.shape[1]} but its image "
                           f"{frame_path} is {frame_size[0]}x{frame_size[1]}; write the mask "
                           f"at the image size")
    bad = ~_VALID_RAW[raw]
    if bad.any():
        values = np.unique(raw[bad]).tolist()
        raise DatasetError(f"{path}: label values {values[:8]} are outside 0..{NUM_CLASSES} and "
                           f"255; store raw VSPW values (0 others, 1..{NUM_CLASSES} classes, "
                           f"255 void)")
    return raw_to_train_ids(raw)


def check_train_ids(ids: np.ndarray, num_classes: int, mask_path: PathLike, fix: str) -> None:
    """DatasetError naming `mask_path` when the train ids `ids` (ignore 255 aside) reach
    `num_classes`; `fix` ends the message (what the user should do)."""
    ids = np.asarray(ids)
    bad = (ids >= num_classes) & (ids != IGNORE_INDEX)
    if bad.any():
        values = np.unique(ids[bad]).tolist()
        raise DatasetError(f"{mask_path}: train ids {values[:8]} (raw mask values "
                           f"{[v + 1 for v in values[:8]]}) are beyond the model's "
                           f"{num_classes} classes (train ids 0..{num_classes - 1}); {fix}")


def check_class_count(videos: Sequence[Video], num_classes: int, fix: str,
                      max_videos: int = 128) -> None:
    """Before training or evaluating: do the masks hold train ids the model has no class for?

    `read_mask` admits train ids 0..NUM_CLASSES-1 only, so with num_classes >= NUM_CLASSES
    nothing can be out of range and nothing is read. Otherwise the first and last mask of up
    to `max_videos` videos spread over the split are read (about a second for VSPW; a video's
    classes mostly persist from frame to frame): sound (what it reports is a real mask) and
    cheap, not complete. The per-item check in training and evaluation (`check_train_ids`)
    names any file the sample misses.
    """
    if num_classes >= NUM_CLASSES or not videos:
        return
    step = max(1, len(videos) // max_videos)
    for video in list(videos)[::step][:max_videos]:
        if video.masks is None:
            continue
        for t in sorted({0, len(video) - 1}):
            check_train_ids(read_mask(video.masks[t]), num_classes, video.masks[t], fix)


def iter_video(video: Video) -> Iterator[Tuple[int, np.ndarray, Optional[np.ndarray]]]:
    """Yield (t, frame uint8 H x W x 3 BGR, label uint8 H x W train ids or None) per frame."""
    for t, frame_path in enumerate(video.frames):
        frame = read_frame(frame_path)
        label = None
        if video.masks is not None:
            label = read_mask(video.masks[t], frame_path, frame.shape[:2])
        yield t, frame, label


def reference_indices(t: int, length: int, offsets: Sequence[int], reference: str = "past",
                      reverse: bool = False) -> List[int]:
    """The frames of frame t's clip in a video of `length` frames: the references, then t.

    The reference at offsets[i] sits at position -2 - i (the model's clip layout).
      "past"    t - k, clamped to frame 0: `tbn_runtime.temporal.clip_indices`, what streams.
      "future"  t + k while t + max(offsets) is inside the video, else t - k clamped to 0: the
                VSPW baseline's TestDataset_longclip.
    `reverse` swaps the direction (the baseline's random temporal reversal in training). Each
    direction keeps its fallback: a past reference clamps to frame 0, a future one falls back to
    the past near the end. (The baseline draws only anchors with room in the drawn direction;
    here every frame is an anchor and falls back instead.) No offsets: [t].
    """
    if not offsets:
        return [t]
    if (reference == "future") != reverse and t + max(offsets) < length:
        return [t + k for k in sorted(offsets, reverse=True)] + [t]
    return clip_indices(t, offsets)


class VSPWClips(Dataset):
    """Training / validation clips: one item per (video, frame t) of a split.

    An item is `(clip, label)`: clip float32 T x 3 x H x W with the frames
    `reference_indices(t, len(video), offsets, reference)` (the references, frame t last;
    T = len(offsets) + 1, one frame for image models with no offsets), normalised RGB as in
    `tbn_runtime.preprocess.normalize_bgr`; label int64 H x W train ids of frame t.

    `reference` "past" (t-3, t-6, t-9) or "future" (t+3, t+6, t+9, the VSPW baseline's); with
    `train=True`, `reverse_prob` is the chance an item swaps the direction (the baseline: 0.5).

    With `train=True` every clip gets one random scale (uniform in `scale_range`, relative to
    the frame size), one random crop of `crop_size` (padded with 0 for the frames and with
    IGNORE_INDEX for the label where the scaled frame is smaller; None: no crop) and, with
    `flip`, one random horizontal flip, identical for all frames of the clip. With
    `train=False` the frames are returned whole and unchanged (batch them one at a time when
    the videos differ in size).

    Randomness: each `__getitem__` draws a 63-bit seed from torch's global generator and builds
    a `numpy.random.Generator` from it. `torch.manual_seed` therefore fixes the stream in the
    main process, and in DataLoader workers torch seeds each worker's generator with
    `torch.initial_seed()` = base_seed + worker_id (base_seed drawn anew per epoch from the main
    generator), so a seeded run is reproducible and every epoch differs. The dataset keeps
    only paths and numbers, so it pickles into workers.
    """

    def __init__(self, root: PathLike, split: str, offsets: Sequence[int] = DEFAULT_OFFSETS,
                 crop_size: Optional[Size] = (480, 480),
                 scale_range: Tuple[float, float] = (0.5, 2.0), flip: bool = True,
                 train: bool = True, reference: str = "past", reverse_prob: float = 0.0) -> None:
        self.root = Path(root)
        self.split = split
        self.offsets: Tuple[int, ...] = tuple(int(k) for k in offsets)
        if self.offsets:
            clip_indices(0, self.offsets)  # validates the offsets
        if reference not in ("past", "future"):
            raise ValueError(f"reference must be 'past' or 'future', got '{reference}'")
        if not 0.0 <= reverse_prob <= 1.0:
            raise ValueError(f"temporal_reverse must be a probability in [0, 1], got "
                             f"{reverse_prob}")
        self.reference = reference
        self.reverse_prob = float(reverse_prob)
        self.crop_size: Optional[Size] = (
            None if crop_size is None else (int(crop_size[0]), int(crop_size[1])))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = bool(flip)
        self.train = bool(train)
        self.videos: List[Video] = index_split(self.root, split, with_masks=True)
        self.items: List[Tuple[int, int]] = [
            (v, t) for v, video in enumerate(self.videos) for t in range(len(video))]

    def __len__(self) -> int:
        return len(self.items)

    def frame_indices(self, index: int, reverse: bool = False) -> List[int]:
        """The frame indices (within its video) of item `index`'s clip, frame t last."""
        v, t = self.items[index]
        return reference_indices(t, len(self.videos[v]), self.offsets, self.reference, reverse)

    def load(self, index: int, reverse: bool = False) -> Tuple[List[np.ndarray], np.ndarray]:
        """Read item `index` without augmentation: (BGR frames of the clip, train-id label)."""
        v, t = self.items[index]
        video = self.videos[v]
        indices = self.frame_indices(index, reverse)
        cache: Dict[int, np.ndarray] = {}
        for i in indices:
            if i not in cache:
                cache[i] = read_frame(video.frames[i])
        frame_t = cache[t]
        for i, img in cache.items():
            if img.shape != frame_t.shape:
                raise DatasetError(
                    f"{video.frames[i]}: frame is {img.shape[0]}x{img.shape[1]} but "
                    f"{video.frames[t]} of the same video is {frame_t.shape[0]}x"
                    f"{frame_t.shape[1]}; all frames of a video must have one size")
        assert video.masks is not None
        label = read_mask(video.masks[t], video.frames[t], frame_t.shape[:2])
        return [cache[i] for i in indices], label

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        params, seed = None, None
        if self.train:
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())
        # the direction draws from its own stream, so the geometry is that of the seed alone
        reverse = seed is not None and self.reverse_prob > 0 and \
            np.random.default_rng([seed, 1]).random() < self.reverse_prob
        frames, label = self.load(index, reverse)
        if seed is not None:
            rng = np.random.default_rng(seed)
            params = sample_params(rng, frames[-1].shape[:2], self.crop_size,
                                   self.scale_range, self.flip)
        clip, label_out = augment_clip(frames, label, params)
        assert label_out is not None
        return torch.from_numpy(clip), torch.from_numpy(label_out.astype(np.int64))
