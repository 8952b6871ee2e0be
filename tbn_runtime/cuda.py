"""Raw CUDA through cuda-python (`cuda.bindings.runtime`), imported only when called.

NVIDIA's TensorRT samples manage buffers, streams and events with cuda-python since TensorRT
10.14 (pycuda builds from source against a CUDA toolkit and fights PyTorch for the context).
Every cuda-python call returns (error, *values); `check` turns an error into a one-line
CudaError naming the call. Nothing here swallows an error.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Tuple

from .errors import BackendError

INSTALL = ("pip install 'tbn-vit[gpu-cu12]' or 'tbn-vit[gpu-cu13]' (the CUDA major version of "
           "your driver: nvidia-smi)")


class CudaError(BackendError):
    """A failed CUDA runtime call, or cuda-python missing; one line."""


def runtime() -> Any:
    """The cuda-python runtime module (cuda.bindings.runtime; cuda.cudart before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as e:
            raise CudaError(f"cuda-python is not installed ({e}): {INSTALL}") from e
    return cudart


def check(result: Any, what: str = "CUDA call") -> Any:
    """cuda-python's (err, *values) -> the value(s); CudaError naming `what` on an error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    cudart = runtime()
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise CudaError(f"{what} failed: {name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def driver_gpu_count() -> int:
    """CUDA devices the NVIDIA driver reports, asked without torch or cuda-python: 0 at once on
    a Linux machine with no NVIDIA device node (nothing loaded), else libcuda through ctypes
    (cuInit + cuDeviceGetCount, which honour CUDA_VISIBLE_DEVICES); 0 where there is no driver.
    What `auto` asks first, so that a CPU-only machine never imports torch to learn it has no
    GPU (2 s and 1 GB) and is never told how to install CUDA packages."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return 0
    if sys.platform.startswith("linux") and not any(
            os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg")):
        return 0  # no NVIDIA kernel driver (/dev/dxg: WSL's GPU)
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so",
                                                             "/usr/lib/wsl/lib/libcuda.so.1"]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
        except AttributeError:
            return 0
        return int(count.value)
    return 0


def device_count() -> int:
    """CUDA devices visible to this process (CudaError if the driver cannot be reached)."""
    return int(check(runtime().cudaGetDeviceCount(), "cudaGetDeviceCount"))


def gpu_info(device: int = 0) -> Tuple[str, str]:
    """(name, compute capability 'major.minor') of a CUDA device; CudaError if there is none."""
    prop = check(runtime().cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"


class EventClock:
    """Stage timestamps from CUDA events recorded on a stream: the device's own time between
    enqueued work items (the backend interface's `clock`)."""

    def __init__(self, stream: Any, marks: int = 3) -> None:
        cudart = runtime()
        self.stream = stream
        self.events = []
        try:
            for _ in range(marks):
                self.events.append(check(cudart.cudaEventCreate(), "cudaEventCreate"))
        except BaseException:
            self.close()
            raise

    def mark(self, i: int) -> None:
        check(runtime().cudaEventRecord(self.events[i], self.stream), "cudaEventRecord")

    def seconds(self, a: int, b: int) -> float:
        check(runtime().cudaEventSynchronize(self.events[b]), "cudaEventSynchronize")
        ms = check(runtime().cudaEventElapsedTime(self.events[a], self.events[b]),
                   "cudaEventElapsedTime")
        return float(ms) / 1e3

    def close(self) -> None:
        cudart = runtime()
        for ev in self.events:
            cudart.cudaEventDestroy(ev)
        self.events = []
