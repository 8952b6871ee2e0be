"""ONNX Runtime backend: two sessions chained through IOBinding over a ring of OrtValues.

The ring slots are OrtValues allocated once on the session's device ('cuda' with the CUDA
execution provider of onnxruntime-gpu, else 'cpu'). The feature session's output is bound to
the write slot and the temporal session's inputs to the current and past slots, so features
never cross to the host; only the frame goes in and the uint8 labels come back.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from ..manifest import Manifest
from .base import Backend, BackendError, numpy_dtype

_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError("the ort backend needs ONNX Runtime: pip install onnxruntime "
                           "(for CUDA: pip install 'tbn-vit[gpu-cu12]')") from e
    return ort


def create_session(path: str, device: str = "cpu", *, spinning: bool = True,
                   threads: Optional[int] = None, profile_prefix: Optional[str] = None) -> Any:
    """The one way tbn-vit opens an ONNX graph in ONNX Runtime: all optimisations on, quiet
    logs, the CUDA provider first on 'cuda' (CPU behind it for the ops CUDA lacks).

    spinning=False stops the intra-op threads from spin-waiting between runs: in a process that
    also runs PyTorch or a second session on the same cores, spinning threads steal the CPU
    from whatever runs next (the benchmarks interleave rows). threads: intra-op threads
    (default: ONNX Runtime's, one per core). profile_prefix: write ONNX Runtime's JSON profile
    (per-node timings) to files starting with it; `session.end_profiling()` returns the name.
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
                           f"onnxruntime && pip install 'tbn-vit[gpu-cu12]' (CUDA 12; CUDA 13 builds "
                           f"come from ONNX Runtime's own package feed)")
        return True, f"onnxruntime {ort.__version__} ({_CUDA_EP if device == 'cuda' else _CPU_EP})"

    def __init__(self, export_dir: str, manifest: Manifest, device: str = "cpu", *,
                 spinning: bool = True) -> None:
        super().__init__(export_dir, manifest, device)
        ok, reason = self.available(device)
        if not ok:
            raise BackendError(reason)
        ort = _import_ort()
        self._ort = ort
        feature_path = manifest.verify_file(export_dir, "feature.onnx")
        temporal_path = manifest.verify_file(export_dir, "temporal.onnx")
        self.feature_sess = create_session(feature_path, device, spinning=spinning)
        self.temporal_sess = create_session(temporal_path, device, spinning=spinning)
        if device == "cuda" and _CUDA_EP not in self.feature_sess.get_providers():
            raise BackendError("ONNX Runtime did not start the CUDA execution provider (no GPU "
                               "or CUDA/cuDNN libraries missing); use --device cpu")
        self._check_names()
        dev = "cuda" if device == "cuda" else "cpu"
        self._dev = dev
        ov = ort.OrtValue

        fshape = [int(d) for d in manifest.feature_shape]
        fdtype = numpy_dtype(manifest.feature_dtype)
        slots = [ov.ortvalue_from_shape_and_type(fshape, fdtype, dev, 0)
                 for _ in range(manifest.ring_size)]
        self._make_ring(slots)

        # The frame goes to the device once per frame (update_inplace copies host -> OrtValue);
        # the labels come back into a host array bound as the temporal output.
        self._frame = ov.ortvalue_from_shape_and_type([1, self.height, self.width, 3],
                                                      np.uint8, dev, 0)
        self._labels_host = np.zeros((1, self.height, self.width), dtype=numpy_dtype(
            manifest.label_dtype))
        self._labels = ov.ortvalue_from_numpy(self._labels_host)

        self._fio = self.feature_sess.io_binding()
        self._fio.bind_ortvalue_input(manifest.frame_input, self._frame)
        self._tio = self.temporal_sess.io_binding()
        self._tio.bind_ortvalue_output(manifest.labels_output, self._labels)
        if manifest.logits_output:
            # not needed for labels; kept on the device so it costs no transfer
            self._tio.bind_output(manifest.logits_output, dev)

    def _check_names(self) -> None:
        m = self.manifest
        fin = [i.name for i in self.feature_sess.get_inputs()]
        fout = [o.name for o in self.feature_sess.get_outputs()]
        tin = [i.name for i in self.temporal_sess.get_inputs()]
        tout = [o.name for o in self.temporal_sess.get_outputs()]
        want_tin = [m.current_input] + list(m.past_inputs)
        if (fin != [m.frame_input] or m.feature_output not in fout or sorted(tin) != sorted(want_tin)
                or m.labels_output not in tout or len(m.past_inputs) != len(m.temporal_offsets)):
            raise BackendError(
                f"the ONNX files in {self.export_dir} do not match its manifest (feature "
                f"{fin}->{fout}, temporal {tin}->{tout}); export again with tbn-export")

    def describe(self) -> str:
        return (f"ort {self._ort.__version__} on {self.device} "
                f"({self.feature_sess.get_providers()[0]}, IOBinding, ring of "
                f"{self.manifest.ring_size} OrtValues on '{self._dev}')")

    def _run_feature(self, frame: np.ndarray, slot: Any) -> None:
        self._frame.update_inplace(frame)
        self._fio.bind_ortvalue_output(self.manifest.feature_output, slot)
        self.feature_sess.run_with_iobinding(self._fio)

    def _run_temporal(self, current: Any, past: List[Any]) -> np.ndarray:
        m = self.manifest
        self._tio.bind_ortvalue_input(m.current_input, current)
        for name, value in zip(m.past_inputs, past):
            self._tio.bind_ortvalue_input(name, value)
        self.temporal_sess.run_with_iobinding(self._tio)
        return self._labels_host[0].copy()

    def close(self) -> None:
        for attr in ("_fio", "_tio", "feature_sess", "temporal_sess", "_frame", "_labels"):
            if hasattr(self, attr):
                delattr(self, attr)
        self.ring = None
