"""The cuda-python plumbing of the trt backend, exercised without TensorRT (cuda-bindings is
all it needs): page-locked buffers, async copies on a stream, CUDA events, and the one-line
error of an impossible cudaMalloc. Every test id contains "cuda" (`pytest -k cuda`); without a
GPU or cuda-python each skips with its reason."""

import numpy as np
import pytest

from tbn_runtime import cuda


def _reason():
    try:
        cuda.runtime()
    except cuda.CudaError as e:
        return str(e)
    if not cuda.driver_gpu_count():
        return "no CUDA device (the NVIDIA driver reports none)"
    return None


pytestmark = pytest.mark.skipif(_reason() is not None, reason=str(_reason()))


@pytest.fixture
def stream():
    cudart = cuda.runtime()
    s = cuda.check(cudart.cudaStreamCreate(), "cudaStreamCreate")
    yield s
    cudart.cudaStreamDestroy(s)


def test_cuda_driver_probe_agrees_with_cuda_python():
    assert cuda.driver_gpu_count() == cuda.device_count() > 0
    name, cc = cuda.gpu_info()
    assert name and "." in cc


def test_cuda_pinned_buffers_and_async_copies_round_trip(stream):
    from tbn_runtime.backends.trt import _Pinned

    cudart = cuda.runtime()
    kind = cudart.cudaMemcpyKind
    src, back = _Pinned((3, 64, 96, 3), np.dtype(np.uint8)), _Pinned((3, 64, 96, 3),
                                                                     np.dtype(np.uint8))
    try:
        data = np.random.default_rng(0).integers(0, 256, src.array.shape, dtype=np.uint8)
        np.copyto(src.array, data)
        a = cuda.check(cudart.cudaMalloc(src.nbytes), "cudaMalloc")
        b = cuda.check(cudart.cudaMalloc(src.nbytes), "cudaMalloc")
        clock = cuda.EventClock(stream)
        try:
            clock.mark(0)
            cuda.check(cudart.cudaMemcpyAsync(a, src.ptr, src.nbytes,
                                              kind.cudaMemcpyHostToDevice, stream), "H2D")
            clock.mark(1)
            row = src.nbytes // 3  # the ring's row copies: rows reversed on the device
            for i in range(3):
                cuda.check(cudart.cudaMemcpyAsync(int(b) + i * row, int(a) + (2 - i) * row, row,
                                                  kind.cudaMemcpyDeviceToDevice, stream), "D2D")
            cuda.check(cudart.cudaMemcpyAsync(back.ptr, b, back.nbytes,
                                              kind.cudaMemcpyDeviceToHost, stream), "D2H")
            clock.mark(2)
            assert clock.seconds(0, 1) >= 0 and clock.seconds(1, 2) >= 0  # waits on events
            cuda.check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            np.testing.assert_array_equal(back.array, data[::-1])
        finally:
            clock.close()
            cudart.cudaFree(a)
            cudart.cudaFree(b)
    finally:
        src.free()
        back.free()
        src.free()  # idempotent


def test_cuda_impossible_malloc_is_one_line_naming_the_call():
    from tbn_runtime.backends.trt import TrtBackend

    backend = TrtBackend.__new__(TrtBackend)  # the allocation path alone, no engines
    backend._cudart, backend._dev_buffers, backend._pinned = cuda.runtime(), [], []
    with pytest.raises(cuda.CudaError) as e:
        backend._malloc(1 << 62)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cudaMalloc({1 << 62}) failed: cudaError")
    assert backend._dev_buffers == []  # nothing recorded to free
    ptr = backend._malloc(1 << 20)
    assert backend._dev_buffers == [ptr]
    cuda.runtime().cudaFree(ptr)
