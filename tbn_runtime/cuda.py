"""Raw CUDA through cuda-python (`cuda.bindings.runtime`), imported only when called.

NVIDIA's TensorRT samples manage buffers, streams and events with cuda-python since TensorRT
10.14 (pycuda builds from source against a CUDA toolkit and fights PyTorch for the context).
Every cuda-python call returns (error, *values); `check` turns an error into a one-line
CudaError naming the call. Nothing here swallows an error.
"""

from __future__ import annotations

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
