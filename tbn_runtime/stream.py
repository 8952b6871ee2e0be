"""A source's labels written to disk: the Python API under tbn-run (one process).

    with Segmenter("runs/tbn/export") as seg:               # streams=4: four videos at once
        stats = run_stream(seg, "clip.mp4", "masks/")

The videos are checked as a whole first (names that would share a folder, coco-rle's need for
an end, --resume's finished videos), then tbn_runtime.driver streams them: decoder threads ->
Segmenter (resize, engines, resize back) -> writer pool (mask files) and an ordered writer (the
overlay video). Every hand-over is bounded, so memory stays flat on endless streams. Masks go
to OUT/<video>/<frame>.png (or .npy, or OUT/<video>.json of COCO RLE; see tbn_runtime.outputs),
each written atomically; the overlay video is written under a temporary name and renamed when
complete. A video that cannot be read is reported and the others go on (the stats'
"failed_videos"); a mistake in the request raises StreamError before any frame.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .driver import Job, check_names, drive
from .errors import TbnError
from .outputs import MaskOutput
from .overlay import OverlayVideo
from .report import EngineClock, stream_report, summary_line
from .segmenter import Segmenter
from .sources import SourceError, Video, videos_of


class StreamError(TbnError):
    """A run that cannot be done as asked (outputs, names, formats); one-line message."""


def plan_videos(videos: List[Video], out: MaskOutput, resume: bool
                ) -> Tuple[List[Video], List[str]]:
    """(the videos to stream, the names of those skipped as complete): coco-rle, which writes
    a video's JSON when it ends, refuses live streams and --resume skips finished videos."""
    check_names(videos, out.out_dir)
    if out.format != "coco-rle":
        return videos, []
    endless = [v.name for v in videos if v.kind in ("camera", "url")]
    if endless:
        raise StreamError(f"--format coco-rle writes one JSON per video when the video ends; "
                          f"{endless[0]} is a live stream: use --format png or npy")
    skipped = [v.name for v in videos if resume and out.video_complete(v.name)]
    return [v for v in videos if v.name not in skipped], skipped


def run_stream(seg: Segmenter, source: Union[str, Sequence[Video]], out_dir: str, *,
               fmt: str = "png", overlay: Optional[Union[str, OverlayVideo]] = None,
               resume: bool = False, max_frames: Optional[int] = None, progress: bool = True,
               queue_depth: int = 8, write_workers: int = 2,
               max_pending_writes: int = 16) -> Dict[str, Any]:
    """Segment every frame of `source` and write its labels under out_dir; returns the stats
    (tbn_runtime.report), "failed_videos" among them ({video: reason}).

    fmt: "png", "npy" or "coco-rle" (tbn_runtime.outputs). overlay: a video file name (or an
    OverlayVideo) for the colour-blended frames with a legend; one stream only. resume: frames
    whose labels are already complete are not classified again (the feature engine still runs
    on them: the ring needs their features for the frames after; with coco-rle whole complete
    videos are skipped). A Segmenter of several streams runs that many videos at once.
    Raises SourceError when the source cannot be listed, StreamError for a request that cannot
    be done, and what writing raises (OSError, OverlayError); a video that fails while it is
    read does not raise: it is logged and listed in the stats.
    """
    out = MaskOutput(out_dir, fmt, seg.classes)
    videos, skipped_videos = plan_videos(videos_of(source), out, resume)
    if overlay is not None and seg.backend.streams > 1:
        raise StreamError("--overlay draws one video: run with --streams 1")
    if isinstance(overlay, str):
        overlay = OverlayVideo(overlay, seg.classes, seg.palette_bgr)
    clock = EngineClock(seg)
    result = drive(seg, [Job(v) for v in videos], out, resume=resume, overlay=overlay,
                   max_frames=max_frames, progress=progress, queue_depth=queue_depth,
                   write_workers=write_workers, max_pending_writes=max_pending_writes)
    return stream_report(clock, result, fmt, skipped_videos,
                         overlay.path if overlay is not None else None)


__all__ = ["run_stream", "summary_line", "plan_videos", "check_names", "StreamError",
           "SourceError"]
