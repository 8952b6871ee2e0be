"""The streaming pipeline: decoder thread -> main thread (resize, engines, resize back) ->
writer pool (mask PNGs, overlay video).

    stats = run_stream(open_source("clip.mp4"), backend, "masks/")

Every hand-over is bounded (the decode queue, the number of writes in flight), so memory stays
flat on endless streams. Masks go to `<out>/<video>/<frame>.png`, each written atomically;
an optional overlay video is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np

from .backends.base import Backend
from .masks import overlay as blend
from .masks import read_label_png, write_mask_png
from .sources import DONE, END, ERROR, FRAME, VIDEO, ReadAhead, SourceError, Video

STAGES = ("decode", "preprocess", "feature", "temporal", "postprocess", "write")


class StreamError(RuntimeError):
    """An output that cannot be written (overlay video, mask folder); one-line message."""


class Writers:
    """Background writes with a bounded number in flight.

    `pool` writes mask PNGs in parallel; `ordered` (one thread) appends overlay frames in order.
    `submit` blocks while `max_pending` writes are queued, so a slow disk slows the stream
    instead of filling memory. The first error of any write is raised by `check()`.
    """

    def __init__(self, workers: int = 2, max_pending: int = 16) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tbn-write")
        self.ordered = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tbn-overlay")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self.pending = 0
        self.max_pending_seen = 0
        self.seconds = 0.0
        self.error: Optional[BaseException] = None

    def submit(self, fn: Callable[..., Any], *args: Any, ordered: bool = False) -> None:
        self.check()
        self._slots.acquire()
        with self._lock:
            self.pending += 1
            self.max_pending_seen = max(self.max_pending_seen, self.pending)

        def task() -> None:
            t0 = time.perf_counter()
            try:
                fn(*args)
            except BaseException as e:  # reported on the main thread by check()
                with self._lock:
                    if self.error is None:
                        self.error = e
            finally:
                with self._lock:
                    self.pending -= 1
                    self.seconds += time.perf_counter() - t0
                self._slots.release()
        fut: Future = (self.ordered if ordered else self.pool).submit(task)
        del fut

    def check(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def close(self) -> None:
        """Wait for every write, then raise the first error (if any)."""
        self.pool.shutdown(wait=True)
        self.ordered.shutdown(wait=True)
        self.check()


class OverlayVideo:
    """A colour-blended video of every frame, written to a temporary name and renamed at the end.

    All videos of a source go into one file at the first video's size and frame rate."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        stem, ext = os.path.splitext(os.path.basename(self.path))
        if ext.lower() not in (".mp4", ".avi", ".mkv", ".mov"):
            raise StreamError(f"--overlay {path}: use a .mp4, .avi, .mkv or .mov file name")
        self.fourcc = "MJPG" if ext.lower() == ".avi" else "mp4v"
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        self.tmp = os.path.join(directory, f".{stem}.tmp-{os.getpid()}{ext}")
        self.writer: Optional[cv2.VideoWriter] = None
        self.size: Optional[Tuple[int, int]] = None
        self.frames = 0

    def add(self, frame: np.ndarray, labels: np.ndarray, fps: float) -> None:
        """Blend and append one frame (runs on the ordered writer thread)."""
        img = blend(frame, labels)
        if self.writer is None:
            self.size = (img.shape[1], img.shape[0])
            self.writer = cv2.VideoWriter(self.tmp, cv2.VideoWriter_fourcc(*self.fourcc),
                                          fps, self.size)
            if not self.writer.isOpened():
                raise StreamError(f"cannot write the overlay video {self.path} (codec "
                                  f"{self.fourcc} unavailable in this OpenCV)")
        if (img.shape[1], img.shape[0]) != self.size:
            img = cv2.resize(img, self.size, interpolation=cv2.INTER_LINEAR)
        self.writer.write(img)
        self.frames += 1

    def finish(self, ok: bool) -> None:
        if self.writer is not None:
            self.writer.release()
        if ok and self.frames:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def mask_is_complete(path: str, shape: Tuple[int, int]) -> bool:
    """True if path is a label PNG that decodes whole at the expected size."""
    if not os.path.isfile(path):
        return False
    try:
        return read_label_png(path).shape == tuple(shape)
    except (ValueError, OSError):
        return False


