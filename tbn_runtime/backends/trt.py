"""TensorRT backend: two engines, cuda-python buffers, the feature ring as device pointers.

As NVIDIA's TensorRT samples do since 10.14, buffers and streams come from cuda-python
(`cuda.bindings.runtime`). The ring slots are cudaMalloc'd buffers: the feature engine's output
address is set to the write slot, the temporal engine's input addresses to the current and past
slots, so features never leave the GPU. The frame goes in and the labels come out through
page-locked host buffers with cudaMemcpyAsync on one stream; CUDA events time the two engines.
tensorrt and cuda-python are imported only when this backend is used.
"""

from __future__ import annotations

import ctypes
from typing import Any, List, Optional, Tuple

import numpy as np

from .. import cuda
from ..manifest import Manifest
from .base import Backend, BackendError, numpy_dtype

_REBUILD = "rebuild the engines here with `tbn-export --engine-only`"


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a wheel whose CUDA libraries are missing
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BackendError(f"the trt backend needs TensorRT ({first}): {cuda.INSTALL}") from e
    return trt


class _Pinned:
    """A page-locked host buffer viewed as a numpy array."""

    def __init__(self, shape: Tuple[int, ...], dtype: np.dtype) -> None:
        cudart = cuda.runtime()
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.ptr = cuda.check(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost")
        raw = np.ctypeslib.as_array(ctypes.cast(self.ptr, ctypes.POINTER(ctypes.c_uint8)),
                                    (self.nbytes,))
        self.array = raw.view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr is not None:
            cuda.runtime().cudaFreeHost(self.ptr)
            self.ptr = None


class TrtBackend(Backend):
    name = "trt"

    @classmethod
    def available(cls, device: str = "cuda") -> Tuple[bool, str]:
        if device == "cpu":
            return False, "TensorRT runs on a GPU only (use --device cuda or another backend)"
        try:
            trt = _import_trt()
            count = cuda.device_count()
        except BackendError as e:
            return False, str(e)
        if not count:
            return False, "no CUDA device found"
        return True, f"TensorRT {trt.__version__}"

    def __init__(self, export_dir: str, manifest: Manifest, device: str = "cuda",
                 streams: int = 1, threads: Optional[int] = None) -> None:
        del threads  # the engines run on the GPU: there is no CPU pool to size
        super().__init__(export_dir, manifest, device, streams)
        ok, reason = self.available(device)
        if not ok:
            raise BackendError(reason)
        self._trt, self._cudart = _import_trt(), cuda.runtime()
        self._dev_buffers: List[int] = []
        self._pinned: List[_Pinned] = []
        self.stream = None
        try:  # whatever fails below, the stream, events and buffers made so far are freed
            self._check_build(self._trt)
            self._logger = self._trt.Logger(self._trt.Logger.WARNING)
            self._runtime = self._trt.Runtime(self._logger)
            self.feature_engine = self._load(manifest.verify_file(export_dir, "feature.engine"))
            self.temporal_engine = self._load(manifest.verify_file(export_dir,
                                                                   "temporal.engine"))
            self.feature_ctx = self._context(self.feature_engine, "feature")
            self.temporal_ctx = self._context(self.temporal_engine, "temporal")
            #: (feature, temporal) context per optimization profile; engines built by this
            #: tbn-export have profile 0 for one frame (tuned for it) and 1 for 2..max_batch
            self._contexts: List[Tuple[Any, Any]] = [(self.feature_ctx, self.temporal_ctx)]
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _context(self, engine: Any, which: str) -> Any:
        ctx = engine.create_execution_context()
        if ctx is None:  # TensorRT returns None when it cannot (e.g. out of device memory)
            raise BackendError(f"TensorRT could not create an execution context for the {which} "
                               f"engine in {self.export_dir} (out of GPU memory?)")
        return ctx

    def _bind(self, ctx: Any, name: str, ptr: int) -> None:
        if not ctx.set_tensor_address(name, int(ptr)):
            raise BackendError(f"TensorRT refused the address of tensor '{name}' (not a tensor "
                               f"of this engine, or misaligned); {_REBUILD}")

    def _check_build(self, trt: Any) -> None:
        built = self.manifest.tensorrt or {}
        if not built:
            raise BackendError(f"{self.export_dir} has no TensorRT build record in its manifest; "
                               f"{_REBUILD}")
        name, cc = cuda.gpu_info()
        problems = []
        if str(built.get("version")) != trt.__version__:
            problems.append(f"TensorRT {built.get('version')} (this is {trt.__version__})")
        want_cc = built.get("compute_capability")
        if want_cc is not None and str(want_cc) != cc:
            problems.append(f"compute capability {want_cc} (this GPU, {name}, is {cc})")
        elif want_cc is None and built.get("gpu") and str(built.get("gpu")) != name:
            problems.append(f"GPU {built.get('gpu')} (this is {name})")
        if problems:
            raise BackendError(f"the engines in {self.export_dir} were built for "
                               f"{' and '.join(problems)}; {_REBUILD}")

    def _load(self, path: str) -> Any:
        with open(path, "rb") as f:
            engine = self._runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise BackendError(f"TensorRT could not deserialize {path}; {_REBUILD}")
        return engine

    def _tensor(self, engine: Any, name: str) -> Tuple[Tuple[int, ...], np.dtype, int]:
        """(the shape of one frame's tensor, its dtype, the most frames the engine takes)."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if name not in names:
            raise BackendError(f"engine in {self.export_dir} has no tensor '{name}' (has "
                               f"{names}); {_REBUILD}")
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        if any(d < 0 for d in shape[1:]):
            raise BackendError(f"tensor '{name}' has a dynamic shape {shape} beyond its batch "
                               f"axis; {_REBUILD}")
        most = shape[0]
        if most < 0:  # the batch axis: its optimization profiles say how many frames fit
            if engine.get_tensor_mode(name) == self._trt.TensorIOMode.INPUT:
                most = max(int(engine.get_tensor_profile_shape(name, p)[2][0])
                           for p in range(engine.num_optimization_profiles))
            else:
                most = 1 << 30  # outputs follow the inputs
        return (1,) + shape[1:], np.dtype(self._trt.nptype(engine.get_tensor_dtype(name))), most

    def _malloc(self, nbytes: int) -> int:
        ptr = int(cuda.check(self._cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))
        self._dev_buffers.append(ptr)
        return ptr

    def _allocate(self) -> None:
        m, cudart = self.manifest, self._cudart
        self.stream = cuda.check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.clock = cuda.EventClock(self.stream)
        profiles = min(self.feature_engine.num_optimization_profiles,
                       self.temporal_engine.num_optimization_profiles)
        for p in range(1, profiles):  # a context per profile: no switching between calls
            pair = (self._context(self.feature_engine, "feature"),
                    self._context(self.temporal_engine, "temporal"))
            for ctx in pair:
                if not ctx.set_optimization_profile_async(p, int(self.stream)):
                    raise BackendError(f"TensorRT refused optimization profile {p}; {_REBUILD}")
            self._contexts.append(pair)
        fshape, fdtype, _ = self._tensor(self.feature_engine, m.feature_output)
        if list(fshape) != [int(d) for d in m.feature_shape] or fdtype != numpy_dtype(
                m.feature_dtype):
            raise BackendError(f"feature engine output {fshape} {fdtype} differs from the "
                               f"manifest; {_REBUILD}")
        in_shape, _, most = self._tensor(self.feature_engine, m.frame_input)
        for name in [m.current_input] + list(m.past_inputs):
            most = min(most, self._tensor(self.temporal_engine, name)[2])
        self.batch_limit = max(1, min(self.streams, most))
        n = self.batch_limit
        self._slot_bytes = int(np.prod(fshape)) * fdtype.itemsize
        self._make_rings(lambda: self._malloc(self._slot_bytes))
        # a batch goes through staging buffers, copied to and from the ring slots on the device
        self._staging = {name: self._malloc(n * self._slot_bytes)
                         for name in ([m.feature_output, m.current_input] + list(m.past_inputs)
                                      if n > 1 else [])}

        self._frame_host = _Pinned((n,) + in_shape[1:], np.dtype(np.uint8))
        self._pinned.append(self._frame_host)
        self._frame_dev = self._malloc(self._frame_host.nbytes)
        for fctx, _ in self._contexts:
            self._bind(fctx, m.frame_input, self._frame_dev)

        lshape, ldtype, _ = self._tensor(self.temporal_engine, m.labels_output)
        self._labels_host = _Pinned((n,) + lshape[1:], ldtype)
        self._pinned.append(self._labels_host)
        self._labels_dev = self._malloc(self._labels_host.nbytes)
        for _, tctx in self._contexts:
            self._bind(tctx, m.labels_output, self._labels_dev)
        if m.logits_output:
            shape, dtype, _ = self._tensor(self.temporal_engine, m.logits_output)
            logits = self._malloc(n * int(np.prod(shape)) * dtype.itemsize)
            for _, tctx in self._contexts:
                self._bind(tctx, m.logits_output, logits)
        self._gpu = cuda.gpu_info()

    def _pair(self, n: int) -> Tuple[Any, Any]:
        """The (feature, temporal) contexts whose profile takes n frames: profile 0 (one frame)
        for n == 1, the batch profile for more (one profile: the only one)."""
        return self._contexts[0 if n == 1 else len(self._contexts) - 1]

    def _shape(self, ctx: Any, engine: Any, name: str, n: int) -> None:
        """Tell a context with a batch axis how many frames come (static engines: nothing)."""
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        if shape[0] < 0 and not ctx.set_input_shape(name, (n,) + shape[1:]):
            raise BackendError(f"TensorRT refused a batch of {n} for '{name}' (its profile "
                               f"takes 1..{self.batch_limit}); {_REBUILD}")

    def _copy(self, dst: int, src: int, nbytes: int) -> None:
        cudart = self._cudart
        cuda.check(cudart.cudaMemcpyAsync(dst, src, nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                          self.stream), "cudaMemcpyAsync (ring slot)")

    def describe(self) -> str:
        name, cc = self._gpu
        streams = (f", {self.streams} streams in batches of up to {self.batch_limit}"
                   if self.streams > 1 else "")
        return (f"trt {self._trt.__version__} on {name} (sm {cc}), ring of "
                f"{self.manifest.ring_size} device buffers{streams}")

    def _run_feature(self, frames: np.ndarray, slots: List[Any]) -> None:
        cudart, s, m, n = self._cudart, self.stream, self.manifest, len(slots)
        host = self._frame_host.array[:n]
        np.copyto(host, frames)
        cuda.check(cudart.cudaMemcpyAsync(self._frame_dev, self._frame_host.ptr, host.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, s),
                   "cudaMemcpyAsync (frames to device)")
        ctx = self._pair(n)[0]
        self._shape(ctx, self.feature_engine, m.frame_input, n)
        # one frame: straight into its ring slot; a batch: into staging, then to the slots
        out = slots[0] if n == 1 else self._staging[m.feature_output]
        self._bind(ctx, m.feature_output, out)
        if not ctx.execute_async_v3(int(s)):
            raise BackendError("TensorRT feature engine failed to enqueue")
        if n > 1:
            for i, slot in enumerate(slots):
                self._copy(int(slot), out + i * self._slot_bytes, self._slot_bytes)

    def _run_temporal(self, current: List[Any], past: List[List[Any]]) -> np.ndarray:
        cudart, s, m, n = self._cudart, self.stream, self.manifest, len(current)
        names = [m.current_input] + list(m.past_inputs)
        columns = [current] + [[p[k] for p in past] for k in range(len(m.past_inputs))]
        ctx = self._pair(n)[1]
        for name, column in zip(names, columns):
            self._shape(ctx, self.temporal_engine, name, n)
            if n == 1:
                self._bind(ctx, name, column[0])
                continue
            staging = self._staging[name]
            for i, slot in enumerate(column):
                self._copy(staging + i * self._slot_bytes, int(slot), self._slot_bytes)
            self._bind(ctx, name, staging)
        if not ctx.execute_async_v3(int(s)):
            raise BackendError("TensorRT temporal engine failed to enqueue")
        host = self._labels_host.array[:n]
        cuda.check(cudart.cudaMemcpyAsync(self._labels_host.ptr, self._labels_dev, host.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, s),
                   "cudaMemcpyAsync (labels to host)")
        self._synchronize()
        return host.reshape(n, self.height, self.width).copy()

    def _synchronize(self) -> None:
        cuda.check(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        if self.stream is not None:
            cudart.cudaStreamSynchronize(self.stream)
        self._contexts = []
        for attr in ("feature_ctx", "temporal_ctx", "feature_engine", "temporal_engine"):
            if hasattr(self, attr):  # contexts and engines before the memory they use
                delattr(self, attr)
        for ptr in self._dev_buffers:
            cudart.cudaFree(ptr)
        self._dev_buffers = []
        for p in self._pinned:
            p.free()
        self._pinned = []
        if isinstance(self.clock, cuda.EventClock):
            self.clock.close()
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.rings = []
