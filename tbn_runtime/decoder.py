"""The decoder thread: videos decoded ahead of the engines into a bounded queue of typed events.

    reader = ReadAhead(videos, depth=8)
    for event in reader:                      # VideoStart, Frame..., VideoEnd, ..., Done
        if isinstance(event, Frame): ...      # event.video, event.name, event.image, event.decode_s
    reader.close()

The queue holds at most `depth` events, so memory stays flat however long the stream. A video
that cannot be read (or breaks off) ends the reader with a `Failed` event holding its
SourceError; `close()` stops the thread (also mid-video) and joins it.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator, List, NamedTuple, Optional, Union

import numpy as np

from .sources import SourceError, Video


class VideoStart(NamedTuple):
    video: Video


class Frame(NamedTuple):
    video: Video
    name: str                 # the frame's name (its output file name, no extension)
    image: np.ndarray         # uint8 H x W x 3 BGR, as decoded
    decode_s: float           # seconds its decoding took (on the decoder thread)


class VideoEnd(NamedTuple):
    video: Video


class Failed(NamedTuple):
    video: Optional[Video]
    error: SourceError


class Done(NamedTuple):
    pass


Event = Union[VideoStart, Frame, VideoEnd, Failed, Done]


class ReadAhead:
    """Decode `videos` in order on a thread; at most `max_frames` frames in all. `notify` (an
    Event) is set after every event put, for a consumer that waits on several readers."""

    def __init__(self, videos: List[Video], depth: int = 8, max_frames: Optional[int] = None,
                 notify: Optional[threading.Event] = None) -> None:
        self._queue: "queue.Queue[Event]" = queue.Queue(maxsize=depth)
        self._videos = videos
        self._max_frames = max_frames
        self._notify = notify
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tbn-decoder", daemon=True)
        self.thread.start()

    # -- the consumer's side ---------------------------------------------------------------------
    def waiting(self) -> int:
        """Events decoded and not yet taken (at most `depth`)."""
        return self._queue.qsize()

    def poll(self) -> Optional[Event]:
        """The next event if one is ready, else None (never blocks)."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def __iter__(self) -> Iterator[Event]:
        """Every event, blocking for each, up to Done or Failed."""
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, (Done, Failed)):
                return

    def close(self) -> None:
        self._stop.set()
        while self.thread.is_alive():
            self.poll()
            self.thread.join(timeout=0.05)

    # -- the decoder thread ----------------------------------------------------------------------
    def _put(self, event: Event) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(event, timeout=0.1)
            except queue.Full:
                continue
            if self._notify is not None:
                self._notify.set()
            return True
        return False

    def _video(self, video: Video, left: Optional[int]) -> Optional[int]:
        """Put one video's frames; returns the frames left to read, None for no limit, -1 when
        stopped."""
        if not self._put(VideoStart(video)):
            return -1
        it = video.frames()
        try:
            while left is None or left > 0:
                t0 = time.perf_counter()
                try:
                    name, image = next(it)
                except StopIteration:
                    break
                if not self._put(Frame(video, name, image, time.perf_counter() - t0)):
                    return -1
                if left is not None:
                    left -= 1
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        return left if self._put(VideoEnd(video)) else -1

    def _run(self) -> None:
        left, video = self._max_frames, None
        try:
            for video in self._videos:
                if left is not None and left <= 0:
                    break
                left = self._video(video, left)
                if left == -1:
                    return
            self._put(Done())
        except SourceError as e:
            self._put(Failed(video, e))
        except Exception as e:  # a decoder crash must reach the consumer, not vanish
            self._put(Failed(video, SourceError(f"{video.origin if video else 'decoding'}: "
                                                f"decoding failed: {type(e).__name__}: {e}")))
