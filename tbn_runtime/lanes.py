"""Many streams on one device: N videos at once through one Segmenter, their frames batched.

    with Segmenter("runs/tbn/export", streams=4) as seg:      # tbn-run A B C D E --streams 4
        stats = run_stream(seg, videos, "masks/")               # -> run_lanes

Each of the N lanes streams one video at a time, decoded by its own thread, with its own ring
of past features (stream i of the backend). Every step takes the current frame of each lane
whose decoder has one ready -- a slow or stalled source never holds the others back -- and runs
them through the feature engine as one batch, then the temporal engine over those that want
labels. A lane whose video ends takes the next video of the queue (its ring starts afresh); a
video that fails (unreadable, truncated) is reported in the stats and its lane goes on with the
next one. Each stream's labels equal a run of that video alone: the rings are separate and a
batched engine computes every frame as it would alone.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional

from .outputs import MaskOutput
from .segmenter import Segmenter
from .sources import END, ERROR, FRAME, ReadAhead, Video
from .stream import StreamStats, Writers

log = logging.getLogger("tbn_runtime")


@dataclass
class _Lane:
    stream: int                      # the backend stream (ring) this lane uses
    video: Video
    reader: ReadAhead
    index: int = 0                   # the next frame's index within the video


def run_lanes(seg: Segmenter, videos: List[Video], out: MaskOutput, skipped_videos: List[str],
              *, resume: bool = False, max_frames: Optional[int] = None, progress: bool = True,
              queue_depth: int = 8, write_workers: int = 2,
              max_pending_writes: int = 16) -> Dict[str, Any]:
    """Stream `videos` through `seg` on its backend's streams at once; returns the stats (those
    of run_stream, plus per-video frames and the videos that failed)."""
    from tqdm import tqdm

    writers = Writers(write_workers, max_pending_writes)
    total = sum(v.count or 0 for v in videos) if all(v.count for v in videos) else None
    bar = tqdm(total=total, unit="frame", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    stats = StreamStats(seg)
    waiting: Deque[Video] = deque(videos)
    lanes: List[Optional[_Lane]] = [None] * seg.backend.streams
    wake = threading.Event()
    per_video: Dict[str, int] = {}
    failed: Dict[str, str] = {}
    frames = 0

    def start(i: int) -> None:
        video = waiting.popleft()
        seg.reset(i)
        out.begin_video(video.name)
        lanes[i] = _Lane(i, video, ReadAhead([video], depth=queue_depth, notify=wake))
        per_video[video.name] = 0

    def finish(i: int, error: Optional[BaseException] = None) -> None:
        lane = lanes[i]
        lane.reader.close()
        lanes[i] = None
        if error is not None:
            failed[lane.video.name] = str(error)
            log.warning("%s", error)
        writers.drain()  # the video's labels are all written before its end is
        out.end_video(lane.video.name, complete=error is None)

    try:
        while True:
            for i in range(len(lanes)):
                if lanes[i] is None and waiting and (max_frames is None or frames < max_frames):
                    start(i)
            live = [lane for lane in lanes if lane is not None]
            if not live:
                break
            wake.clear()
            batch = []  # (lane, frame name, frame): at most one frame per lane
            for lane in live:
                seg.decode_queue_peak = max(seg.decode_queue_peak, lane.reader.queue.qsize())
                try:
                    event = lane.reader.queue.get_nowait()
                except queue.Empty:
                    continue
                if event[0] == FRAME:
                    batch.append((lane, event[1], event[2]))
                    seg.timings["decode"] += event[3]
                elif event[0] == END:
                    finish(lane.stream)
                elif event[0] == ERROR:
                    finish(lane.stream, event[1])
            if max_frames is not None:
                batch = batch[:max(max_frames - frames, 0)]
            if not batch:
                if max_frames is not None and frames >= max_frames:
                    for lane in [lane for lane in lanes if lane is not None]:
                        finish(lane.stream)
                    break
                wake.wait(0.05)  # until a decoder has put something
                continue
            want = [not (resume and out.frame_complete(lane.video.name, name, f.shape[:2]))
                    for lane, name, f in batch]
            labels = seg.segment_many([f for _, _, f in batch], [lane.stream for lane, _, _ in
                                                                  batch], want)
            for (lane, name, _), lab in zip(batch, labels):
                if lab is not None:
                    writers.submit(out.write, lane.video.name, name, lane.index, lab)
                lane.index += 1
                per_video[lane.video.name] += 1
            frames += len(batch)
            bar.update(len(batch))
    finally:
        for lane in lanes:
            if lane is not None:  # stopped inside these videos
                lane.reader.close()
        bar.close()
        writers.close()
        for lane in lanes:
            if lane is not None:
                out.end_video(lane.video.name, complete=False)
    report = stats.report(out.format, frames, len(per_video), skipped_videos, writers)
    report["frames_per_video"] = per_video
    report["failed_videos"] = failed
    return report
