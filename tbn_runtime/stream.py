"""The stream driver: a Segmenter's results written to disk while the next frames are decoded
and segmented. Decoder thread -> main thread (Segmenter: resize, engines, resize back) ->
writer pool (mask files) and an ordered writer (the overlay video).

    with Segmenter("runs/tbn/export") as seg:
        stats = run_stream(seg, "clip.mp4", "masks/")

Every hand-over is bounded (the decode queue, the number of writes in flight), so memory stays
flat on endless streams. Masks go to OUT/<video>/<frame>.png (or .npy, or OUT/<video>.json of
COCO RLE; see tbn_runtime.outputs), each written atomically; the overlay video is written under
a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .outputs import MaskOutput
from .overlay import OverlayError, OverlayVideo
from .segmenter import Segmenter
from .sources import SourceError, Video, open_source

log = logging.getLogger("tbn_runtime")
STAGES = ("decode", "preprocess", "feature", "temporal", "postprocess", "write")


class StreamError(RuntimeError):
    """An output that cannot be written (overlay video, mask folder); one-line message."""


class Writers:
    """Background writes with a bounded number in flight.

    `pool` writes mask files in parallel; `ordered` (one thread) appends overlay frames in order.
    `submit` blocks while `max_pending` writes are queued, so a slow disk slows the stream
    instead of filling memory. The first error of any write is raised by `check()`.
    """

    def __init__(self, workers: int = 2, max_pending: int = 16) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tbn-write")
        self.ordered = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tbn-overlay")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._idle = threading.Condition()
        self.pending = 0
        self.max_pending_seen = 0
        self.seconds = 0.0
        self.error: Optional[BaseException] = None

    def submit(self, fn: Callable[..., Any], *args: Any, ordered: bool = False) -> None:
        self.check()
        self._slots.acquire()
        with self._idle:
            self.pending += 1
            self.max_pending_seen = max(self.max_pending_seen, self.pending)

        def task() -> None:
            t0 = time.perf_counter()
            try:
                fn(*args)
            except BaseException as e:  # reported on the main thread by check()
                with self._idle:
                    if self.error is None:
                        self.error = e
            finally:
                with self._idle:
                    self.pending -= 1
                    self.seconds += time.perf_counter() - t0
                    self._idle.notify_all()
                self._slots.release()
        (self.ordered if ordered else self.pool).submit(task)

    def drain(self) -> None:
        """Wait until every submitted write has finished, then raise the first error."""
        with self._idle:
            self._idle.wait_for(lambda: self.pending == 0)
        self.check()

    def check(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def close(self) -> None:
        """Wait for every write, then raise the first error (if any)."""
        self.pool.shutdown(wait=True)
        self.ordered.shutdown(wait=True)
        self.check()


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


def plan_videos(videos: List[Video], out: MaskOutput, resume: bool
                ) -> Tuple[List[Video], List[str]]:
    """(the videos to stream, the names of those skipped as complete): coco-rle, which writes
    a video's JSON when it ends, refuses live streams and --resume skips finished videos."""
    twice = sorted(n for n, k in Counter(v.name for v in videos).items() if k > 1)
    if twice:
        raise StreamError(f"two videos are named {twice[0]}: their labels would go to one "
                          f"folder; rename one of the sources")
    if out.format != "coco-rle":
        return videos, []
    endless = [v.name for v in videos if v.kind in ("camera", "url")]
    if endless:
        raise StreamError(f"--format coco-rle writes one JSON per video when the video ends; "
                          f"{endless[0]} is a live stream: use --format png or npy")
    skipped = [v.name for v in videos if resume and out.video_complete(v.name)]
    return [v for v in videos if v.name not in skipped], skipped


class StreamStats:
    """What a run costs, from the Segmenter's and the writers' counters (see `--stats`)."""

    def __init__(self, seg: Segmenter) -> None:
        self.seg = seg
        self.timings0 = dict(seg.timings)
        self.engine0 = dict(seg.backend.timings)
        self.frames0 = dict(seg.frames)
        self.start = time.perf_counter()

    def report(self, fmt: str, frames: int, videos: int, skipped_videos: List[str],
               writers: Writers, overlay: Optional[OverlayVideo] = None) -> Dict[str, Any]:
        seg, wall = self.seg, time.perf_counter() - self.start
        times = {k: seg.timings[k] - self.timings0[k]
                 for k in ("decode", "preprocess", "postprocess")}
        for k in ("feature", "temporal"):
            times[k] = seg.backend.timings[k] - self.engine0[k]
        times["write"] = writers.seconds
        inferred = seg.frames["segmented"] - self.frames0["segmented"]
        resumed = seg.frames["skipped"] - self.frames0["skipped"]
        engines = times["feature"] + times["temporal"]
        stats: Dict[str, Any] = {
            "backend": seg.describe(),
            "export": os.path.abspath(seg.export) if seg.export else None,
            "export_size": [seg.height, seg.width],
            "format": fmt,
            "streams": seg.backend.streams,
            "videos": videos,
            "videos_resumed": len(skipped_videos),
            "frames": frames,
            "frames_inferred": inferred,
            "frames_resumed": resumed,
            "wall_s": round(wall, 4),
            "fps": round(frames / wall, 3) if wall > 0 and frames else None,
            # the engines' own rate: segmented frames over the time of their engine calls
            # (the feature engine's time on resumed frames is reported apart)
            "engines_s": round(engines, 4),
            "engines_fps": round(inferred / engines, 3) if engines > 0 and inferred else None,
            "resumed_feature_s": round(seg.backend.timings["push"] - self.engine0["push"], 4),
            "stages": {k: {"total_s": round(v, 4),
                           "ms_per_frame": round(1e3 * v / frames, 3) if frames else None}
                       for k, v in times.items()},
            "stage_threads": {"decode": "decoder threads (overlap)",
                              "write": "writer pool (overlaps)", "preprocess": "main",
                              "feature": "main", "temporal": "main", "postprocess": "main"},
            "max_decode_queue": seg.decode_queue_peak,
            "max_pending_writes": writers.max_pending_seen,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "overlay": overlay.path if overlay is not None else None,
        }
        if engines > 0 and resumed == 0:
            stats["pipeline_overhead"] = round(wall / engines - 1.0, 4)
        return stats


