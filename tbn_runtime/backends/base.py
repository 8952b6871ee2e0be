"""The backend interface: one frame in, its labels out, past features kept in a device ring.

Every backend (TensorRT, ONNX Runtime, PyTorch) implements the same two steps over its own
storage: run the feature engine on the frame into the ring's write slot, then run the temporal
engine on the current slot and the past slots. The index logic is `tbn_runtime.temporal`'s
FeatureRing, shared by all; a backend only supplies the slot buffers and the two engine calls.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..manifest import Manifest
from ..temporal import FeatureRing


class BackendError(RuntimeError):
    """A backend that cannot run here (not installed, wrong GPU, bad engine); one-line message."""


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

    Usage: ``b = Cls(export_dir, manifest, device)``; per video ``b.reset()``; per frame
    ``labels = b.infer(frame)`` with frame uint8 H x W x 3 BGR at the export size
    (manifest.height x manifest.width), labels uint8 H x W train ids; ``b.close()`` at the end.
    `push(frame)` runs only the feature engine (to rebuild the ring for frames already done).
    `timings` accumulates seconds spent in the feature and temporal engines of inferred frames
    and in the feature engine of pushed frames ("push"), measured by
    `clock`: the host clock, or CUDA events on the device for backends that enqueue work
    asynchronously (the host clock would charge the feature engine's GPU time to whichever
    stage first waits for it).
    """

    name: ClassVar[str] = "base"

    def __init__(self, export_dir: str, manifest: Manifest, device: str) -> None:
        self.export_dir = export_dir
        self.manifest = manifest
        self.device = device
        self.height, self.width = int(manifest.height), int(manifest.width)
        self.timings: Dict[str, float] = {"feature": 0.0, "temporal": 0.0, "push": 0.0}
        self.frames = 0
        self.ring: Optional[FeatureRing[Any]] = None
        self.clock: Any = HostClock()

    # -- what a backend implements ---------------------------------------------------------------
    @classmethod
    def available(cls, device: str = "cpu") -> Tuple[bool, str]:
        """(True, what it will use) or (False, what to install / why not). Never raises."""
        raise NotImplementedError

    def _run_feature(self, frame: np.ndarray, slot: Any) -> None:
        """Run (or enqueue) the feature engine on frame (uint8 1 x H x W x 3) into `slot`."""
        raise NotImplementedError

    def _run_temporal(self, current: Any, past: List[Any]) -> np.ndarray:
        """Run the temporal engine on the slots; return uint8 H x W labels on the host (so
        every enqueued work item has finished when it returns)."""
        raise NotImplementedError

    def _synchronize(self) -> None:
        """Wait for work enqueued on the device (no-op for synchronous backends)."""

    def describe(self) -> str:
        """One line: backend, device and what executes (for the log and the stats)."""
        return f"{self.name} on {self.device}"

    def close(self) -> None:
        """Free device memory and engines. Idempotent."""

    # -- shared -----------------------------------------------------------------------------------
    def _make_ring(self, storage: Sequence[Any]) -> FeatureRing[Any]:
        """The ring over the backend's slot buffers (1 slot for image models)."""
        offsets = self.offsets or (0,)
        self.ring = FeatureRing(list(storage), offsets)
        return self.ring

    @property
    def offsets(self) -> Tuple[int, ...]:
        return tuple(int(k) for k in self.manifest.temporal_offsets)

    def reset(self) -> None:
        """Start a new video: the next frame is frame 0 (past indices clamp to it)."""
        assert self.ring is not None, "backend did not create its ring"
        self.ring.reset()

    def _check_frame(self, frame: np.ndarray) -> np.ndarray:
        if (not isinstance(frame, np.ndarray) or frame.dtype != np.uint8
                or frame.shape != (self.height, self.width, 3)):
            got = (getattr(frame, "dtype", type(frame).__name__), getattr(frame, "shape", None))
            raise ValueError(f"{self.name} backend takes uint8 {self.height} x {self.width} x 3 "
                             f"BGR frames (the export size), got {got}")
        return np.ascontiguousarray(frame)[None]

    def push(self, frame: np.ndarray) -> Any:
        """Feature engine only: compute frame's feature into the ring; returns the slot."""
        x = self._check_frame(frame)
        assert self.ring is not None, "backend did not create its ring"
        slot = self.ring.write_target()
        self.clock.mark(0)
        self._run_feature(x, slot)
        self.clock.mark(1)
        self._synchronize()
        self.timings["push"] += self.clock.seconds(0, 1)
        return slot

    def infer(self, frame: np.ndarray) -> np.ndarray:
        """Feature engine into the write slot, then the temporal engine -> uint8 H x W labels."""
        x = self._check_frame(frame)
        assert self.ring is not None, "backend did not create its ring"
        slot = self.ring.write_target()
        past = self.ring.past() if self.offsets else []
        self.clock.mark(0)
        self._run_feature(x, slot)
        self.clock.mark(1)
        labels = self._run_temporal(slot, past)
        self.clock.mark(2)
        self.timings["feature"] += self.clock.seconds(0, 1)
        self.timings["temporal"] += self.clock.seconds(1, 2)
        self.frames += 1
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
