"""Check an export against PyTorch: run the two ONNX graphs chained as the runtime chains them.

ONNX side (what the runtime does): per frame, the feature graph once; its feature goes into a
ring of max(offsets) + 1 slots (tbn_runtime.temporal.FeatureRing over numpy arrays); the
temporal graph reads the current feature and the ring's past slots (max(t - k, 0) rule).
PyTorch side (the reference): model.forward(clip) on the clip tbn_runtime.temporal.clip_indices
picks for frame t, and model.frame_features for the per-frame features.

Reported: max abs and relative error of the features, the share of pixels whose labels agree
(over all frames, and for the worst frame). Thresholds on the label agreement: fp32 >= 99.9%,
fp16 >= 99.5% (measured on the tiny demo model), int8 >= 99% (the INT8 gate: run it on frames
calibration did not see), and a loose bound on the feature error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tbn_runtime.cpu import machine
from tbn_runtime.manifest import Manifest, load_manifest
from tbn_runtime.preprocess import resize_frame
from tbn_runtime.temporal import FeatureRing
from tbn_train.data.synth import synthetic_frames  # noqa: F401  (--verify's default frames)

from .errors import VerifyError

#: minimum share of pixels whose labels must agree with PyTorch, per export precision.
LABEL_AGREEMENT = {"fp32": 0.999, "fp16": 0.995, "bf16": 0.995, "int8": 0.99}
#: largest tolerated feature error relative to the largest reference feature value: a generous
#: bound (the tiny demo model measures ~5e-7 fp32, ~1e-3 fp16, ~0.03 int8; random-weight
#: tbn_swin_t int8 0.12, random tbn_tiny on degraded synthetic frames 0.3); the labels are the
#: real test.
FEATURE_REL_TOL = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 5e-2, "int8": 0.5}


@dataclass
class VerifyResult:
    precision: str
    frames: int
    feature_max_abs: float
    feature_rel: float          # max abs error / max abs reference value
    labels_agree: float         # share of all pixels, all frames
    labels_agree_worst: float   # the worst single frame
    threshold: float
    feature_tol: float = 1e-3
    per_frame_agree: List[float] = field(default_factory=list)
    engine: str = "ONNX Runtime (CPU)"
    backend: str = "ort"        # the runtime backend this check ran (the manifest's key)
    #: a second check of the same export (bf16: the graph in fp32, then the engines in bf16;
    #: int8: the same Q/DQ graph in OpenVINO)
    then: Optional["VerifyResult"] = None
    #: whether this check failing refuses the export (int8 in OpenVINO does not: the export is
    #: ONNX Runtime's and TensorRT's; OpenVINO's failure is recorded and it refuses the export)
    gates: bool = True

    @property
    def passed(self) -> bool:
        """This check alone (not the ones after it)."""
        return self.labels_agree >= self.threshold and self.feature_rel <= self.feature_tol

    @property
    def ok(self) -> bool:
        """Whether the export may be written: every gating check passed."""
        return ((self.passed or not self.gates)
                and (self.then is None or self.then.ok))

    def records(self) -> Dict[str, Dict[str, Any]]:
        """What the manifest keeps of each check, by backend ('verified')."""
        out = {} if self.then is None else self.then.records()
        if not self.backend:   # a check of the graphs, not of a backend running the export
            return out
        out[self.backend] = {"passed": self.passed, "labels_agree": round(self.labels_agree, 6),
                             "required": self.threshold, "frames": self.frames,
                             "machine": machine()}
        return out

    def table(self) -> str:
        own = self.passed
        rows = [
            ("engine", self.engine),
            ("precision", self.precision),
            ("frames", str(self.frames)),
            ("feature max abs error", f"{self.feature_max_abs:.3g}"),
            ("feature relative error", f"{self.feature_rel:.3g} (max {self.feature_tol:g})"),
            ("labels agree (all frames)", f"{100 * self.labels_agree:.3f}%"),
            ("labels agree (worst frame)", f"{100 * self.labels_agree_worst:.3f}%"),
            ("labels required", f">= {100 * self.threshold:.1f}%"),
            ("result", "PASS" if own else "FAIL" if self.gates else
             f"FAIL (recorded: the {self.backend} backend refuses this export, the others "
             f"run it)"),
        ]
        width = max(len(k) for k, _ in rows)
        text = "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
        return text + ("\n" + self.then.table() if self.then is not None else "")


# -- frames ------------------------------------------------------------------------------------
def video_frames(path: str, n: int, height: int, width: int) -> List[np.ndarray]:
    """The first n frames of a video file (read by tbn_runtime.sources, as tbn-run reads it),
    resized to the export size (BGR uint8)."""
    import contextlib

    from tbn_runtime.sources import SourceError, open_source

    if not os.path.isfile(path):
        raise VerifyError(f"video not found: {path}")
    frames = []
    try:
        with contextlib.closing(open_source(path)[0].frames()) as it:
            for _, (_, frame) in zip(range(n), it):
                frames.append(resize_frame(frame, height, width))
    except SourceError as e:
        raise VerifyError(f"--video: {e}") from None
    if not frames:
        raise VerifyError(f"no frames could be decoded from {path}")
    return frames


# -- the two chains ----------------------------------------------------------------------------
def _sessions(export_dir: str, manifest: Manifest, device: str = "cpu"):
    from tbn_runtime.backends.base import BackendError
    from tbn_runtime.backends.ort import create_session
    from tbn_runtime.manifest import ManifestError

    try:
        return tuple(create_session(manifest.verify_file(export_dir, name), device)
                     for name in ("feature.onnx", "temporal.onnx"))
    except (ManifestError, BackendError) as e:
        raise VerifyError(f"cannot load the export in {export_dir}: "
                          f"{str(e).splitlines()[0]}") from e


def onnx_chain(export_dir: str, frames: Sequence[np.ndarray],
               manifest: Optional[Manifest] = None, device: str = "cpu"
               ) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(features, labels) per frame from the exported graphs, chained through a FeatureRing."""
    manifest = manifest or load_manifest(export_dir)
    feature_sess, temporal_sess = _sessions(export_dir, manifest, device)
    shape, dtype = tuple(manifest.feature_shape), np.dtype(manifest.feature_dtype)
    ring = None
    if manifest.temporal_offsets:
        ring = FeatureRing([np.zeros(shape, dtype) for _ in range(manifest.ring_size)],
                           manifest.temporal_offsets)
    features, labels = [], []
    for frame in frames:
        if frame.shape != (manifest.height, manifest.width, 3) or frame.dtype != np.uint8:
            raise VerifyError(f"frame is {frame.dtype} {frame.shape}, the export takes uint8 "
                              f"{(manifest.height, manifest.width, 3)}")
        (feat,) = feature_sess.run([manifest.feature_output],
                                   {manifest.frame_input: frame[None]})
        feed = {manifest.current_input: feat}
        if ring is not None:
            slot = ring.write_target()
            slot[...] = feat
            for name, past in zip(manifest.past_inputs, ring.past()):
                feed[name] = past
        (lab,) = temporal_sess.run([manifest.labels_output], feed)
        features.append(feat[0])
        labels.append(lab[0])
    return features, labels


