"""The stream driver: one loop for one stream, `--streams N` and each Ray chunk.

    result = drive(seg, [Job(video) for video in videos], MaskOutput("masks/", "png"))

N = seg.backend.streams lanes each stream one video at a time, decoded ahead by its own thread
(tbn_runtime.decoder), with its own ring of past features (stream i of the backend); one stream
is N = 1. Every step takes the current frame of each lane whose decoder has one ready -- a slow
source never holds the others back -- and runs them through `Segmenter.segment_many` as one
batch; their labels go to the writer pool (tbn_runtime.writers) and, with one lane, to the
overlay video. A lane whose video ends takes the next job; the ring starts afresh.

One failure rule: a video that cannot be read or breaks off mid-way is logged with its reason
and recorded in `DriveResult.failed` (its masks before the failure are kept, its coco-rle JSON
marked incomplete), and the others go on. Outputs that cannot be written (a full disk, the
overlay) stop the run: they would fail for every video.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .decoder import Failed, Frame, ReadAhead, VideoEnd
from .outputs import MaskOutput
from .overlay import OverlayVideo
from .segmenter import Segmenter
from .sources import SourceError, Video
from .writers import Writers

log = logging.getLogger("tbn_runtime")


@dataclass(frozen=True)
class Job:
    """One video for the driver: all of it, or a stretch of it (a Ray chunk)."""
    video: Video
    first: int = 0                   # the index of its first frame within the whole video
    lead: int = 0                    # its first frames go to the feature engine only
    frames: Optional[int] = None     # read at most this many frames (None: to the end)


@dataclass
class DriveResult:
    """What a drive did: the driver's own counts and the writers' (see tbn_runtime.report)."""
    frames: int = 0                  # frames through the engines, pushed ones included
    inferred: int = 0                # frames whose labels were computed
    pushed: int = 0                  # features only (resumed, or a chunk's lead)
    per_video: Dict[str, int] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)   # video -> its one-line reason
    decode_s: float = 0.0            # on the decoder threads (overlapping the engines)
    write_s: float = 0.0             # on the writer threads (overlapping the engines)
    max_decode_queue: int = 0        # the most decoded frames that waited for the engines
    max_pending_writes: int = 0
    wall_s: float = 0.0


def check_names(videos: Sequence[Video], out_dir: str) -> None:
    """Two videos of one name would write one folder: SourceError naming both, before any
    work (one process, --streams and --ray alike)."""
    twice = sorted(n for n, k in Counter(v.name for v in videos).items() if k > 1)
    if twice:
        a, b = [v.origin for v in videos if v.name == twice[0]][:2]
        raise SourceError(f"{a} and {b}: two videos are named {twice[0]} and would both write "
                          f"{twice[0]}/ in {out_dir}; rename one of the sources")


#: on_frame(job, index within the video, frame, labels or None when features only)
OnFrame = Callable[[Job, int, np.ndarray, Optional[np.ndarray]], None]


@dataclass
class _Lane:
    stream: int                      # the backend stream (ring) this lane uses
    job: Job
    reader: ReadAhead
    index: int = 0                   # the next frame's index within the job
    begun: bool = False              # its output has been begun (at its first frame)


class _Drive:
    """The state of one drive (see `drive`): the lanes, the jobs waiting, the writers."""

    def __init__(self, seg: Segmenter, jobs: Sequence[Job], out: MaskOutput, *, resume: bool,
                 overlay: Optional[OverlayVideo], max_frames: Optional[int],
                 on_frame: Optional[OnFrame], queue_depth: int, writers: Writers) -> None:
        self.seg, self.out, self.resume, self.overlay = seg, out, resume, overlay
        self.max_frames, self.on_frame, self.depth = max_frames, on_frame, queue_depth
        self.writers = writers
        self.waiting: Deque[Job] = deque(jobs)
        self.lanes: List[Optional[_Lane]] = [None] * seg.backend.streams
        self.wake = threading.Event()
        self.result = DriveResult()

    def left(self) -> Optional[int]:
        return None if self.max_frames is None else self.max_frames - self.result.frames

    def live(self) -> List[_Lane]:
        return [lane for lane in self.lanes if lane is not None]

    def fill(self) -> None:
        """Give every idle lane the next job, while frames are left to do."""
        for i, lane in enumerate(self.lanes):
            left = self.left()
            if lane is not None or not self.waiting or (left is not None and left <= 0):
                continue
            job = self.waiting.popleft()
            cap = [n for n in (job.frames, left) if n is not None]
            self.seg.reset(i)
            self.lanes[i] = _Lane(i, job, ReadAhead([job.video], depth=self.depth,
                                                    max_frames=min(cap) if cap else None,
                                                    notify=self.wake))
            self.result.per_video[job.video.name] = 0

    def finish(self, lane: _Lane, error: Optional[SourceError] = None) -> None:
        """A lane's video is over: its labels are all written before its end is."""
        lane.reader.close()
        self.lanes[lane.stream] = None
        name = lane.job.video.name
        if error is not None:
            self.result.failed[name] = str(error)
            log.error("%s", error)
        self.writers.drain()
        if lane.begun:
            self.out.end_video(name, complete=error is None)

    def collect(self) -> List[Tuple[_Lane, Frame]]:
        """The ready frame of each lane (at most one per lane, at most the frames left)."""
        batch = []
        for lane in self.live():
            self.result.max_decode_queue = max(self.result.max_decode_queue,
                                               lane.reader.waiting())
            event = lane.reader.poll()
            if isinstance(event, Frame):
                batch.append((lane, event))
                self.result.decode_s += event.decode_s
            elif isinstance(event, Failed):
                self.finish(lane, event.error)
            elif isinstance(event, VideoEnd):
                self.finish(lane)
        left = self.left()
        return batch if left is None else batch[:max(left, 0)]

    def features_only(self, lane: _Lane, frame: Frame) -> bool:
        return lane.index < lane.job.lead or (self.resume and self.out.frame_complete(
            lane.job.video.name, frame.name, frame.image.shape[:2]))

    def step(self, batch: List[Tuple[_Lane, Frame]]) -> None:
        """One batched engine call over the batch; the labels to the writers."""
        want = [not self.features_only(lane, f) for lane, f in batch]
        labels = self.seg.segment_many([f.image for _, f in batch],
                                       [lane.stream for lane, _ in batch], want)
        for (lane, f), lab in zip(batch, labels):
            video, index = lane.job.video, lane.job.first + lane.index
            if not lane.begun:
                self.out.begin_video(video.name)
                lane.begun = True
            if lab is not None:
                self.writers.submit(self.out.write, video.name, f.name, index, lab)
            if self.overlay is not None and lane.index >= lane.job.lead:
                shown = lab if lab is not None else self.out.read(video.name, f.name)
                self.writers.submit(self.overlay.add, f.image, shown, video.fps, ordered=True)
            if self.on_frame is not None:
                self.on_frame(lane.job, index, f.image, lab)
            lane.index += 1
            self.result.per_video[video.name] += 1
        self.result.frames += len(batch)
        self.result.inferred += sum(want)
        self.result.pushed += len(want) - sum(want)

    def run(self, bar) -> None:
        shown = None                       # the video named beside the bar
        while True:
            self.fill()
            if not self.live():
                return
            self.wake.clear()  # before looking: a frame put from now on wakes the wait
            batch = self.collect()
            if batch:
                self.step(batch)
                bar.update(len(batch))
                if batch[0][0].job.video.name != shown:
                    shown = batch[0][0].job.video.name
                    bar.set_postfix_str(shown, refresh=False)
            left = self.left()
            if left is not None and left <= 0:
                for lane in self.live():   # --max-frames reached inside these videos
                    self.finish(lane)
                return
            if not batch:
                self.wake.wait(0.05)       # until a decoder has put something


