"""OpenVINO backend (CPU): the export's two ONNX graphs compiled by OpenVINO over a numpy ring.

The ring slots are numpy arrays that OpenVINO tensors share (no copies): the feature request
writes the current frame's feature straight into its slot, the temporal request reads the
slots of t, t-3, t-6, t-9, and only the uint8 labels come back.

Precision is the export's, set explicitly (INFERENCE_PRECISION_HINT): OpenVINO computes in
bf16 on CPUs with AMX / AVX512-BF16 unless told otherwise, and a precision the export was not
verified at must never be chosen behind the user's back. fp32, fp16 (an fp16 graph: the CPU
computes it in f32, it has no fp16 arithmetic to lower it to) and int8 (the Q/DQ graph as
exported, its float parts in f32) run in f32; a bf16 export's feature graph runs in bf16 where
the CPU has native bf16 (OpenVINO lists BF16 in OPTIMIZATION_CAPABILITIES), its temporal graph
in f32. On a CPU without native bf16 OpenVINO computes f32 whatever it is asked (checked on
OpenVINO 2026.4, AVX2): the backend then says so in describe() and in the log, and runs the
bf16 export in f32, more exact than what was verified, never less.

Compiled models are cached (OpenVINO's CACHE_DIR) in a per-user folder, by default
$XDG_CACHE_HOME/tbn-vit/openvino (~/.cache/...; TBN_OPENVINO_CACHE overrides it, "" turns it
off): OpenVINO keys each blob by the graph and the settings, so one folder serves every export,
and the second start skips compilation.

Many streams (--streams N): `mode="async"` (the default) runs one batch-1 request per frame,
started together on OpenVINO's throughput streams (N requests, NUM_STREAMS = N);
`mode="batch"` one batched request per engine call (a graph compiled for a batch of 1..N).
Measured with benchmarks/streams.py on 2 AVX2 cores (one run, the machine shared): async
1.37x one stream at 4 streams against batch 0.98x for tbn_tiny 160x224; 1.36x against 1.11x
for tbn_swin_t 480x480. A static batch-1 graph is what OpenVINO's CPU plugin runs best.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..cpu import cpu_flags, has_vnni
from ..manifest import Manifest
from .base import Backend, BackendError, numpy_dtype

log = logging.getLogger("tbn_runtime")

#: OpenVINO's name of the inference precision each export precision runs at (feature graph)
_HINT = {"fp32": "f32", "fp16": "f32", "int8": "f32", "bf16": "bf16"}
MODES = ("batch", "async")
CACHE_ENV = "TBN_OPENVINO_CACHE"


def _import_ov():
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendError("the openvino backend needs OpenVINO: pip install 'tbn-vit[openvino]' "
                           "(or pip install openvino)") from e
    return ov


def default_cache_dir() -> Optional[str]:
    """Where compiled models are cached: $TBN_OPENVINO_CACHE ("" = no cache), else
    $XDG_CACHE_HOME/tbn-vit/openvino, else ~/.cache/tbn-vit/openvino."""
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV] or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tbn-vit", "openvino")


def native_bf16(core: Any) -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively here (AMX or AVX512-BF16)."""
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # an older OpenVINO without the property: assume not
        return False


def cpu_name(core: Any) -> str:
    try:
        return str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    except Exception:
        return "CPU"


