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


class Backend:
    """Base class of the backends. Subclasses set `name` and implement the `_` methods.

    Usage: ``b = Cls(export_dir, manifest, device)``; per video ``b.reset()``; per frame
    ``labels = b.infer(frame)`` with frame uint8 H x W x 3 BGR at the export size
    (manifest.height x manifest.width), labels uint8 H x W train ids; ``b.close()`` at the end.
    `push(frame)` runs only the feature engine (to rebuild the ring for frames already done).
    `timings` accumulates seconds spent in the feature and temporal engines.
    """

    name: ClassVar[str] = "base"
    #: what to install when `available()` says no.
    install_hint: ClassVar[str] = ""

    def __init__(self, export_dir: str, manifest: Manifest, device: str) -> None:
        self.export_dir = export_dir
        self.manifest = manifest
        self.device = device
        self.height, self.width = int(manifest.height), int(manifest.width)
        self.timings: Dict[str, float] = {"feature": 0.0, "temporal": 0.0}
        self.frames = 0
        self.ring: Optional[FeatureRing[Any]] = None

    # -- what a backend implements ---------------------------------------------------------------
    @classmethod
    def available(cls, device: str = "cpu") -> Tuple[bool, str]:
        """(True, what it will use) or (False, what to install / why not). Never raises."""
        raise NotImplementedError

    def _run_feature(self, frame: np.ndarray, slot: Any) -> None:
        """Run the feature engine on frame (uint8 1 x H x W x 3) into the ring slot `slot`."""
        raise NotImplementedError

    def _run_temporal(self, current: Any, past: List[Any]) -> np.ndarray:
        """Run the temporal engine on the slots; return uint8 H x W labels on the host."""
        raise NotImplementedError

    def _stage_seconds(self) -> Optional[Tuple[float, float]]:
        """(feature, temporal) seconds of the last frame measured on the device, if the backend
        runs asynchronously (TensorRT: CUDA events); None means host wall clock is right."""
        return None

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
        t0 = time.perf_counter()
        self._run_feature(x, slot)
        self.timings["feature"] += time.perf_counter() - t0
        return slot

    def infer(self, frame: np.ndarray) -> np.ndarray:
        """Feature engine into the write slot, then the temporal engine -> uint8 H x W labels."""
        x = self._check_frame(frame)
        assert self.ring is not None, "backend did not create its ring"
        slot = self.ring.write_target()
        past = self.ring.past() if self.offsets else []
        t0 = time.perf_counter()
        self._run_feature(x, slot)
        t1 = time.perf_counter()
        labels = self._run_temporal(slot, past)
        t2 = time.perf_counter()
        device = self._stage_seconds()
        if device is not None:
            self.timings["feature"] += device[0]
            self.timings["temporal"] += device[1]
        else:
            self.timings["feature"] += t1 - t0
            self.timings["temporal"] += t2 - t1
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
