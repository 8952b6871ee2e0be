"""ONNX Runtime backend: two sessions chained through IOBinding over a ring of OrtValues.

The ring slots are OrtValues allocated once on the session's device ('cuda' with the CUDA
execution provider of onnxruntime-gpu, else 'cpu'). The feature session's output is bound to
the write slot and the temporal session's inputs to the current and past slots, so features
never cross to the host; only the frame goes in and the uint8 labels come back.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..manifest import BATCH_AXIS, Manifest
from .base import Backend, BackendError, numpy_dtype

_CUDA_EP = "CUDAExecutionProvider"
#: export precisions ONNX Runtime refuses, and the backends that run them
BF16_BACKENDS = {"bf16": ("openvino", "torch")}
_CPU_EP = "CPUExecutionProvider"


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError("the ort backend needs ONNX Runtime: pip install onnxruntime "
                           "(for CUDA: pip install 'tbn-vit[gpu-cu12]')") from e
    return ort


def create_session(path: str, device: str = "cpu", *, spinning: bool = True,
                   threads: Optional[int] = None, profile_prefix: Optional[str] = None,
                   batch: Optional[int] = None) -> Any:
    """The one way tbn-vit opens an ONNX graph in ONNX Runtime: all optimisations on, quiet
    logs, the CUDA provider first on 'cuda' (CPU behind it for the ops CUDA lacks).

    spinning=False stops the intra-op threads from spin-waiting between runs: in a process that
    also runs PyTorch or a second session on the same cores, spinning threads steal the CPU
    from whatever runs next (the benchmarks interleave rows). threads: intra-op threads
    (default: ONNX Runtime's, one per core). profile_prefix: write ONNX Runtime's JSON profile
    (per-node timings) to files starting with it; `session.end_profiling()` returns the name.
    batch: pin the graph's batch axis to this size: ONNX Runtime then folds the shape arithmetic
    of a batch-agnostic graph as for a static one (as fast as a batch-1 export).
    Raises BackendError with ONNX Runtime's first line when the graph cannot be loaded.
    """
    ort = _import_ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if batch:
        opts.add_free_dimension_override_by_name(BATCH_AXIS, int(batch))
    providers = [_CUDA_EP, _CPU_EP] if device == "cuda" else [_CPU_EP]
    try:
        return ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendError(f"ONNX Runtime cannot load {path}: {first}") from e


class OrtBackend(Backend):
    name = "ort"

    @classmethod
    def available(cls, device: str = "cpu") -> Tuple[bool, str]:
        try:
            ort = _import_ort()
        except BackendError as e:
            return False, str(e)
        providers = ort.get_available_providers()
        if device == "cuda" and _CUDA_EP not in providers:
            return False, (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                           f"(providers: {', '.join(providers)}); for CUDA: pip uninstall -y "
                           f"onnxruntime && pip install 'tbn-vit[gpu-cu12]' (CUDA 12; CUDA 13 "
                           f"builds come from ONNX Runtime's own package feed)")
        return True, f"onnxruntime {ort.__version__} ({_CUDA_EP if device == 'cuda' else _CPU_EP})"

    @classmethod
    def accepts(cls, manifest: Manifest) -> Tuple[bool, str]:
        if manifest.precision in BF16_BACKENDS:
            return False, (f"ONNX Runtime has no fast bf16 kernels: run this "
                           f"{manifest.precision} export with --backend "
                           f"{' or '.join(BF16_BACKENDS[manifest.precision])}, or export "
                           f"fp32 / int8 for ort")
        return super().accepts(manifest)

    def __init__(self, export_dir: str, manifest: Manifest, device: str = "cpu",
                 streams: int = 1, *, spinning: bool = True,
                 threads: Optional[int] = None) -> None:
        super().__init__(export_dir, manifest, device, streams)
        ok, reason = self.available(device)
        if not ok:
            raise BackendError(reason)
        fits, why_not = self.accepts(manifest)
        if not fits:
            raise BackendError(why_not)
        ort = _import_ort()
        self._ort = ort
        feature_path = manifest.verify_file(export_dir, "feature.onnx")
        temporal_path = manifest.verify_file(export_dir, "temporal.onnx")
        pin = 1 if streams == 1 else None  # one stream: the batch axis is always 1
        self.feature_sess = create_session(feature_path, device, spinning=spinning, batch=pin,
                                           threads=threads)
        self.temporal_sess = create_session(temporal_path, device, spinning=spinning, batch=pin,
                                            threads=threads)
        if device == "cuda" and _CUDA_EP not in self.feature_sess.get_providers():
            raise BackendError("ONNX Runtime did not start the CUDA execution provider (no GPU "
                               "or CUDA/cuDNN libraries missing); use --device cpu")
        self._check_names()
        self._dev = "cuda" if device == "cuda" else "cpu"
        # exports made before the batch axis take one frame per call
        if self.feature_sess.get_inputs()[0].shape[0] == 1:
            self.batch_limit = 1
        if self._dev == "cuda" and self.batch_limit > 1:
            try:  # batches gather and scatter ring slots on the device with cuda-python
                from .. import cuda
                cuda.runtime()
                self._cuda = cuda
            except BackendError:
                self.batch_limit = 1
        self._fshape = [int(d) for d in manifest.feature_shape][1:]
        self._fdtype = numpy_dtype(manifest.feature_dtype)
        self._arrays: Dict[int, np.ndarray] = {}
        self._make_rings(lambda: self._value(1))
        self._frames: Dict[int, Any] = {}    # batch size -> frame OrtValue on the device
        self._labels: Dict[int, Any] = {}    # batch size -> (host array, OrtValue over it)
        self._staging: Dict[Tuple[str, int], Any] = {}
        self._fio = self.feature_sess.io_binding()
        self._tio = self.temporal_sess.io_binding()
        if manifest.logits_output:
            # not needed for labels; kept on the device so it costs no transfer
            self._tio.bind_output(manifest.logits_output, self._dev)

    def _value(self, n: int) -> Any:
        """An n x C x h x w feature OrtValue on the session's device (a ring slot, or staging).
        On the CPU it shares its memory with a numpy array (kept in _arrays), so copies between
        slots and staging are numpy's."""
        ov = self._ort.OrtValue
        if self._dev == "cpu":
            array = np.zeros([n] + self._fshape, self._fdtype)
            value = ov.ortvalue_from_numpy(array)
            self._arrays[id(value)] = array
            return value
        return ov.ortvalue_from_shape_and_type([n] + self._fshape, self._fdtype, "cuda", 0)

    def _copy_rows(self, pairs: List[Tuple[Any, int, Any, int]]) -> None:
        """Copy one feature each (dst value, dst row, src value, src row) on the device."""
        row = int(np.prod(self._fshape)) * self._fdtype.itemsize
        for dst, i, src, j in pairs:
            if self._dev == "cpu":
                np.copyto(self._arrays[id(dst)][i], self._arrays[id(src)][j])
            else:
                cudart = self._cuda.runtime()
                self._cuda.check(cudart.cudaMemcpy(dst.data_ptr() + i * row,
                                                   src.data_ptr() + j * row, row,
                                                   cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice),
                                 "cudaMemcpy (ring slot)")

    def _frame_value(self, n: int) -> Any:
        if n not in self._frames:
            self._frames[n] = self._ort.OrtValue.ortvalue_from_shape_and_type(
                [n, self.height, self.width, 3], np.uint8, self._dev, 0)
        return self._frames[n]

    def _labels_value(self, n: int) -> Tuple[np.ndarray, Any]:
        if n not in self._labels:
            host = np.zeros((n, self.height, self.width), numpy_dtype(self.manifest.label_dtype))
            self._labels[n] = (host, self._ort.OrtValue.ortvalue_from_numpy(host))
        return self._labels[n]

    def _stage(self, what: str, n: int) -> Any:
        if (what, n) not in self._staging:
            self._staging[(what, n)] = self._value(n)
        return self._staging[(what, n)]

    def _check_names(self) -> None:
        m = self.manifest
        fin = [i.name for i in self.feature_sess.get_inputs()]
        fout = [o.name for o in self.feature_sess.get_outputs()]
        tin = [i.name for i in self.temporal_sess.get_inputs()]
        tout = [o.name for o in self.temporal_sess.get_outputs()]
        want_tin = [m.current_input] + list(m.past_inputs)
        if (fin != [m.frame_input] or m.feature_output not in fout
                or sorted(tin) != sorted(want_tin) or m.labels_output not in tout
                or len(m.past_inputs) != len(m.temporal_offsets)):
            raise BackendError(
                f"the ONNX files in {self.export_dir} do not match its manifest (feature "
                f"{fin}->{fout}, temporal {tin}->{tout}); export again with tbn-export")

    def describe(self) -> str:
        streams = (f", {self.streams} streams in batches of up to {self.batch_limit}"
                   if self.streams > 1 else "")
        return (f"ort {self._ort.__version__} on {self.device} "
                f"({self.feature_sess.get_providers()[0]}, IOBinding, ring of "
                f"{self.manifest.ring_size} OrtValues on '{self._dev}'{streams})")

    def _run_feature(self, frames: np.ndarray, slots: List[Any]) -> None:
        n = len(slots)
        frame = self._frame_value(n)
        frame.update_inplace(frames)
        self._fio.bind_ortvalue_input(self.manifest.frame_input, frame)
        # one frame: straight into its ring slot; a batch: into staging, then to the slots
        out = slots[0] if n == 1 else self._stage("feature", n)
        self._fio.bind_ortvalue_output(self.manifest.feature_output, out)
        self.feature_sess.run_with_iobinding(self._fio)
        if n > 1:
            self._copy_rows([(slot, 0, out, i) for i, slot in enumerate(slots)])

    def _run_temporal(self, current: List[Any], past: List[List[Any]]) -> np.ndarray:
        m, man = len(current), self.manifest
        names = [man.current_input] + list(man.past_inputs)
        columns = [current] + [[p[k] for p in past] for k in range(len(man.past_inputs))]
        for name, column in zip(names, columns):
            if m == 1:
                value = column[0]
            else:
                value = self._stage(name, m)
                self._copy_rows([(value, i, slot, 0) for i, slot in enumerate(column)])
            self._tio.bind_ortvalue_input(name, value)
        host, labels = self._labels_value(m)
        self._tio.bind_ortvalue_output(man.labels_output, labels)
        self.temporal_sess.run_with_iobinding(self._tio)
        return host.copy()

    def close(self) -> None:
        self.rings = []
        for attr in ("_fio", "_tio", "feature_sess", "temporal_sess", "_frames", "_labels",
                     "_staging", "_arrays"):
            if hasattr(self, attr):
                delattr(self, attr)