def torch_chain(model, frames: Sequence[np.ndarray]) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(features, labels) per frame from PyTorch: model.forward on the clip of each frame (the
    clip-inference reference), and model.frame_features of the frame."""
    import torch

    from tbn_train.reference import ClipReference

    ref = ClipReference(model)
    features, labels = [], []
    with torch.no_grad():
        for frame in frames:
            labels.append(ref.labels(frame))
            features.append(model.frame_features(ref.normalized[-1])[0].float().numpy())
    return features, labels


def compare(onnx_out, torch_out, precision: str) -> VerifyResult:
    (of, ol), (tf, tl) = onnx_out, torch_out
    max_abs = max(float(np.abs(a.astype(np.float32) - b).max()) for a, b in zip(of, tf))
    scale = max(float(np.abs(b).max()) for b in tf)
    per_frame = [float((a == b).mean()) for a, b in zip(ol, tl)]
    agree = float(np.mean([(a == b).mean() for a, b in zip(ol, tl)]))
    return VerifyResult(precision=precision, frames=len(ol), feature_max_abs=max_abs,
                        feature_rel=max_abs / max(scale, 1e-12), labels_agree=agree,
                        labels_agree_worst=min(per_frame), per_frame_agree=per_frame,
                        threshold=LABEL_AGREEMENT.get(precision, LABEL_AGREEMENT["fp32"]),
                        feature_tol=FEATURE_REL_TOL.get(precision, FEATURE_REL_TOL["fp32"]))


def openvino_chain(export_dir: str, frames: Sequence[np.ndarray], manifest: Manifest
                   ) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(features, labels) per frame through the openvino backend, at the precision it runs
    the export at here."""
    from tbn_runtime.backends.openvino import OpenVinoBackend

    features, labels = [], []
    with OpenVinoBackend(export_dir, manifest, "cpu", cache_dir=None) as backend:
        for frame in frames:
            labels.append(backend.infer(frame))
            ring = backend.ring
            features.append(ring.storage[ring.index.slot_of(ring.frame)][0].copy())
    return features, labels


