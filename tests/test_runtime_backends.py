"""tbn_runtime backends: the ring through each backend equals PyTorch clip inference."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from runtime_helpers import EXPORT_H, EXPORT_W, get_export, reference_labels, synthetic_frames
from tbn_runtime.backends import BackendError, backend_class, select_backend
from tbn_runtime.backends.base import Backend
from tbn_runtime.manifest import ManifestError, load_manifest


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return get_export(tmp_path_factory)


def _two_videos():
    # 12 frames: the first nine (clamped past indices) and two that overwrite ring slots
    return (synthetic_frames(12, EXPORT_H, EXPORT_W, seed=1),
            synthetic_frames(5, EXPORT_H, EXPORT_W, seed=2))


def _agreement(backend: Backend, frames, ref):
    backend.reset()
    return [float((backend.infer(f) == r).mean()) for f, r in zip(frames, ref)]


@pytest.mark.parametrize("name", ["ort", "torch"])
def test_backend_equals_clip_inference(export_dir, name):
    man = load_manifest(export_dir)
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
        for e, g in zip(expect[7:], got):
            np.testing.assert_array_equal(e, g)


def test_backend_rejects_wrong_frame(export_dir):
    man = load_manifest(export_dir)
    with backend_class("ort")(export_dir, man, "cpu") as b:
        b.reset()
        with pytest.raises(ValueError, match="export size"):
            b.infer(np.zeros((EXPORT_H + 1, EXPORT_W, 3), np.uint8))


def test_auto_selection_here(export_dir):
    man = load_manifest(export_dir)
    cls, device, why = select_backend("auto", man, None, export_dir)
    ok_trt, _ = backend_class("trt").available("cuda")
    ok_ort_cuda, _ = backend_class("ort").available("cuda")
    if not ok_trt and not ok_ort_cuda:
        assert (cls.name, device) == ("ort", "cpu")
        assert "no engines" in why
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


def test_torch_backend_checks_checkpoint(export_dir, tmp_path):
    bad = str(tmp_path / "export")
    shutil.copytree(export_dir, bad)
    ckpt = str(tmp_path / "changed.safetensors")
    shutil.copy(load_manifest(export_dir).checkpoint["path"], ckpt)
    with open(ckpt, "ab") as f:
        f.write(b"\0")
    path = os.path.join(bad, "manifest.json")
    data = json.load(open(path))
    data["checkpoint"]["path"] = ckpt
    json.dump(data, open(path, "w"))
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
        "assert cls.name == 'ort', why\n"
        "try:\n    select_backend('torch', m, 'cpu')\nexcept BackendError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pip install torch timm" in r.stdout


def _trt_ready():
    ok, why = backend_class("trt").available("cuda")
    return ok, why


@pytest.mark.skipif(not _trt_ready()[0], reason=f"TensorRT backend unavailable here: "
                                                 f"{_trt_ready()[1]}")
def test_trt_engines_for_another_build_are_refused(export_dir, tmp_path):
    bad = str(tmp_path / "export")
    shutil.copytree(export_dir, bad)
    for name in ("feature.engine", "temporal.engine"):
        open(os.path.join(bad, name), "wb").write(b"not an engine")
    man = load_manifest(bad)
    man.add_file(bad, "feature.engine")
    man.add_file(bad, "temporal.engine")
    man.tensorrt = {"version": "0.0.0", "gpu": "none", "compute_capability": "0.0"}
    man.save(bad)
    with pytest.raises(BackendError, match="--engine-only"):
        backend_class("trt")(bad, load_manifest(bad), "cuda")


@pytest.mark.skipif(not _trt_ready()[0], reason=f"TensorRT backend unavailable here: "
                                                 f"{_trt_ready()[1]}")
def test_trt_equals_ort(export_dir):
    man = load_manifest(export_dir)
    if "feature.engine" not in man.files:
        pytest.skip("the test export has no TensorRT engines (tbn-export builds them where "
                    "TensorRT is present)")
    frames = synthetic_frames(14, EXPORT_H, EXPORT_W, seed=1)
    with backend_class("ort")(export_dir, man, "cpu") as o, \
            backend_class("trt")(export_dir, man, "cuda") as t:
        o.reset()
        t.reset()
        for f in frames:
            assert (o.infer(f) == t.infer(f)).mean() >= 0.999
