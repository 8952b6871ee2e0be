"""VSPW metrics as the official evaluation computes them: mIoU and mVC_N (numpy only).

All inputs are uint8 H x W arrays of train ids (0..num_classes-1, 255 = ignore); every metric is
reported as a percentage (x100).

- mIoU: one confusion matrix over every frame (only ground-truth pixels with a train id in
  0..num_classes-1 count); IoU per class = TP / (TP + FP + FN); the mean over the classes that
  occur in the ground truth. A class that appears only in predictions does not enter the mean.
- mVC_N: for each video with T > N frames and each window start i in range(T - N) (the official
  code stops one window short; this matches it): G = pixels whose ground truth is the same in
  frames i..i+N-1, P = pixels whose prediction is the same in them, acc_i = |G and P| / |G|.
  mVC_N is the mean of acc_i over all windows of all videos. Ignore pixels (255) take part in G
  like any other value, as in the official code (which reads the raw masks; there 0 "others" and
  255 "void" are different values, here both are 255). Windows with |G| = 0 are skipped (the
  official code would produce NaN). With no window at all, mVC_N is None.

Frames can be added a whole video at a time or frame by frame. For mVC only a per-pixel run
length (how many consecutive frames, up to the largest window, kept the current value) and the
last frame are kept per video, so long videos cost O(H x W) memory, not O(T x H x W).
"""

from __future__ import annotations

from itertools import zip_longest
from typing import Dict, Hashable, Iterable, Optional, Sequence, Tuple

import numpy as np