class OpenVinoBackend(Backend):
    name = "openvino"

    @classmethod
    def available(cls, device: str = "cpu") -> Tuple[bool, str]:
        if device != "cpu":
            return False, ("the openvino backend runs on the CPU (use --device cpu, or the "
                           "trt / ort backends on a GPU)")
        try:
            ov = _import_ov()
            core = ov.Core()
            if "CPU" not in core.available_devices:
                return False, f"OpenVINO {ov.__version__} finds no CPU device"
        except BackendError as e:
            return False, str(e)
        except Exception as e:  # a broken install (missing shared libraries)
            return False, f"OpenVINO does not start: {str(e).strip().splitlines()[0]}"
        return True, f"openvino {ov.__version__.split('-')[0]} ({cpu_name(core)})"

    @classmethod
    def accepts(cls, manifest: Manifest) -> Tuple[bool, str]:
        if manifest.precision not in _HINT:
            return False, (f"the openvino backend does not run {manifest.precision} exports "
                           f"(it runs {', '.join(_HINT)})")
        # measured on AVX2 before the fusion Conv stayed float (tbn_export.int8.concat_convs),
        # so part of that error was the Concat's; the rest is AVX2's 16-bit u8 x s8 pair sums
        # saturating. Not measured again on AVX2: refused there until it is.
        if manifest.precision == "int8" and cpu_flags() and not has_vnni():
            return False, ("OpenVINO's int8 kernels give wrong results on this CPU, which has "
                           "no VNNI (measured with OpenVINO 2026.4 on AVX2: labels far from "
                           "the verified export); run the int8 export with --backend ort")
        return super().accepts(manifest)

    def __init__(self, export_dir: str, manifest: Manifest, device: str = "cpu",
                 streams: int = 1, *, threads: Optional[int] = None, mode: str = "async",
                 cache_dir: Any = "default") -> None:
        super().__init__(export_dir, manifest, device, streams)
        ok, reason = self.available(device)
        if not ok:
            raise BackendError(reason)
        if mode not in MODES:
            raise BackendError(f"unknown openvino mode '{mode}' (choose from {', '.join(MODES)})")
        fits, why_not = self.accepts(manifest)
        if not fits:
            raise BackendError(why_not)
        ov = _import_ov()
        self._ov = ov
        self.mode = mode if streams > 1 else "batch"
        self.core = ov.Core()
        self.cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir
        if self.cache_dir:
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
                self.core.set_property({"CACHE_DIR": self.cache_dir})
            except OSError as e:
                log.warning("openvino: cannot use the model cache %s (%s); compiling without it",
                            self.cache_dir, e.strerror or e)
                self.cache_dir = None
        self.precision = manifest.precision
        compute = manifest.compute_precision or {}
        want = _HINT.get(compute.get("feature", ""), _HINT[self.precision])
        temporal = _HINT.get(compute.get("temporal", ""), "f32")
        self.note = ""
        if want == "bf16" and not native_bf16(self.core):
            want = "f32"
            self.note = ("this CPU has no native bf16 (no AMX / AVX512-BF16): the bf16 export "
                         "runs in f32")
            log.warning("openvino: %s", self.note)
        if temporal == "bf16" and self.note:
            temporal = "f32"
        feature_path = manifest.verify_file(export_dir, "feature.onnx")
        temporal_path = manifest.verify_file(export_dir, "temporal.onnx")
        # one stream, or async requests: batch 1, static (fastest on the CPU); batch: dynamic
        batch = 1 if self.mode == "async" or streams == 1 else -1
        jobs = streams if self.mode == "async" else 1
        config: Dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT" if jobs > 1 else "LATENCY"}
        if jobs > 1:
            config["NUM_STREAMS"] = str(jobs)
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.feature_model = self._compile(feature_path, batch,
                                           dict(config, INFERENCE_PRECISION_HINT=want))
        self.temporal_model = self._compile(temporal_path, batch,
                                            dict(config, INFERENCE_PRECISION_HINT=temporal))
        #: what OpenVINO says each compiled graph computes in ("f32", "bf16")
        self.runs_at = tuple(self._precision_of(m) for m in (self.feature_model,
                                                              self.temporal_model))
        self._check_names()
        self._fshape = [int(d) for d in manifest.feature_shape][1:]
        self._fdtype = numpy_dtype(manifest.feature_dtype)
        self._make_rings(lambda: np.zeros([1] + self._fshape, self._fdtype))
        self._tensors: Dict[int, Any] = {}   # id(array) -> ov.Tensor sharing its memory
        self._freq = [self.feature_model.create_infer_request() for _ in range(jobs)]
        self._treq = [self.temporal_model.create_infer_request() for _ in range(jobs)]
        self._labels: Dict[int, np.ndarray] = {}
        self._rows: Dict[Tuple[int, int], np.ndarray] = {}
        self._batches: Dict[Tuple[str, int], np.ndarray] = {}

    def _compile(self, path: str, batch: int, config: Dict[str, Any]) -> Any:
        ov = self._ov
        try:
            model = self.core.read_model(path)
            shapes = {}
            for port in model.inputs:
                shape = port.get_partial_shape()
                shape[0] = ov.Dimension(batch) if batch > 0 else ov.Dimension(1, self.streams)
                shapes[port.get_any_name()] = shape
            model.reshape(shapes)
            return self.core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError with a long C++ trace
            text = str(e).strip()
            first = next((ln for ln in reversed(text.splitlines()) if ln.strip()), type(e).__name__)
            raise BackendError(f"OpenVINO cannot load {path}: {first.strip()}") from e

    @staticmethod
    def _precision_of(compiled: Any) -> str:
        got = compiled.get_property("INFERENCE_PRECISION_HINT")
        return got.to_string() if hasattr(got, "to_string") else str(got)

    def _check_names(self) -> None:
        m = self.manifest

        def names(ports):
            return [p.get_any_name() for p in ports]
        fin, fout = names(self.feature_model.inputs), names(self.feature_model.outputs)
        tin, tout = names(self.temporal_model.inputs), names(self.temporal_model.outputs)
        if (fin != [m.frame_input] or m.feature_output not in fout
                or sorted(tin) != sorted([m.current_input] + list(m.past_inputs))
                or m.labels_output not in tout):
            raise BackendError(
                f"the ONNX files in {self.export_dir} do not match its manifest (feature "
                f"{fin}->{fout}, temporal {tin}->{tout}); export again with tbn-export")

    def _tensor(self, array: np.ndarray) -> Any:
        """An OpenVINO tensor over array's memory (made once per ring slot or buffer)."""
        key = id(array)
        if key not in self._tensors:
            self._tensors[key] = self._ov.Tensor(array, shared_memory=True)
        return self._tensors[key]

    def _labels_buffer(self, n: int) -> np.ndarray:
        if n not in self._labels:
            self._labels[n] = np.zeros((n, self.height, self.width),
                                       numpy_dtype(self.manifest.label_dtype))
        return self._labels[n]

    def describe(self) -> str:
        ov_version = self._ov.__version__.split("-")[0]
        at = f"feature graph in {self.runs_at[0]}, temporal in {self.runs_at[1]}"
        if self.precision == "fp16":
            at += " (the fp16 graph computed in f32)"
        if self.note:
            at += f"; {self.note}"
        elif self.precision == "bf16":
            at += " (native bf16)"
        streams = ""
        if self.streams > 1:
            streams = (f", {self.streams} streams: " +
                       ("one batched request per engine call" if self.mode == "batch" else
                        f"{self.streams} async requests on {self.streams} OpenVINO streams"))
        cache = f", cache {self.cache_dir}" if self.cache_dir else ", no model cache"
        return (f"openvino {ov_version} on cpu ({cpu_name(self.core)}; {self.precision} "
                f"export: {at}; ring of {self.manifest.ring_size} shared numpy slots"
                f"{streams}{cache})")

    # -- the two engines ----------------------------------------------------------------------
    def _run_feature(self, frames: np.ndarray, slots: List[Any]) -> None:
        m, n = self.manifest, len(slots)
        if self.mode == "async" and n > 1:
            reqs = self._freq[:n]
            for i, req in enumerate(reqs):
                req.set_tensor(m.frame_input, self._ov.Tensor(
                    np.ascontiguousarray(frames[i:i + 1]), shared_memory=True))
                req.set_tensor(m.feature_output, self._tensor(slots[i]))
                req.start_async()
            for req in reqs:
                req.wait()
            return
        req = self._freq[0]
        req.set_tensor(m.frame_input, self._ov.Tensor(np.ascontiguousarray(frames),
                                                      shared_memory=True))
        if n == 1:  # straight into its ring slot
            req.set_tensor(m.feature_output, self._tensor(slots[0]))
            req.infer()
            return
        req.infer()
        out = req.get_tensor(m.feature_output).data
        for i, slot in enumerate(slots):
            np.copyto(slot[0], out[i])

    def _run_temporal(self, current: List[Any], past: List[List[Any]]) -> np.ndarray:
        man, count = self.manifest, len(current)
        names = [man.current_input] + list(man.past_inputs)
        rows = [[c] + list(p) for c, p in zip(current, past or [[]] * count)]
        labels = self._labels_buffer(count)
        if self.mode == "async" and count > 1:
            reqs = self._treq[:count]
            for i, req in enumerate(reqs):
                for name, slot in zip(names, rows[i]):
                    req.set_tensor(name, self._tensor(slot))
                req.set_tensor(man.labels_output, self._tensor(self._row(labels, i)))
                req.start_async()
            for req in reqs:
                req.wait()
            return labels.copy()
        req = self._treq[0]
        for k, name in enumerate(names):
            if count == 1:
                req.set_tensor(name, self._tensor(rows[0][k]))
            else:  # the streams' slots gathered into a batch buffer of this input
                batch = self._batch_buffer(name, count)
                for i, r in enumerate(rows):
                    np.copyto(batch[i], r[k][0])
                req.set_tensor(name, self._tensor(batch))
        if count == 1:
            req.set_tensor(man.labels_output, self._tensor(labels))
            req.infer()
        else:
            req.infer()
            np.copyto(labels, req.get_tensor(man.labels_output).data)
        return labels.copy()

    def _batch_buffer(self, name: str, n: int) -> np.ndarray:
        """A persistent n x C x h x w buffer of temporal input `name` (its tensor is kept)."""
        if (name, n) not in self._batches:
            self._batches[(name, n)] = np.zeros([n] + self._fshape, self._fdtype)
        return self._batches[(name, n)]

    def _row(self, labels: np.ndarray, i: int) -> np.ndarray:
        """Row i of a labels buffer as a 1 x H x W view, kept (so is the tensor over it)."""
        key = (id(labels), i)
        if key not in self._rows:
            self._rows[key] = labels[i:i + 1]
        return self._rows[key]

    def close(self) -> None:
        self.rings = []
        for attr in ("_freq", "_treq", "feature_model", "temporal_model", "_tensors", "_labels",
                     "_rows", "_batches", "core"):
            if hasattr(self, attr):
                delattr(self, attr)