def openvino_runs(manifest: Manifest, bf16: bool = False) -> bool:
    """Whether the openvino backend runs this export here (bf16: natively in bf16)."""
    try:
        from tbn_runtime.backends.openvino import OpenVinoBackend, native_bf16

        if not (OpenVinoBackend.available("cpu")[0] and OpenVinoBackend.accepts(manifest)[0]):
            return False
        if bf16:
            import openvino

            return native_bf16(openvino.Core())
        return True
    except Exception:  # a broken OpenVINO install: it does not run here
        return False


def bf16_chain(export_dir: str, model, frames: Sequence[np.ndarray], manifest: Manifest
               ) -> Tuple[str, Tuple[List[np.ndarray], List[np.ndarray]]]:
    """(engine, (features, labels)) of a bf16 export computed in bf16 on this CPU: OpenVINO
    on the exported graphs where it runs bf16 natively (AMX / AVX512-BF16), else PyTorch with
    the feature half's weights and activations in bf16 (bf16 arithmetic on any CPU, slowly)
    and the temporal half in fp32, as the manifest's compute_precision says."""
    if openvino_runs(manifest, bf16=True):
        return "OpenVINO (CPU, bf16)", openvino_chain(export_dir, frames, manifest)
    return "PyTorch (CPU, bf16 feature weights; no native bf16 here)", torch_bf16_chain(
        model, frames, manifest)


def torch_bf16_chain(model, frames: Sequence[np.ndarray], manifest: Manifest
                     ) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(features, labels): the feature half in bf16 (a bf16 copy of the model), the temporal
    half (the exported TemporalGraph module, fp32) over a ring of its features."""
    import copy

    import torch

    from .onnx_export import FeatureGraph, TemporalGraph

    feature_graph = FeatureGraph(copy.deepcopy(model).to(torch.bfloat16)).eval()
    temporal = TemporalGraph(model, manifest.height, manifest.width).eval()
    offsets = manifest.temporal_offsets
    ring = FeatureRing([None] * manifest.ring_size, offsets) if offsets else None
    features, labels = [], []
    with torch.no_grad():
        for frame in frames:
            x = torch.from_numpy(np.ascontiguousarray(frame))[None]
            y = x.float().permute(0, 3, 1, 2).flip(1)
            y = ((y - feature_graph.mean) / feature_graph.std).to(torch.bfloat16)
            feat = feature_graph.model.frame_features(y).float()
            past = []
            if ring is not None:
                ring.storage[ring.index.next_frame()] = feat
                past = ring.past()
            labels.append(temporal(feat, *past)[0].numpy())
            features.append(feat[0].numpy())
    return features, labels


def verify_export(export_dir: str, model, frames: Sequence[np.ndarray],
                  device: str = "cpu") -> VerifyResult:
    """Compare the export in export_dir with `model` (the PyTorch model it was made from).

    A bf16 export is checked twice: its fp32 graphs in ONNX Runtime at the fp32 bounds (the
    graph is right), then computed in bf16 (bf16_chain) at the bf16 bounds. An int8 export is
    checked in ONNX Runtime (which must pass) and, where the openvino backend runs it, in
    OpenVINO too: a failure there is recorded in the manifest, and OpenVINO then refuses it."""
    manifest = load_manifest(export_dir)
    onnx_out = onnx_chain(export_dir, frames, manifest, device)
    torch_out = torch_chain(model, frames)
    if manifest.precision == "int8":
        result = compare(onnx_out, torch_out, "int8")
        if openvino_runs(manifest):  # the same Q/DQ graph, as exported, in OpenVINO
            result.then = compare(openvino_chain(export_dir, frames, manifest), torch_out,
                                  "int8")
            result.then.engine, result.then.backend = "OpenVINO (CPU)", "openvino"
            result.then.gates = False
        return result
    if manifest.precision != "bf16":
        return compare(onnx_out, torch_out, manifest.precision)
    result = compare(onnx_out, torch_out, "fp32")
    result.precision, result.backend = "bf16 export: its fp32 graphs", ""
    engine, bf16_out = bf16_chain(export_dir, model, frames, manifest)
    result.then = compare(bf16_out, torch_out, "bf16")
    result.then.engine = engine
    result.then.backend = "openvino" if engine.startswith("OpenVINO") else "torch"
    return result
