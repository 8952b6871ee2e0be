"""Where a stream's labels go, in the format the user's tools read (numpy + Pillow only).

    png       OUT/<video>/<frame>.png   palette PNG of train ids (tbn-eval --pred reads these)
    npy       OUT/<video>/<frame>.npy   uint8 H x W train ids (numpy.load)
    coco-rle  OUT/<video>.json          one COCO file per video: an image per frame, an
                                        annotation per class present (RLE, iscrowd 1), the
                                        categories with VSPW's ids (train id + 1) and names

Every file is written atomically. png and npy are written frame by frame from the writer pool;
coco-rle collects a video's annotations and writes its JSON when the video ends (with
"complete": false when the run was stopped inside the video, so --resume redoes it).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import rle
from .files import atomic_write, atomic_write_text, inside
from .masks import read_label_png, write_mask_png

FORMATS = ("png", "npy", "coco-rle")
_EXT = {"png": ".png", "npy": ".npy", "coco-rle": ".json"}


def has_outputs(out_dir: str) -> bool:
    """True if out_dir already holds masks of any format (directly or one video folder deep)."""
    if not os.path.isdir(out_dir):
        return False

    def visible_output(name: str) -> bool:
        return not name.startswith(".") and name.endswith(tuple(_EXT.values()))

    for entry in os.scandir(out_dir):
        if entry.is_file() and visible_output(entry.name):
            return True
        if entry.is_dir() and not entry.name.startswith("."):
            if any(visible_output(f) for f in os.listdir(entry.path)):
                return True
    return False


class MaskOutput:
    """The labels of a run, written to out_dir in one of FORMATS (thread-safe `write`)."""

    def __init__(self, out_dir: str, fmt: str = "png",
                 class_names: Optional[Sequence[str]] = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        self.out_dir = out_dir
        self.format = fmt
        self.class_names = list(class_names or [])
        self._lock = threading.Lock()
        self._coco: Dict[str, Dict[int, Tuple[str, Tuple[int, int], List[Dict[str, Any]]]]] = {}

    # -- paths and completeness (for --resume) ---------------------------------------------------
    def path(self, video: str, frame: Optional[str] = None) -> str:
        """The file of a frame (png, npy) or of a whole video (coco-rle). Video and frame names
        come from user data (a split list, file names): one that would lead outside out_dir
        raises UnsafePathError (files.inside)."""
        if self.format == "coco-rle":
            return inside(self.out_dir, video + ".json", "video name")
        return inside(self.out_dir, os.path.join(video, frame + _EXT[self.format]),
                      "video/frame name")

    def video_complete(self, video: str) -> bool:
        """coco-rle: the video's JSON exists whole and says it is complete."""
        if self.format != "coco-rle":
            return False
        try:
            with open(self.path(video)) as f:
                return bool(json.load(f).get("info", {}).get("complete"))
        except (OSError, ValueError, AttributeError):
            return False

    def frame_complete(self, video: str, frame: str, shape: Tuple[int, int]) -> bool:
        """png/npy: the frame's file decodes whole at the expected size."""
        path = self.path(video, frame)
        if self.format == "coco-rle" or not os.path.isfile(path):
            return False
        try:
            if self.format == "png":
                return read_label_png(path).shape == tuple(shape)
            arr = np.load(path, allow_pickle=False)
            return arr.dtype == np.uint8 and arr.shape == tuple(shape)
        except (ValueError, OSError):
            return False

    def read(self, video: str, frame: str) -> np.ndarray:
        """The labels of a complete png/npy frame (for the overlay of resumed frames)."""
        path = self.path(video, frame)
        if self.format == "png":
            return read_label_png(path)
        return np.load(path, allow_pickle=False)

    # -- writing ---------------------------------------------------------------------------------
    def begin_video(self, video: str) -> None:
        if self.format == "coco-rle":
            self.path(video)  # refuses a name that would lead outside out_dir
            os.makedirs(self.out_dir, exist_ok=True)
            with self._lock:
                self._coco[video] = {}
        else:
            os.makedirs(inside(self.out_dir, video, "video name"), exist_ok=True)

    def write(self, video: str, frame: str, index: int, labels: np.ndarray) -> None:
        """Write (png, npy) or collect (coco-rle) one frame's labels; runs in writer threads."""
        if self.format == "png":
            write_mask_png(self.path(video, frame), labels)
        elif self.format == "npy":
            labels = np.ascontiguousarray(labels, dtype=np.uint8)

            def save(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.save(f, labels, allow_pickle=False)
            atomic_write(self.path(video, frame), save)
        else:
            anns = []
            for k in np.unique(labels).tolist():
                if k == 255:  # ignore: no category
                    continue
                m = labels == k
                anns.append({"category_id": int(k) + 1, "segmentation": rle.encode(m),
                             "area": int(m.sum()), "bbox": rle.bbox(m), "iscrowd": 1})
            with self._lock:
                self._coco[video][index] = (frame, labels.shape, anns)

    def end_video(self, video: str, complete: bool = True) -> None:
        """coco-rle: write the video's JSON (call once its frames' writes have finished)."""
        if self.format != "coco-rle":
            return
        with self._lock:
            frames = self._coco.pop(video, {})
        if not frames:
            return
        images, annotations = [], []
        for image_id, index in enumerate(sorted(frames), start=1):
            name, (h, w), anns = frames[index]
            images.append({"id": image_id, "file_name": name, "frame_index": index,
                           "height": int(h), "width": int(w)})
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
        doc = {
            "info": {"description": f"tbn-run labels of video {video}", "video": video,
                     "complete": bool(complete), "label_ids": "category_id = train id + 1 "
                     "(VSPW's raw mask values)"},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)],
        }
        atomic_write_text(self.path(video), json.dumps(doc, separators=(",", ":")) + "\n")
