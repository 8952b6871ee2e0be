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
from .errors import TbnError
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


#: in an output folder: that tbn-run writes there, and the videos it wrote (for --overwrite)
RUN_MARKER = ".tbn-run.json"


class NotOursError(TbnError, RuntimeError):
    """An output folder holding labels that tbn-run did not write (--overwrite refuses it)."""


def _recorded_videos(out_dir: str) -> Optional[List[str]]:
    """The videos RUN_MARKER records (None: no marker, or not one of ours)."""
    try:
        with open(os.path.join(out_dir, RUN_MARKER), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "tbn-run" or \
            not isinstance(data.get("videos"), list):
        return None
    return [v for v in data["videos"] if isinstance(v, str)]


def mark_outputs(out_dir: str, videos: Sequence[str]) -> None:
    """Record in out_dir that tbn-run writes these videos' labels there (added to those it
    recorded before), before the first of them is written."""
    known = _recorded_videos(out_dir) or []
    names = sorted(set(known) | set(videos))
    atomic_write_text(os.path.join(out_dir, RUN_MARKER), json.dumps(
        {"written_by": "tbn-run", "videos": names}, indent=1) + "\n")


def _own_entry(out_dir: str, name: str) -> Optional[str]:
    """out_dir/name for a recorded video name that stays inside out_dir, else None."""
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        return None
    return os.path.join(out_dir, name)


def _label_files(out_dir: str, video: str) -> List[str]:
    """The label files of a video in out_dir, any format: <video>.json and <video>/*.png|npy
    (plain files, not hidden; nothing for a name that would lead outside out_dir)."""
    base = _own_entry(out_dir, video)
    if base is None:
        return []
    found = []
    coco = base + _EXT["coco-rle"]
    if os.path.isfile(coco) and not os.path.islink(coco):
        found.append(coco)
    if os.path.isdir(base) and not os.path.islink(base):
        found += sorted(e.path for e in os.scandir(base)
                        if e.is_file(follow_symlinks=False) and not e.name.startswith(".")
                        and e.name.endswith((_EXT["png"], _EXT["npy"])))
    return found


def clear_outputs(out_dir: str, videos: Sequence[str]) -> int:
    """--overwrite: remove every label file (any format) of these videos that an earlier
    tbn-run wrote in out_dir, so that no stale frame of a longer run survives; other videos'
    labels and other files stay. Returns how many files went. NotOursError, before removing
    anything, if out_dir holds labels without tbn-run's marker, or labels of one of these
    videos that the marker does not record."""
    recorded = _recorded_videos(out_dir)
    if recorded is None and has_outputs(out_dir):
        raise NotOursError(f"{out_dir} holds label files that tbn-run did not write (no "
                           f"{RUN_MARKER}); --overwrite replaces only tbn-run's own: remove "
                           f"them yourself or choose another --out")
    doomed = []
    for video in dict.fromkeys(videos):
        files = _label_files(out_dir, video)
        if files and video not in (recorded or []):
            raise NotOursError(f"{os.path.join(out_dir, video)} holds label files that tbn-run "
                               f"did not write ({RUN_MARKER} does not record it); remove them "
                               f"yourself or choose another --out")
        doomed.append((video, files))
    removed = 0
    for video, files in doomed:
        for path in files:
            os.remove(path)
            removed += 1
        base = os.path.join(out_dir, video)
        if files and os.path.isdir(base) and not os.listdir(base):
            os.rmdir(base)
    return removed


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
