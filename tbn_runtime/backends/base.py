"""The backend interface: one frame in, its labels out, past features kept in a device ring.

Every backend (TensorRT, ONNX Runtime, PyTorch) implements the same two steps over its own
storage: run the feature engine on the frame into the ring's write slot, then run the temporal
engine on the current slot and the past slots. The index logic is `tbn_runtime.temporal`'s
FeatureRing, shared by all; a backend only supplies the slot buffers and the two engine calls.
"""

from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest
from ..temporal import FeatureRing

__all__ = ["Backend", "BackendError", "HostClock", "numpy_dtype"]


class HostClock:
    """Stage timestamps from the host clock: right for backends whose calls return when the
    work is done (ONNX Runtime, PyTorch on the CPU)."""

    def __init__(self, marks: int = 3) -> None:
        self._t = [0.0] * marks

    def mark(self, i: int) -> None:
        self._t[i] = time.perf_counter()

    def seconds(self, a: int, b: int) -> float:
        """Seconds from mark a to mark b; call after the work up to b has finished."""
        return self._t[b] - self._t[a]


class Backend:
    """Base class of the backends. Subclasses set `name` and implement the `_` methods.

    Usage: ``b = Cls(export_dir, manifest, device, streams=1, threads=None)`` (threads: the CPU
    threads of engines that run on the CPU; None, one per core); per video ``b.reset(stream)``;
    per frame ``labels = b.infer(frame, stream)`` with frame uint8 H x W x 3 BGR at the export
    size (manifest.height x manifest.width), labels uint8 H x W train ids; ``b.close()`` at the
    end. `push(frame, stream)` runs only the feature engine (to rebuild the ring for frames
    already done). Each of the `streams` streams has its own ring of features; `step` runs the
    current frame of several streams through the feature engine in one batch, then the temporal
    engine over those of them that want labels (at most `batch_limit` frames per engine call).
    `timings` accumulates seconds spent in the feature and temporal engines of inferred frames
    and in the feature engine of pushed frames ("push"), measured by `clock`: the host clock, or
    CUDA events on the device for backends that enqueue work asynchronously (the host clock
    would charge the feature engine's GPU time to whichever stage first waits for it).
    """

    name: ClassVar[str] = "base"

    def __init__(self, export_dir: str, manifest: Manifest, device: str,
                 streams: int = 1) -> None:
        if int(streams) < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.export_dir = export_dir
        self.manifest = manifest
        self.device = device
        self.streams = int(streams)
        #: the most frames one engine call takes (the subclass may lower it: a static graph, a
        #: TensorRT profile)
        self.batch_limit = self.streams
        self.height, self.width = int(manifest.height), int(manifest.width)
        self.timings: Dict[str, float] = {"feature": 0.0, "temporal": 0.0, "push": 0.0}
        #: frames labelled (the ones `timings["feature"]` and `["temporal"]` are summed over)
        self.frames = 0
        self.rings: List[FeatureRing[Any]] = []
        self.clock: Any = HostClock()

    # -- what a backend implements ---------------------------------------------------------------
    @classmethod
    def available(cls, device: str = "cpu") -> Tuple[bool, str]:
        """(True, what it will use) or (False, what to install / why not). Never raises."""
        raise NotImplementedError

    @classmethod
    def accepts(cls, manifest: Manifest) -> Tuple[bool, str]:
        """(False, why and what runs it) for an export this backend refuses here (a precision
        it cannot run as verified, or one `tbn-export --verify` found it computes wrongly);
        `auto` then tries the next backend. Never raises. Subclasses call this last."""
        check = (manifest.verified or {}).get(cls.name)
        if check is None or check.get("passed", True):
            return True, ""
        others = sorted(k for k, v in (manifest.verified or {}).items() if v.get("passed"))
        agree = check.get("labels_agree")
        measured = (f"labels {100 * agree:.1f}% equal to PyTorch's, "
                    f">= {100 * check.get('required', 0):.0f}% required, "
                    if isinstance(agree, (int, float)) else "")
        return False, (f"this {manifest.precision} export failed verification on the {cls.name} "
                       f"backend when it was exported ({measured}on "
                       f"{check.get('machine', 'the export machine')}): run it with "
                       f"--backend {' or '.join(others) or 'another backend'}, or export it "
                       f"again with --verify on this machine")

    def _run_feature(self, frames: np.ndarray, slots: List[Any]) -> None:
        """Run (or enqueue) the feature engine on frames (uint8 n x H x W x 3): the feature of
        frame i into ring slot slots[i]."""
        raise NotImplementedError

    def _run_temporal(self, current: List[Any], past: List[List[Any]]) -> np.ndarray:
        """Run the temporal engine on m streams' slots (current[i] with its past slots past[i]);
        return uint8 m x H x W labels on the host (so all enqueued work has finished)."""
        raise NotImplementedError

    def _synchronize(self) -> None:
        """Wait for work enqueued on the device (no-op for synchronous backends)."""

    def describe(self) -> str:
        """One line: backend, device and what executes (for the log and the stats)."""
        return f"{self.name} on {self.device}"

    def close(self) -> None:
        """Free device memory and engines. Idempotent."""

    # -- shared -----------------------------------------------------------------------------------
    def _make_rings(self, make_slot: Callable[[], Any]) -> None:
        """One ring per stream over slot buffers from make_slot() (1 slot for image models)."""
        offsets = self.offsets or (0,)
        self.rings = [FeatureRing([make_slot() for _ in range(max(offsets) + 1)], offsets)
                      for _ in range(self.streams)]

    @property
    def ring(self) -> Optional[FeatureRing[Any]]:
        """The first stream's ring (the only one of a single-stream backend)."""
        return self.rings[0] if self.rings else None

    @property
    def offsets(self) -> Tuple[int, ...]:
        return tuple(int(k) for k in self.manifest.temporal_offsets)

    def reset(self, stream: int = 0) -> None:
        """Start a new video on `stream`: its next frame is frame 0 (past indices clamp to it)."""
        self.rings[stream].reset()

    def _check_frame(self, frame: np.ndarray) -> np.ndarray:
        if (not isinstance(frame, np.ndarray) or frame.dtype != np.uint8
                or frame.shape != (self.height, self.width, 3)):
            got = (getattr(frame, "dtype", type(frame).__name__), getattr(frame, "shape", None))
            raise ValueError(f"{self.name} backend takes uint8 {self.height} x {self.width} x 3 "
                             f"BGR frames (the export size), got {got}")
        return frame

    def step(self, frames: Sequence[np.ndarray], streams: Sequence[int],
             classify: Sequence[bool]) -> List[Optional[np.ndarray]]:
        """The next frame of each of `streams` (distinct) through the feature engine, in
        batches of at most `batch_limit`; labels (uint8 H x W) for those with classify[i], None
        for the others (features only: frames whose labels exist, --resume)."""
        if not len(frames) == len(streams) == len(classify):
            raise ValueError("step() takes as many frames, streams and classify flags")
        if len(set(streams)) != len(streams) or not all(0 <= s < self.streams for s in streams):
            raise ValueError(f"streams must be distinct, in 0..{self.streams - 1}: {streams}")
        out: List[Optional[np.ndarray]] = [None] * len(frames)
        for lo in range(0, len(frames), self.batch_limit):
            idx = range(lo, min(lo + self.batch_limit, len(frames)))
            checked = [self._check_frame(frames[i]) for i in idx]
            # one frame: a view of it (the engine copies its input in anyway); several: one stack
            batch = (np.ascontiguousarray(checked[0])[None] if len(checked) == 1
                     else np.stack(checked))
            slots = [self.rings[streams[i]].write_target() for i in idx]
            want = [j for j, i in enumerate(idx) if classify[i]]
            past = [self.rings[streams[idx[j]]].past() if self.offsets else [] for j in want]
            self.clock.mark(0)
            self._run_feature(batch, slots)
            self.clock.mark(1)
            if not want:
                self._synchronize()
                self.timings["push"] += self.clock.seconds(0, 1)
                continue
            labels = self._run_temporal([slots[j] for j in want], past)
            self.clock.mark(2)
            self.timings["feature"] += self.clock.seconds(0, 1)
            self.timings["temporal"] += self.clock.seconds(1, 2)
            for k, j in enumerate(want):
                out[idx[j]] = labels[k]
            self.frames += len(want)
        return out

    def push(self, frame: np.ndarray, stream: int = 0) -> None:
        """Feature engine only: compute frame's feature into the stream's ring."""
        self.step([frame], [stream], [False])

    def infer(self, frame: np.ndarray, stream: int = 0) -> np.ndarray:
        """Feature engine into the write slot, then the temporal engine -> uint8 H x W labels."""
        labels = self.step([frame], [stream], [True])[0]
        assert labels is not None
        return labels

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a manifest dtype name ("float32", "float16", "uint8")."""
    try:
        return np.dtype(name)
    except TypeError as e:
        raise BackendError(f"unknown dtype {name!r} in the manifest; export again") from e