def drive(seg: Segmenter, jobs: Sequence[Job], out: MaskOutput, *, resume: bool = False,
          overlay: Optional[OverlayVideo] = None, max_frames: Optional[int] = None,
          on_frame: Optional[OnFrame] = None, progress: bool = False, queue_depth: int = 8,
          write_workers: int = 2, max_pending_writes: int = 16) -> DriveResult:
    """Segment every frame of `jobs` on seg's streams and write the labels to `out`.

    resume: frames whose labels are complete in `out` go to the feature engine only (the frames
    after need their features). overlay (one stream only): every frame blended with its labels,
    renamed into place when the drive ends normally. max_frames: stop after this many frames in
    all. on_frame: called on this thread for every frame, after its labels were handed to the
    writers. progress: a bar on stderr when it is a terminal. Raises what writing raises
    (OSError, OverlayError) and what stops the process (KeyboardInterrupt); a failing video is
    not raised but reported in the result (see the module docstring).
    """
    from .console import progress_bar

    if overlay is not None and seg.backend.streams > 1:
        raise ValueError("an overlay draws one video: drive it on a Segmenter of one stream")
    known = [j.frames if j.frames is not None else j.video.count for j in jobs]
    total = sum(known) if all(known) else None
    if total is not None and max_frames is not None:
        total = min(total, max_frames)
    writers = Writers(write_workers, max_pending_writes)
    state = _Drive(seg, jobs, out, resume=resume, overlay=overlay, max_frames=max_frames,
                   on_frame=on_frame, queue_depth=queue_depth, writers=writers)
    start, ok, closed = time.perf_counter(), False, False
    try:
        with progress_bar(total, "", progress and sys.stderr.isatty(), unit="frame") as bar:
            state.run(bar)
        ok = True
    finally:
        live = state.live()
        for lane in live:              # stopped inside these videos
            lane.reader.close()
        try:
            writers.close()
            closed = True
            for lane in live:
                if lane.begun:
                    out.end_video(lane.job.video.name, complete=False)
        finally:
            if overlay is not None:
                overlay.finish(ok and closed)
    r = state.result
    r.write_s, r.max_pending_writes = writers.seconds, writers.max_pending_seen
    r.wall_s = time.perf_counter() - start
    return r