def run_stream(seg: Segmenter, source: Union[str, Sequence[Video]], out_dir: str, *,
               fmt: str = "png", overlay: Optional[Union[str, OverlayVideo]] = None,
               resume: bool = False, max_frames: Optional[int] = None, progress: bool = True,
               queue_depth: int = 8, write_workers: int = 2,
               max_pending_writes: int = 16) -> Dict[str, Any]:
    """Segment every frame of `source` and write its labels under out_dir; returns the stats.

    fmt: "png", "npy" or "coco-rle" (tbn_runtime.outputs). overlay: a video file name (or an
    OverlayVideo) for the colour-blended frames with a legend. resume: frames whose labels are
    already complete are not classified again (the feature engine still runs on them: the ring
    needs their features for the frames after; with coco-rle whole complete videos are skipped).
    A Segmenter of several streams runs that many videos at once (tbn_runtime.lanes).
    Raises SourceError when a video cannot be read (after writing every mask before the failure)
    and StreamError for outputs that cannot be written.
    """
    from tqdm import tqdm

    videos = open_source(source) if isinstance(source, (str, os.PathLike)) else list(source)
    out = MaskOutput(out_dir, fmt, seg.classes)
    videos, skipped_videos = plan_videos(videos, out, resume)
    if seg.backend.streams > 1:
        if overlay is not None:
            raise StreamError("--overlay draws one video: run with --streams 1")
        from .lanes import run_lanes
        return run_lanes(seg, videos, out, skipped_videos, resume=resume,
                         max_frames=max_frames, progress=progress, queue_depth=queue_depth,
                         write_workers=write_workers, max_pending_writes=max_pending_writes)
    if isinstance(overlay, str):
        overlay = OverlayVideo(overlay, seg.classes, seg.palette_bgr[:, ::-1])
    writers = Writers(write_workers, max_pending_writes)
    total = sum(v.count or 0 for v in videos) if all(v.count for v in videos) else None
    if total is not None and max_frames is not None:
        total = min(total, max_frames)
    bar = tqdm(total=total, unit="frame", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)

    def skip(video: str, name: str, frame: Any) -> bool:
        return resume and out.frame_complete(video, name, frame.shape[:2])

    stats = StreamStats(seg)
    counts = {"videos": 0, "frames": 0}
    current: Optional[str] = None
    ok = False
    try:
        for r in seg.stream(videos, skip=skip, max_frames=max_frames, queue_depth=queue_depth):
            if r.video != current:
                if current is not None:
                    writers.drain()
                    out.end_video(current)
                current = r.video
                out.begin_video(current)
                counts["videos"] += 1
                bar.set_postfix_str(current, refresh=False)
            labels = r.labels
            if labels is None:  # resumed: its labels are on disk already
                if overlay is not None:
                    labels = out.read(r.video, r.name)
            else:
                writers.submit(out.write, r.video, r.name, r.index, labels)
            if overlay is not None:
                writers.submit(overlay.add, r.frame, labels, r.fps, ordered=True)
            counts["frames"] += 1
            bar.update(1)
        ok = True
    except OverlayError as e:
        raise StreamError(str(e)) from None
    finally:
        bar.close()
        closed = False
        try:
            writers.close()
            closed = True
            if current is not None:
                out.end_video(current, complete=ok)
        finally:
            if overlay is not None:
                overlay.finish(ok and closed)
    return stats.report(fmt, counts["frames"], counts["videos"], skipped_videos, writers,
                        overlay)


def summary_line(stats: Dict[str, Any], out_dir: str) -> str:
    """The one line printed at the end of a run."""
    n, v = stats["frames"], stats["videos"]
    text = f"{n} frame{'s' * (n != 1)} of {v} video{'s' * (v != 1)}"
    if stats.get("fps"):
        text += f" at {stats['fps']:.1f} fps"
        if stats.get("engines_fps"):
            text += f" (engines alone {stats['engines_fps']:.1f} fps)"
    resumed = [f"{stats[k]} {what}" for k, what in (("frames_resumed", "frames"),
                                                       ("videos_resumed", "videos"))
               if stats.get(k)]
    if resumed:
        text += f", {' and '.join(resumed)} already done"
    if stats.get("failed_videos"):
        text += f", {len(stats['failed_videos'])} failed (see above)"
    text += f"; labels in {out_dir}"
    if stats.get("overlay"):
        text += f", overlay {stats['overlay']}"
    return f"{text} [{stats['backend']}]"


__all__ = ["run_stream", "summary_line", "plan_videos", "StreamStats", "Writers", "StreamError",
           "SourceError", "STAGES"]
