"""Scoring for benchmarks/accuracy.py: a row's metrics and agreement with the PyTorch reference
(`Score`, `evaluate_backend`, `reference_predictions`), the release gate of one row (`gate`), and
the deliberate fault the gate must catch (`inject_fault`)."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

FAULTS = ("wrong-past",)


# -- scoring -----------------------------------------------------------------------------------
class Score:
    """Metrics of one row plus its agreement with the reference."""

    def __init__(self, num_classes: int):
        from tbn_runtime.metrics import SegMetrics
        self.metrics = SegMetrics(num_classes=num_classes)
        self.agree = 0
        self.pixels = 0
        self.seconds = 0.0

    def add_video(self, name: str, preds: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                  reference: Optional[Sequence[np.ndarray]]) -> None:
        for t, (pred, label) in enumerate(zip(preds, labels)):
            self.metrics.add_frame(name, pred, label)
            if reference is not None:
                valid = label != 255
                self.agree += int(np.count_nonzero((pred == reference[t]) & valid))
                self.pixels += int(np.count_nonzero(valid))
        self.metrics.end_video(name)

    def summary(self) -> Dict[str, Any]:
        s = self.metrics.summary()
        out = {k: s.get(k) for k in ("mIoU", "mVC8", "mVC16", "pixel_acc", "frames", "videos")}
        out["agreement"] = self.agree / self.pixels if self.pixels else None
        out["seconds"] = self.seconds
        return out


def load_video(video: Any, max_frames: Optional[int] = None) -> Tuple[List[np.ndarray],
                                                                        List[np.ndarray]]:
    """(frames BGR, labels train ids) of one video of tbn_train.data.vspw.index_split."""
    from tbn_train.data.vspw import iter_video
    frames, labels = [], []
    for t, frame, label in iter_video(video):
        if max_frames is not None and t >= max_frames:
            break
        frames.append(frame)
        labels.append(label)
    return frames, labels


def run_backend(backend: Any, frames: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Stream one video's frames through a backend; labels at the frames' size."""
    from tbn_runtime.preprocess import resize_frame, resize_labels
    backend.reset()
    return [resize_labels(backend.infer(resize_frame(f, backend.height, backend.width)),
                          *f.shape[:2]) for f in frames]


def run_reference(model: Any, frames: Sequence[np.ndarray], height: int, width: int,
                  device: str) -> List[np.ndarray]:
    """The PyTorch reference (tbn_train.evaluate.predict_video) at the export size."""
    from tbn_runtime.preprocess import resize_frame, resize_labels
    from tbn_train.evaluate import predict_video
    resized = [resize_frame(f, height, width) for f in frames]
    return [resize_labels(p, *f.shape[:2]) for p, f in zip(predict_video(model, resized, device),
                                                            frames)]


def evaluate_backend(backend: Any, videos: Sequence[Any],
                     reference: Optional[Dict[str, List[np.ndarray]]] = None,
                     num_classes: int = 124, max_frames: Optional[int] = None) -> Dict[str, Any]:
    """Score one backend on whole videos (the test hook of the gate).

    backend: any object with height, width, reset() and infer(frame uint8 HxWx3 BGR at
    height x width) -> uint8 labels. videos: tbn_train.data.vspw.Video list. reference: video
    name -> the reference's labels per frame (for the agreement); None to skip it.
    Returns the row's summary: mIoU, mVC8, mVC16, pixel_acc, frames, videos, agreement.
    """
    score = Score(num_classes)
    for video in videos:
        frames, labels = load_video(video, max_frames)
        t0 = time.perf_counter()
        preds = run_backend(backend, frames)
        score.seconds += time.perf_counter() - t0
        score.add_video(video.name, preds, labels,
                        None if reference is None else reference[video.name])
    return score.summary()


def reference_predictions(model: Any, videos: Sequence[Any], height: int, width: int,
                          device: str = "cpu", max_frames: Optional[int] = None
                          ) -> Dict[str, List[np.ndarray]]:
    """video name -> the PyTorch reference's labels (for evaluate_backend's agreement)."""
    return {v.name: run_reference(model, load_video(v, max_frames)[0], height, width, device)
            for v in videos}


# -- the gate ------------------------------------------------------------------------------------
def gate(row: Dict[str, Any], ref: Dict[str, Any], tolerances: Dict[str, float],
         min_agree: Optional[float] = None) -> Tuple[bool, str]:
    """(passes, why) for one backend row against the reference row."""
    tol = tolerances.get(row["precision"])
    if tol is None:
        return False, f"no tolerance for precision {row['precision']}"
    if row.get("mIoU") is None or ref.get("mIoU") is None:
        return False, "mIoU undefined (no labelled pixels)"
    d = row["mIoU"] - ref["mIoU"]
    if abs(d) > tol:
        return False, f"|dmIoU| {abs(d):.4f} > {tol} points"
    if min_agree is not None and (row.get("agreement") or 0.0) < min_agree:
        return False, f"pixel agreement {row['agreement']:.5f} < {min_agree}"
    return True, f"|dmIoU| {abs(d):.4f} <= {tol} points"


class WrongPastIndex:
    """A RingIndex that hands out frame t-1's slot for every past offset (a deliberate bug)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def past_slots(self) -> List[int]:
        t = self.inner.frame
        return [self.inner.slot_of(max(t - 1, 0)) for _ in self.inner.offsets]


def inject_fault(backend: Any, fault: str) -> Any:
    """Make a runtime backend wrong on purpose (test hook of the gate); returns it."""
    if fault != "wrong-past":
        raise ValueError(f"unknown fault '{fault}' (known: {', '.join(FAULTS)})")
    if getattr(backend, "ring", None) is None:
        raise ValueError(f"{type(backend).__name__} has no feature ring to corrupt")
    backend.ring.index = WrongPastIndex(backend.ring.index)
    return backend