def has_masks(out_dir: str) -> bool:
    """True if out_dir already holds mask PNGs (directly or one video folder deep)."""
    if not os.path.isdir(out_dir):
        return False
    for entry in os.scandir(out_dir):
        if entry.is_file() and entry.name.endswith(".png"):
            return True
        if entry.is_dir():
            if any(f.endswith(".png") for f in os.listdir(entry.path)):
                return True
    return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Linux: VmHWM of /proc/self/status (getrusage's ru_maxrss would include a parent's peak
    inherited across fork + exec); elsewhere getrusage (macOS reports bytes, others KiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def run_stream(videos: List[Video], backend: Backend, out_dir: str, *,
               overlay_path: Optional[str] = None, resume: bool = False,
               max_frames: Optional[int] = None, progress: bool = True,
               queue_depth: int = 8, write_workers: int = 2,
               max_pending_writes: int = 16) -> Dict[str, Any]:
    """Stream the videos through the backend; returns the stats (see `--stats`).

    With `resume`, frames whose mask is already complete are not classified again: the feature
    engine still runs on them (the ring needs their features for the frames after), the
    temporal engine and the write are skipped. Raises SourceError when a video cannot be read
    (after writing every mask before the failure) and StreamError for unwritable outputs.
    """
    from tqdm import tqdm

    h, w = backend.height, backend.width
    times = dict.fromkeys(STAGES, 0.0)
    counts = {"videos": 0, "frames": 0, "inferred": 0, "resumed": 0}
    writers = Writers(write_workers, max_pending_writes)
    ovl = OverlayVideo(overlay_path) if overlay_path else None
    reader = ReadAhead(videos, depth=queue_depth, max_frames=max_frames)
    total = sum(v.count or 0 for v in videos) if all(v.count for v in videos) else None
    if total is not None and max_frames is not None:
        total = min(total, max_frames)
    bar = tqdm(total=total, unit="frame", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    max_queue = 0
    video: Optional[Video] = None
    vdir = out_dir
    feature0, temporal0 = backend.timings["feature"], backend.timings["temporal"]
    start = time.perf_counter()
    ok = False
    try:
        for event in reader:
            kind = event[0]
            max_queue = max(max_queue, reader.queue.qsize() + 1)
            if kind == FRAME:
                _, name, frame, decode_s = event
                times["decode"] += decode_s
                t0 = time.perf_counter()
                x = frame if frame.shape[:2] == (h, w) else cv2.resize(
                    frame, (w, h), interpolation=cv2.INTER_LINEAR)
                t1 = time.perf_counter()
                times["preprocess"] += t1 - t0
                path = os.path.join(vdir, f"{name}.png")
                src_hw = frame.shape[:2]
                if resume and mask_is_complete(path, src_hw):
                    backend.push(x)
                    counts["resumed"] += 1
                    if ovl is not None:
                        writers.submit(ovl.add, frame, read_label_png(path), video.fps,
                                       ordered=True)
                else:
                    labels = backend.infer(x)
                    t2 = time.perf_counter()
                    back = labels if src_hw == (h, w) else cv2.resize(
                        labels, (src_hw[1], src_hw[0]), interpolation=cv2.INTER_NEAREST)
                    times["postprocess"] += time.perf_counter() - t2
                    writers.submit(write_mask_png, path, back)
                    if ovl is not None:
                        writers.submit(ovl.add, frame, back, video.fps, ordered=True)
                    counts["inferred"] += 1
                counts["frames"] += 1
                bar.update(1)
            elif kind == VIDEO:
                video = event[1]
                backend.reset()
                counts["videos"] += 1
                vdir = os.path.join(out_dir, video.name)
                os.makedirs(vdir, exist_ok=True)
                bar.set_postfix_str(video.name, refresh=False)
            elif kind == ERROR:
                raise event[1]
            elif kind == DONE:
                break
            elif kind != END:
                raise AssertionError(f"unknown decoder event {kind}")
        ok = True
    finally:
        reader.close()
        bar.close()
        closed = False
        try:
            writers.close()
            closed = True
        finally:
            if ovl is not None:
                ovl.finish(ok and closed)
    wall = time.perf_counter() - start
    times["feature"] = backend.timings["feature"] - feature0
    times["temporal"] = backend.timings["temporal"] - temporal0
    times["write"] = writers.seconds
    engines = times["feature"] + times["temporal"]
    n = counts["frames"]
    stats: Dict[str, Any] = {
        "backend": backend.describe(),
        "export_size": [h, w],
        "videos": counts["videos"],
        "frames": n,
        "frames_inferred": counts["inferred"],
        "frames_resumed": counts["resumed"],
        "wall_s": round(wall, 4),
        "fps": round(n / wall, 3) if wall > 0 else None,
        "engines_s": round(engines, 4),
        "engines_fps": round(counts["inferred"] / engines, 3) if engines > 0 else None,
        "stages": {k: {"total_s": round(v, 4), "ms_per_frame": round(1e3 * v / n, 3) if n else None}
                   for k, v in times.items()},
        "stage_threads": {"decode": "decoder thread (overlaps)", "write": "writer pool (overlaps)",
                          "preprocess": "main", "feature": "main", "temporal": "main",
                          "postprocess": "main"},
        "max_decode_queue": max_queue,
        "max_pending_writes": writers.max_pending_seen,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "overlay": ovl.path if ovl is not None else None,
    }
    if engines > 0 and counts["inferred"] == n:
        stats["pipeline_overhead"] = round(wall / engines - 1.0, 4)
    return stats


def summary_line(stats: Dict[str, Any], out_dir: str) -> str:
    """The one line printed at the end of a run."""
    parts = [f"{stats['frames']} frames in {stats['videos']} video(s)",
             f"{stats['fps']} fps" if stats.get("fps") else "",
             f"(engines {stats['engines_fps']} fps)" if stats.get("engines_fps") else "",
             f"{stats['frames_resumed']} resumed" if stats.get("frames_resumed") else "",
             f"masks in {out_dir}",
             f"overlay {stats['overlay']}" if stats.get("overlay") else "",
             f"[{stats['backend']}]"]
    return "tbn-run: " + ", ".join(p for p in parts if p)


__all__ = ["run_stream", "summary_line", "has_masks", "mask_is_complete", "Writers",
           "OverlayVideo", "StreamError", "SourceError", "STAGES"]