from .classes import NUM_CLASSES, VSPW_CLASSES


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise ValueError(f"pred and gt must be H x W, got {pred.shape} and {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    return pred, gt


def confusion_matrix(pred: np.ndarray, gt: np.ndarray,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """int64 (C x C) matrix, rows = ground truth, columns = prediction.

    Only pixels whose ground truth is in 0..C-1 count. Raises ValueError if such a pixel has a
    prediction outside 0..C-1 (predictions must be train ids).
    """
    pred, gt = _check_pair(pred, gt)
    g = gt.ravel().astype(np.int64)
    valid = (g >= 0) & (g < num_classes)
    g = g[valid]
    p = pred.ravel()[valid].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predictions must be train ids in 0..{num_classes - 1}, "
                         f"got values {p.min()}..{p.max()} at labelled pixels")
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class _VideoState:
    """What mVC needs of one video: last frame and per-pixel run lengths of gt and pred."""

    __slots__ = ("frames", "gt", "pred", "run_gt", "run_pred")

    def __init__(self) -> None:
        self.frames = 0
        self.gt: Optional[np.ndarray] = None
        self.pred: Optional[np.ndarray] = None
        self.run_gt: Optional[np.ndarray] = None
        self.run_pred: Optional[np.ndarray] = None


class SegMetrics:
    """Accumulates the VSPW metrics (mIoU, pixel accuracy, mVC_N) over videos.

    Use `add_video(preds, gts)` for a whole video, or `add_frame(video_id, pred, gt)` per frame
    (videos may interleave; call `end_video(video_id)` to free a finished video's state).
    `summary()` may be called at any time and reflects everything added so far.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, vc_windows: Sequence[int] = (8, 16),
                 class_names: Optional[Sequence[str]] = None) -> None:
        self.num_classes = int(num_classes)
        self.vc_windows: Tuple[int, ...] = tuple(int(n) for n in vc_windows)
        if any(n < 2 for n in self.vc_windows):
            raise ValueError(f"vc_windows must be >= 2, got {self.vc_windows}")
        if class_names is None:
            class_names = (VSPW_CLASSES[:self.num_classes] if self.num_classes <= NUM_CLASSES
                           else [str(i) for i in range(self.num_classes)])
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        self.class_names = tuple(class_names)
        self.cm = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.frames = 0
        self._max_n = max(self.vc_windows, default=1)
        self._run_dtype = np.uint8 if self._max_n < 256 else np.uint16
        self._vc_sum = {n: 0.0 for n in self.vc_windows}
        self._vc_count = {n: 0 for n in self.vc_windows}   # windows with |G| > 0
        self._vc_windows_seen = {n: 0 for n in self.vc_windows}  # all windows, incl. |G| = 0
        self._videos: Dict[Hashable, _VideoState] = {}
        self._video_ids: set = set()
        self._anon = 0

    def add_video(self, preds: Iterable[np.ndarray], gts: Iterable[np.ndarray]) -> None:
        """Add one whole video: predictions and ground truths in frame order."""
        self._anon += 1
        key = ("__video__", self._anon)
        n = 0
        try:
            for pred, gt in zip_longest(preds, gts):
                if pred is None or gt is None:
                    raise ValueError("add_video got different numbers of predictions and "
                                     "ground truths")
                self.add_frame(key, pred, gt)
                n += 1
        finally:
            self.end_video(key)
        if n == 0:
            raise ValueError("add_video got no frames")

    def add_frame(self, video_id: Hashable, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add the next frame (in time order) of video `video_id`."""
        pred, gt = _check_pair(pred, gt)
        self.cm += confusion_matrix(pred, gt, self.num_classes)
        self.frames += 1
        self._video_ids.add(video_id)
        st = self._videos.get(video_id)
        if st is None:
            st = self._videos[video_id] = _VideoState()
        if st.gt is not None and st.gt.shape != gt.shape:
            raise ValueError(f"video {video_id!r}: frame size {gt.shape} differs from "
                             f"earlier frames {st.gt.shape}")
        t = st.frames
        if t > 0:
            # Windows ending at frame t-1, i.e. starting at t - n. Counting them only once frame
            # t exists gives exactly range(T - n) window starts, as in the official code.
            for n in self.vc_windows:
                if t >= n:
                    self._add_window(n, st.run_gt >= n, st.run_pred >= n)
            cap = self._max_n
            same_gt, same_pred = gt == st.gt, pred == st.pred
            st.run_gt = np.where(same_gt, np.minimum(st.run_gt + 1, cap), 1).astype(
                self._run_dtype)
            st.run_pred = np.where(same_pred, np.minimum(st.run_pred + 1, cap), 1).astype(
                self._run_dtype)
        else:
            st.run_gt = np.ones(gt.shape, dtype=self._run_dtype)
            st.run_pred = np.ones(gt.shape, dtype=self._run_dtype)
        st.gt, st.pred = gt.copy(), pred.copy()
        st.frames = t + 1

    def _add_window(self, n: int, g: np.ndarray, p: np.ndarray) -> None:
        self._vc_windows_seen[n] += 1
        g_count = int(np.count_nonzero(g))
        if g_count == 0:
            return  # |G| = 0: skipped
        self._vc_sum[n] += int(np.count_nonzero(g & p)) / g_count
        self._vc_count[n] += 1

    def end_video(self, video_id: Hashable) -> None:
        """Free the per-video state of a finished video (its windows are already counted)."""
        self._videos.pop(video_id, None)

    @property
    def vc_window_counts(self) -> Dict[int, int]:
        """Windows counted per N so far (T - N per video with T > N), including |G| = 0 ones."""
        return dict(self._vc_windows_seen)

    def per_class_iou(self) -> np.ndarray:
        """float64 (C,) IoU per class in percent; NaN for classes absent from the ground truth."""
        tp = np.diag(self.cm).astype(np.float64)
        gt_count = self.cm.sum(axis=1).astype(np.float64)
        union = gt_count + self.cm.sum(axis=0) - tp
        iou = np.full(self.num_classes, np.nan)
        present = gt_count > 0
        iou[present] = tp[present] / union[present] * 100.0
        return iou

    def summary(self) -> dict:
        """The metrics so far, as a JSON-friendly dict (percentages; None where undefined).

        Keys: mIoU, pixel_acc, per_class_iou (class name -> IoU, classes present in the ground
        truth only), mVC<N> for each N in vc_windows (mVC8, mVC16 by default), frames, videos.
        """
        iou = self.per_class_iou()
        present = ~np.isnan(iou)
        total = int(self.cm.sum())
        out: dict = {
            "mIoU": float(iou[present].mean()) if present.any() else None,
            "pixel_acc": float(np.trace(self.cm) / total * 100.0) if total else None,
            "per_class_iou": {self.class_names[i]: float(iou[i]) for i in np.flatnonzero(present)},
        }
        for n in self.vc_windows:
            c = self._vc_count[n]
            out[f"mVC{n}"] = float(self._vc_sum[n] / c * 100.0) if c else None
        out["frames"] = self.frames
        out["videos"] = len(self._video_ids)
        return out


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def format_table(summary: dict) -> str:
    """A short human-readable table of a `SegMetrics.summary()` dict."""
    rows = [("mIoU", _fmt(summary.get("mIoU"))), ("pixel acc", _fmt(summary.get("pixel_acc")))]
    rows += [(k, _fmt(v)) for k, v in summary.items() if k.startswith("mVC")]
    rows += [("frames", str(summary.get("frames", 0))), ("videos", str(summary.get("videos", 0)))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>8}" for k, v in rows)
