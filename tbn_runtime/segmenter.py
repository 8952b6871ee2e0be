"""The runtime's Python API: video scene parsing with an exported TBN-ViT, frame by frame, video by
video, or several streams batched together.

    import cv2
    from tbn_runtime import CLASSES, Segmenter, colorize

    with Segmenter("runs/tbn/export") as seg:            # backend="auto": the best one present
        labels = seg.segment(frame_bgr)                   # H x W uint8 train ids, frame's size
        print(CLASSES[labels[0, 0]])                      # the class of the top-left pixel
        seg.reset()                                       # a new video: the ring starts again
        for r in seg.stream("video.mp4"):                 # decoded in a thread, in frame order
            cv2.imwrite(f"{r.video}-{r.name}.png", colorize(r.labels))

A Segmenter holds a backend (TensorRT, ONNX Runtime or PyTorch; see tbn_runtime.backends) with
its feature ring. `segment` takes frames at any size: it resizes them to the export size
(bilinear) on the way in and the labels back (nearest) on the way out, so the labels always
match the frame. Consecutive `segment` calls are consecutive frames of one video; call `reset()`
between videos (`stream` does it itself). tbn-run's driver (tbn_runtime.driver) calls
`segment_many` and `reset` of this class, and holds no engine logic of its own.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .backends import Backend, open_backend
from .console import DEFAULT_RUN
from .errors import TbnError
from .manifest import MANIFEST_NAME, ManifestError, load_manifest
from .preprocess import resize_frame, resize_labels


#: inside an export: when tbn-export made it, or last found it up to date (tbn-run without
#: --model takes the latest one)
EXPORTED_STAMP = ".tbn-exported"


def _exported_at(export: str) -> float:
    """When tbn-export made or confirmed this export: its stamp, else the manifest's mtime."""
    import json

    try:
        with open(os.path.join(export, EXPORTED_STAMP), encoding="utf-8") as f:
            when = json.load(f)["exported_at"]
        if isinstance(when, (int, float)) and not isinstance(when, bool):
            return float(when)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return os.path.getmtime(os.path.join(export, MANIFEST_NAME))


def find_exports(root: str = DEFAULT_RUN) -> List[str]:
    """Export folders (export, export-fp16, export-int8, ...) directly under `root`, the one
    tbn-export made or found up to date last first."""
    try:
        found = [os.path.join(root, e.name) for e in os.scandir(root)
                 if e.is_dir() and e.name.startswith("export")
                 and os.path.isfile(os.path.join(e.path, MANIFEST_NAME))]
    except OSError:
        return []
    return sorted(found, key=_exported_at, reverse=True)


def choose_export(root: str = DEFAULT_RUN) -> Tuple[str, str]:
    """(the export to run when none is named, why that one): of the exports under `root`, the
    one tbn-export made or found up to date last; ManifestError if there is none."""
    found = find_exports(root)
    if not found:
        raise ManifestError(f"no export under {root}/ (export*/manifest.json): make one with "
                            f"tbn-export, or pass the export folder (--model DIR)")
    others = f"; also there: {', '.join(found[1:])}" if len(found) > 1 else ""
    return found[0], f"the export tbn-export made or confirmed last under {root}/{others}"


def default_export(root: str = DEFAULT_RUN) -> str:
    """The export to run when none is named (see choose_export); ManifestError if none."""
    return choose_export(root)[0]


class SegmenterError(TbnError, RuntimeError):
    """A Segmenter used in a way that would give wrong labels (closed; one stream fed by two
    threads); the message says what to do instead."""


@dataclass
class Result:
    """One frame of `Segmenter.stream`."""
    video: str                     # the video's name (its output folder)
    name: str                      # the frame's name (its output file name, no extension)
    index: int                     # the frame's index within its video
    frame: np.ndarray              # uint8 H x W x 3 BGR, as decoded
    labels: Optional[np.ndarray]   # uint8 H x W train ids at the frame's size; None if skipped
    fps: float                     # the video's frame rate (its container's, else 25)


