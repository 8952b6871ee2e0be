"""tbn_runtime backends: the ring through each backend equals PyTorch clip inference."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from runtime_helpers import EXPORT_H, EXPORT_W, reference_labels, synthetic_frames
from tbn_runtime.backends import BackendError, backend_class, select_backend
from tbn_runtime.backends import gpu_present as backends_gpu_present
from tbn_runtime.backends.base import Backend
from tbn_runtime.manifest import ManifestError, load_manifest


def _two_videos():
    # 12 frames: the first nine (clamped past indices) and two that overwrite ring slots
    return (synthetic_frames(12, EXPORT_H, EXPORT_W, seed=1),
            synthetic_frames(5, EXPORT_H, EXPORT_W, seed=2))


def _agreement(backend: Backend, frames, ref):
    backend.reset()
    return [float((backend.infer(f) == r).mean()) for f, r in zip(frames, ref)]


@pytest.mark.parametrize("name", ["ort", "openvino", "torch"])
def test_backend_equals_clip_inference(export_dir, name):
    man = load_manifest(export_dir)
    ok, why = backend_class(name).available("cpu")
    if not ok:
        pytest.skip(why)
    cls, device, _ = select_backend(name, man, "cpu", export_dir)
    a, b = _two_videos()
    ref_a, ref_b = reference_labels(export_dir, a, "a"), reference_labels(export_dir, b, "b")
    with cls(export_dir, man, device) as backend:
        assert backend.ring.capacity == 10
        # the first nine frames (clamped past indices) included, frame by frame
        assert min(_agreement(backend, a, ref_a)) >= 0.999
        # a second video after reset() starts its ring afresh
        assert min(_agreement(backend, b, ref_b)) >= 0.999
        assert backend.ring.frame == len(b) - 1
        # and once more the first video: nothing of b leaks into a
        assert min(_agreement(backend, a, ref_a)) >= 0.999
        assert backend.timings["feature"] > 0 and backend.timings["temporal"] > 0
        assert backend.frames == 2 * len(a) + len(b)  # the frames those seconds are over


def test_push_rebuilds_ring_like_infer(export_dir):
    """push() (feature engine only, used by --resume) leaves the ring as infer() would."""
    man = load_manifest(export_dir)
    cls = backend_class("ort")
    frames = synthetic_frames(13, EXPORT_H, EXPORT_W, seed=3)
    with cls(export_dir, man, "cpu") as full, cls(export_dir, man, "cpu") as resumed:
        full.reset()
        resumed.reset()
        expect = [full.infer(f) for f in frames]
        for f in frames[:7]:
            resumed.push(f)
        got = [resumed.infer(f) for f in frames[7:]]
        assert resumed.frames == len(frames) - 7  # pushed frames are not labelled frames
        for e, g in zip(expect[7:], got):
            np.testing.assert_array_equal(e, g)


def test_backend_rejects_wrong_frame(export_dir):
    man = load_manifest(export_dir)
    with backend_class("ort")(export_dir, man, "cpu") as b:
        b.reset()
        with pytest.raises(ValueError, match="export size"):
            b.infer(np.zeros((EXPORT_H + 1, EXPORT_W, 3), np.uint8))


def _fake_availability(monkeypatch, present):
    """Make backend_class(name).available(device) say yes exactly for (name, device) in present
    (and the driver report a GPU when one of them is on cuda)."""
    import tbn_runtime.backends as backends
    monkeypatch.setattr(backends, "gpu_present", lambda: any(d == "cuda" for _, d in present))
    for name in ("trt", "ort", "openvino", "torch"):
        cls = backend_class(name)
        monkeypatch.setattr(cls, "available", classmethod(
            lambda c, device="cpu": ((c.name, device) in present, f"faked {c.name} {device}")))


@pytest.mark.parametrize("present, engines, chosen", [
    # a GPU box without TensorRT or onnxruntime-gpu: PyTorch on the GPU, not ORT on the CPU
    ({("ort", "cpu"), ("torch", "cuda"), ("torch", "cpu")}, False, ("torch", "cuda")),
    ({("ort", "cpu"), ("ort", "cuda"), ("torch", "cuda")}, False, ("ort", "cuda")),
    ({("trt", "cuda"), ("ort", "cuda"), ("torch", "cuda")}, True, ("trt", "cuda")),
    # TensorRT present but the export has no engines: the next GPU backend
    ({("trt", "cuda"), ("torch", "cuda"), ("ort", "cpu")}, False, ("torch", "cuda")),
    ({("ort", "cpu"), ("torch", "cpu")}, False, ("ort", "cpu")),
    ({("torch", "cpu")}, False, ("torch", "cpu")),
    # on the CPU the fastest engine first: OpenVINO, then ONNX Runtime, then PyTorch
    ({("openvino", "cpu"), ("ort", "cpu"), ("torch", "cpu")}, False, ("openvino", "cpu")),
    ({("openvino", "cpu"), ("torch", "cuda")}, False, ("torch", "cuda")),
])
def test_auto_prefers_any_gpu_backend_to_any_cpu_one(export_dir, monkeypatch, present, engines,
                                                     chosen):
    import dataclasses

    man = load_manifest(export_dir)
    if engines:
        files = dict(man.files, **{"feature.engine": {}, "temporal.engine": {}})
        man = dataclasses.replace(man, files=files)
    _fake_availability(monkeypatch, present)
    cls, device, why = select_backend("auto", man, None, export_dir)
    assert (cls.name, device) == chosen, why
    # --device cpu keeps auto on the CPU
    cpu = next((n for n in ("openvino", "ort") if (n, "cpu") in present), None)
    if cpu:
        assert select_backend("auto", man, "cpu", export_dir)[:2] == (backend_class(cpu), "cpu")


def test_auto_selection_here(export_dir):
    man = load_manifest(export_dir)
    cls, device, why = select_backend("auto", man, None, export_dir)
    ok_trt, _ = backend_class("trt").available("cuda")
    ok_ort_cuda, _ = backend_class("ort").available("cuda")
    ok_torch_cuda, _ = backend_class("torch").available("cuda")
    if not (ok_trt or ok_ort_cuda or ok_torch_cuda):
        first = "openvino" if backend_class("openvino").available("cpu")[0] else "ort"
        assert (cls.name, device) == (first, "cpu")
        if not backends_gpu_present():  # a CPU-only machine: said once, no CUDA install hints
            assert "no CUDA device" in why
            assert not any(h in why for h in ("gpu-cu1", "onnxruntime-gpu", "pip")), why
    with pytest.raises(BackendError, match="unknown backend"):
        select_backend("tensorflow", man, None, export_dir)
    with pytest.raises(BackendError, match="--engine-only"):
        select_backend("trt", man, "cuda", export_dir)


def test_onnx_sha256_mismatch(export_dir, tmp_path):
    bad = str(tmp_path / "export")
    shutil.copytree(export_dir, bad)
    with open(os.path.join(bad, "temporal.onnx"), "ab") as f:
        f.write(b"\0")
    man = load_manifest(bad)
    with pytest.raises(ManifestError, match="sha256"):
        backend_class("ort")(bad, man, "cpu")


def test_torch_backend_checks_its_weights(export_dir, tmp_path):
    """The bundled weights.safetensors is checked against its sha256; so is the checkpoint an
    older export names by path."""
    bad = str(tmp_path / "export")
    shutil.copytree(export_dir, bad)
    with open(os.path.join(bad, "weights.safetensors"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(BackendError, match="sha256"):
        backend_class("torch")(bad, load_manifest(bad), "cpu")
    ckpt = str(tmp_path / "changed.safetensors")
    shutil.copy(load_manifest(export_dir).checkpoint["path"], ckpt)
    with open(ckpt, "ab") as f:
        f.write(b"\0")
    m = load_manifest(bad)
    m.checkpoint = {"path": ckpt, "sha256": m.checkpoint["sha256"]}
    m.save(bad)  # as tbn-export would write it (a hand edit is refused: test_runtime_faults)
    with pytest.raises(BackendError, match="sha256"):
        backend_class("torch")(bad, load_manifest(bad), "cpu")


def test_backends_without_torch_installed(export_dir):
    """With torch blocked: the package, the registry and the ort backend work; torch says
    what to install."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['tbn_train'] = None\n"
        "from tbn_runtime.backends import select_backend, BackendError\n"
        "from tbn_runtime.manifest import load_manifest\n"
        f"m = load_manifest({export_dir!r})\n"
        f"cls, dev, why = select_backend('auto', m, 'cpu', {export_dir!r})\n"
        "assert cls.name in ('openvino', 'ort'), why\n"
        "try:\n    select_backend('torch', m, 'cpu')\nexcept BackendError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "tbn-vit[train]" in r.stdout


@pytest.mark.parametrize("precision, present, chosen", [
    # ONNX Runtime refuses a bf16 export: auto goes on to the next backend that runs it
    ("bf16", {("ort", "cpu"), ("torch", "cpu")}, ("torch", "cpu")),
    ("bf16", {("openvino", "cpu"), ("ort", "cpu"), ("torch", "cpu")}, ("openvino", "cpu")),
    ("fp32", {("ort", "cpu"), ("torch", "cpu")}, ("ort", "cpu")),
])
def test_auto_skips_a_backend_that_refuses_the_export(export_dir, monkeypatch, precision,
                                                      present, chosen):
    import dataclasses

    man = dataclasses.replace(load_manifest(export_dir), precision=precision,
                              compute_precision={"feature": "bf16"} if precision == "bf16"
                              else None)
    _fake_availability(monkeypatch, present)
    cls, device, why = select_backend("auto", man, "cpu", export_dir)
    assert (cls.name, device) == chosen, why
    if precision == "bf16" and chosen[0] == "torch":
        assert "ONNX Runtime has no fast bf16 kernels" in why
        with pytest.raises(BackendError, match="openvino or torch"):
            select_backend("ort", man, "cpu", export_dir)
