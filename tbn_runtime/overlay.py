"""The overlay video: every frame blended with its colourised labels and a legend of the classes
on screen, written under a temporary name and renamed when the encoder has closed and the file
reads back whole."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .errors import TbnError
from .files import temporary_name
from .masks import overlay as blend

EXTENSIONS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v", ".mov": "mp4v"}


class OverlayError(TbnError, RuntimeError):
    """An overlay that cannot be written; one line naming the cause."""


def legend_entries(labels: np.ndarray, min_share: float = 0.005,
                   most: int = 8) -> List[Tuple[int, float]]:
    """(train id, share of the frame) of the classes covering at least `min_share` of it,
    largest first, at most `most` of them (ignore, 255, is left out)."""
    counts = np.bincount(labels.ravel(), minlength=256)[:255]
    ids = np.flatnonzero(counts >= max(1, min_share * labels.size))
    ids = sorted(ids.tolist(), key=lambda k: -counts[k])[:most]
    return [(k, counts[k] / labels.size) for k in ids]


def draw_legend(img: np.ndarray, labels: np.ndarray, names: Sequence[str],
                palette_bgr: np.ndarray) -> np.ndarray:
    """Draw a legend (colour swatch, class name, share of the frame) in the top-left corner."""
    entries = legend_entries(labels)
    if not entries:
        return img
    h = img.shape[0]
    scale = max(0.3, min(0.6, h / 900))
    thick = 1
    (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    row = th + base + 4
    texts = [f"{names[k] if k < len(names) else k} {100 * share:.0f}%" for k, share in entries]
    width = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] for t in texts)
    box_w, box_h = min(img.shape[1], width + row + 10), min(h, row * len(entries) + 6)
    panel = img[:box_h, :box_w]
    panel[...] = (panel.astype(np.uint16) * 2 // 5).astype(np.uint8)  # darken behind the text
    for i, ((k, _), text) in enumerate(zip(entries, texts)):
        y = 3 + i * row
        colour = tuple(int(c) for c in palette_bgr[k])
        cv2.rectangle(img, (4, y + 2), (4 + row - 6, y + row - 4), colour, -1)
        cv2.putText(img, text, (row + 2, y + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), thick, cv2.LINE_AA)
    return img


class OverlayVideo:
    """A colour-blended video of every frame, written to a temporary name and renamed at the end.

    All videos of a source go into one file at the first video's size and frame rate.
    `check()` tries the destination before the first frame, so an unwritable folder or a missing
    codec is reported at once (and for what it is), not after the stream."""

    def __init__(self, path: str, class_names: Sequence[str], palette_bgr: np.ndarray) -> None:
        self.path = os.path.abspath(path)
        ext = os.path.splitext(self.path)[1].lower()
        if ext not in EXTENSIONS:
            raise OverlayError(f"--overlay {path}: use a {', '.join(EXTENSIONS)} file name")
        self.fourcc = EXTENSIONS[ext]
        self.tmp = temporary_name(self.path, ext)
        self.names = list(class_names)
        self.palette_bgr = np.ascontiguousarray(np.asarray(palette_bgr, np.uint8))
        self.writer: Optional[cv2.VideoWriter] = None
        self.size: Optional[Tuple[int, int]] = None
        self.frames = 0

    def check(self) -> None:
        """Raise OverlayError if the destination is not writable or the codec is missing."""
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
            with open(self.tmp, "wb"):
                pass
        except OSError as e:
            raise OverlayError(f"cannot write the overlay video {self.path}: "
                               f"{e.strerror or e}") from None
        writer = cv2.VideoWriter(self.tmp, cv2.VideoWriter_fourcc(*self.fourcc), 10, (64, 48))
        ok = writer.isOpened()
        writer.release()
        os.remove(self.tmp)
        if not ok:
            raise OverlayError(f"cannot write the overlay video {self.path}: this OpenCV has "
                               f"no {self.fourcc} encoder (try an .avi name, MJPG)")

    def add(self, frame: np.ndarray, labels: np.ndarray, fps: float) -> None:
        """Blend, draw the legend and append one frame (runs on the ordered writer thread)."""
        img = draw_legend(blend(frame, labels, palette_bgr=self.palette_bgr), labels, self.names,
                          self.palette_bgr)
        if self.writer is None:
            self.size = (img.shape[1], img.shape[0])
            self.writer = cv2.VideoWriter(self.tmp, cv2.VideoWriter_fourcc(*self.fourcc),
                                          fps, self.size)
            if not self.writer.isOpened():
                raise OverlayError(f"cannot write the overlay video {self.path} (codec "
                                   f"{self.fourcc})")
        if (img.shape[1], img.shape[0]) != self.size:
            img = cv2.resize(img, self.size, interpolation=cv2.INTER_LINEAR)
        self.writer.write(img)
        self.frames += 1

    def _unreadable(self) -> Optional[str]:
        """Why the temporary is not the whole video just written (None: it reads back whole,
        every frame). OpenCV's encoder says nothing of a full disk: reading back does."""
        try:
            size = os.path.getsize(self.tmp)
        except OSError as e:
            return f"it is missing ({e.strerror})"
        cap = cv2.VideoCapture(self.tmp)
        try:
            if size == 0 or not cap.isOpened():
                return f"the file ({size} bytes) does not open as a video"
            n = 0
            while cap.grab():
                n += 1
        finally:
            cap.release()
        if n != self.frames:
            return f"it reads back {n} of its {self.frames} frames ({size} bytes)"
        return None

    def finish(self, ok: bool) -> None:
        """When the run finished: close the encoder, check that the file reads back whole and
        rename it into place (OverlayError if it does not: a full disk, most often; nothing
        is left under the overlay's name). Otherwise remove it."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        try:
            if ok and self.frames:
                why = self._unreadable()
                if why is not None:
                    raise OverlayError(f"the overlay video {self.path} was not written whole: "
                                       f"{why}; is the disk full? Free space there or write "
                                       f"the overlay elsewhere (the labels are complete)")
                os.replace(self.tmp, self.path)
        finally:
            if os.path.lexists(self.tmp):
                os.remove(self.tmp)