class Segmenter:
    """Video scene parsing with an exported TBN-ViT (see the module docstring for usage).

    export: an export folder made by tbn-export (default: the newest under runs/tbn).
    backend: "auto" (TensorRT, then ONNX Runtime, then PyTorch; any GPU before the CPU), "trt",
    "ort", "torch", or a Backend instance (export and device are then ignored).
    device: "cuda", "cpu" or None for the best one present.
    streams: how many videos run at once (tbn-run --streams; see tbn_runtime.driver): each has
    its own ring, and their frames share the engine calls (`segment_many`).
    threads: CPU threads of the engines (ONNX Runtime's intra-op pool, or torch's), for several
    processes sharing a machine (tbn-run --ray); default: one per core.
    Raises ManifestError (a bad export) or BackendError (a backend that cannot run here).

    Threads: a stream's video belongs to the thread that started it (reset(), or its first
    frame); another live thread feeding that stream gets SegmenterError rather than labels
    computed from the other video's past. Threads on distinct streams (streams=N) each get
    their own video's labels, the engine calls taking turns. After close(), every call raises
    SegmenterError.
    """

    def __init__(self, export: Optional[str] = None, backend: Union[str, Backend] = "auto",
                 device: Optional[str] = None, streams: int = 1,
                 threads: Optional[int] = None) -> None:
        if isinstance(backend, Backend):
            self.backend = backend
            self.why = f"{backend.name} as given"
        else:
            export = export or default_export()
            manifest = load_manifest(export)
            self.backend, self.why = open_backend(backend, manifest, device, export, streams,
                                                  threads=threads)
        self.manifest = self.backend.manifest
        self.export = self.backend.export_dir
        #: class names by train id, and their colours (BGR) for colorize()
        self.classes: List[str] = list(self.manifest.class_names)
        self.palette_bgr = np.asarray(self.manifest.palette, np.uint8).reshape(-1, 3)[:, ::-1]
        #: seconds spent per stage (decode only in stream(); the engines' in backend.timings)
        self.timings: Dict[str, float] = dict.fromkeys(("decode", "preprocess", "postprocess"),
                                                       0.0)
        self.frames = {"segmented": 0, "skipped": 0}
        #: the most decoded events that waited for the main thread (the queue is bounded)
        self.decode_queue_peak = 0
        # Each stream's ring holds one video's past: the thread that started a stream's video
        # (reset, or its first frame) owns the stream until it resets it again, and any other
        # live thread feeding it gets SegmenterError instead of another video's past. The
        # engines run one call at a time (threads on distinct streams take turns).
        self._engine_lock = threading.Lock()
        self._owners: Dict[int, threading.Thread] = {}
        self._closed = False

    @property
    def height(self) -> int:
        """The export size: frames are resized to it for the engines."""
        return self.backend.height

    @property
    def width(self) -> int:
        return self.backend.width

    def describe(self) -> str:
        """One line: backend, device, what runs (and why it was chosen)."""
        return self.backend.describe()

    # -- one frame at a time ---------------------------------------------------------------------
    def _to_export_size(self, frame: np.ndarray) -> np.ndarray:
        if frame is None:
            raise ValueError("a frame must be uint8 H x W x 3 BGR, got None (cv2.imread gives "
                             "None for a file it cannot read; VideoCapture.read at the end)")
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"a frame must be uint8 H x W x 3 BGR (as cv2.imread/VideoCapture "
                             f"give it), got {frame.dtype} {frame.shape}")
        if frame.shape[0] == 0 or frame.shape[1] == 0:
            raise ValueError(f"a frame must have at least one pixel, got an empty array of "
                             f"shape {frame.shape}")
        return resize_frame(frame, self.height, self.width)

    def _check_usable(self, streams: Sequence[int]) -> None:
        """SegmenterError if closed; ValueError for streams this Segmenter does not have."""
        if self._closed:
            raise SegmenterError("this Segmenter is closed (close(), or the end of its `with` "
                                 "block): make a new Segmenter")
        n = self.backend.streams
        bad = [s for s in streams if not isinstance(s, (int, np.integer)) or not 0 <= s < n]
        if bad or len(set(streams)) != len(streams):
            have = "one stream, 0" if n == 1 else f"{n} streams, 0..{n - 1}"
            fix = (" (Segmenter(..., streams=N) runs N videos at once)" if n == 1 else "")
            raise ValueError(f"streams {list(streams)}: this Segmenter has {have}, and each "
                             f"stream takes one frame per call{fix}")

    def _claim(self, streams: Sequence[int], start: bool) -> None:
        """Make the calling thread the owner of `streams` (start: a new video on them), or
        raise SegmenterError if another live thread is feeding one of them."""
        me = threading.current_thread()
        for s in streams:
            owner = self._owners.get(s)
            if owner is not None and owner is not me and owner.is_alive() and not start:
                raise SegmenterError(
                    f"stream {s} of this Segmenter is feeding thread {owner.name!r}'s video; "
                    f"frames from thread {me.name!r} would mix the two videos' past frames. Give "
                    f"each thread its own Segmenter, or its own stream (streams=N, "
                    f"segment(frame, stream=i)), or reset(stream) to start a new video")
        for s in streams:
            self._owners[s] = me

    def segment(self, frame: np.ndarray, stream: int = 0) -> np.ndarray:
        """The labels (uint8 train ids, H x W of the frame) of the next frame of the video."""
        labels = self.segment_many([frame], [stream])[0]
        assert labels is not None
        return labels

    def push(self, frame: np.ndarray, stream: int = 0) -> None:
        """The next frame, features only: for frames whose labels exist already (resume), so
        that the frames after them still see their past."""
        self.segment_many([frame], [stream], [False])

    def segment_many(self, frames: Sequence[np.ndarray], streams: Sequence[int],
                     want: Optional[Sequence[bool]] = None) -> List[Optional[np.ndarray]]:
        """The next frame of several streams (distinct) at once: one batched engine call for
        their features, one for the labels of those with want[i] (default: all); the labels of
        the others are None (features only)."""
        want = [True] * len(frames) if want is None else list(want)
        self._check_usable(streams)
        t0 = time.perf_counter()
        xs = [self._to_export_size(f) for f in frames]
        t1 = time.perf_counter()
        with self._engine_lock:
            self._check_usable(streams)  # closed by another thread meanwhile
            self._claim(streams, start=False)
            out = self.backend.step(xs, streams, want)
        t2 = time.perf_counter()
        for i, (frame, labels) in enumerate(zip(frames, out)):
            if labels is not None:
                out[i] = resize_labels(labels, *frame.shape[:2])
        self.timings["preprocess"] += t1 - t0
        self.timings["postprocess"] += time.perf_counter() - t2
        self.frames["segmented"] += sum(want)
        self.frames["skipped"] += len(want) - sum(want)
        return out

    def reset(self, stream: int = 0) -> None:
        """Start a new video on `stream`: the next frame is frame 0 (its past is itself). The
        calling thread becomes the stream's owner (see segment_many)."""
        self._check_usable([stream])
        with self._engine_lock:
            self._claim([stream], start=True)
            self.backend.reset(stream)

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """BGR colours of labels in this export's palette (ignore, 255, white)."""
        from .masks import colorize
        return colorize(labels, self.palette_bgr)

    # -- whole videos ----------------------------------------------------------------------------
    def stream(self, source: Union[str, Sequence[Any]], *,
               skip: Optional[Callable[[str, str, np.ndarray], bool]] = None,
               max_frames: Optional[int] = None, queue_depth: int = 8) -> Iterator[Result]:
        """Segment every frame of a source, in order, decoding ahead in a thread.

        source: a video file, folder, VSPW split list, camera index or URL (see
        tbn_runtime.sources.open_source), or a list of tbn_runtime.sources.Video.
        skip(video, frame_name, frame) -> True: the frame's labels are not wanted (e.g. already
        written); its features are still computed and its Result has labels None.
        max_frames: stop after this many frames in all. Raises SourceError when a video cannot
        be read (after yielding every frame before the failure).
        """
        from .decoder import Failed, Frame, ReadAhead, VideoStart
        from .sources import videos_of

        reader = ReadAhead(videos_of(source), depth=queue_depth, max_frames=max_frames)
        index = 0
        try:
            for event in reader:
                self.decode_queue_peak = max(self.decode_queue_peak, reader.waiting() + 1)
                if isinstance(event, Frame):
                    self.timings["decode"] += event.decode_s
                    if skip is not None and skip(event.video.name, event.name, event.image):
                        self.push(event.image)
                        labels = None
                    else:
                        labels = self.segment(event.image)
                    yield Result(event.video.name, event.name, index, event.image, labels,
                                 event.video.fps)
                    index += 1
                elif isinstance(event, VideoStart):
                    index = 0
                    self.reset()
                elif isinstance(event, Failed):
                    raise event.error
        finally:
            reader.close()

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the engines and device memory (idempotent); later calls raise SegmenterError."""
        with self._engine_lock:
            self._closed = True
            self.backend.close()

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
