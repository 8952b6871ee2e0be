"""The torch backend as an engine, on the CPU: copied exports, auto's hand-over when a backend
fails to load, bf16 weights, the cached Swin window masks, fused attention, the loud capture
failure, and `auto` on a machine without a GPU importing no torch."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from runtime_helpers import EXPORT_H, EXPORT_W, reference_labels, synthetic_frames
from tbn_runtime.backends import BackendError, backend_class, open_backend
from tbn_runtime.manifest import load_manifest

N = 12


@pytest.fixture(scope="module")
def frames():
    return synthetic_frames(N, EXPORT_H, EXPORT_W, seed=11)


def _labels(backend, frames):
    backend.reset()
    return np.stack([backend.infer(f) for f in frames])


@pytest.fixture(scope="module")
def fp32_labels(export_dir, frames):
    with backend_class("torch")(export_dir, load_manifest(export_dir), "cpu") as b:
        return _labels(b, frames)


def test_copied_export_runs_without_its_checkpoint(tmp_path, frames):
    """An export copied elsewhere, its checkpoint deleted: the torch backend runs the weights
    it holds (and gives the labels of the clip reference)."""
    from tbn_export.onnx_export import export_onnx
    from tbn_train.checkpoint import save_checkpoint
    from tbn_train.models import build_model, randomize_batchnorm

    torch.manual_seed(3)
    model = build_model("tbn_tiny").eval()
    randomize_batchnorm(model, seed=4)
    ckpt = tmp_path / "train" / "best.safetensors"
    ckpt.parent.mkdir()
    save_checkpoint(str(ckpt), model)
    export_onnx(model, str(tmp_path / "export"), EXPORT_H, EXPORT_W, checkpoint_path=str(ckpt))
    ref = reference_labels(str(tmp_path / "export"), frames)  # before the checkpoint goes
    copied = str(tmp_path / "elsewhere" / "export")
    shutil.copytree(tmp_path / "export", copied)
    shutil.rmtree(tmp_path / "train")
    shutil.rmtree(tmp_path / "export")
    man = load_manifest(copied)
    assert man.checkpoint["file"] == "weights.safetensors" and "weights.safetensors" in man.files
    with backend_class("torch")(copied, man, "cpu") as b:
        got = _labels(b, frames)
    assert min(float((g == r).mean()) for g, r in zip(got, ref)) >= 0.999


def test_auto_hands_over_when_a_backend_fails_to_load(export_dir, tmp_path, monkeypatch,
                                                      frames):
    """torch on CUDA says it can run but its weights are gone: auto says so and runs ORT."""
    import tbn_runtime.backends as backends

    bad = str(tmp_path / "export")
    shutil.copytree(export_dir, bad)
    os.remove(os.path.join(bad, "weights.safetensors"))
    monkeypatch.setattr(backends, "gpu_present", lambda: True)
    for name, ok_on in (("trt", ()), ("openvino", ()), ("ort", ("cpu",)),
                        ("torch", ("cuda", "cpu"))):
        monkeypatch.setattr(backend_class(name), "available", classmethod(
            lambda c, device="cpu", ok_on=ok_on: (device in ok_on, f"faked {device}")))
    backend, why = open_backend("auto", load_manifest(bad), None, bad)
    with backend:
        assert (backend.name, backend.device) == ("ort", "cpu"), why
        assert "torch on cuda failed to load" in why and "weights.safetensors is missing" in why
        backend.reset()
        backend.infer(frames[0])
    # asked by name, the failure is the error
    with pytest.raises(BackendError, match="missing"):
        open_backend("torch", load_manifest(bad), "cpu", bad)


def test_bf16_on_the_cpu(export_dir, frames, fp32_labels, monkeypatch):
    """A bf16 manifest runs the feature half in bf16 weights with a bf16 ring (AMX /
    AVX512-BF16 where present) and the temporal half in fp32, as the bf16 export computes;
    labels >= 99.5% equal to fp32. A CPU without native bf16 runs it fp32, and says so."""
    import tbn_train.torch_backend as tb

    man = load_manifest(export_dir)
    man.precision = "bf16"  # what the --bf16 export writes (its manifest precision)
    monkeypatch.setattr(tb, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(tb, "has_native_bf16", lambda: False)
    with backend_class("torch")(export_dir, man, "cpu") as b:
        assert b.precision == "fp32" and "no native bf16" in b.describe()
        assert b.ring.storage[0].dtype == torch.float32
    monkeypatch.setattr(tb, "has_native_bf16", lambda: True)
    with backend_class("torch")(export_dir, man, "cpu") as b:
        assert b.precision == "bf16" and "bf16 weights in the feature half" in b.describe()
        head = {id(p) for p in b.model.classifier.parameters()}
        assert head and all(p.dtype == torch.float32 for p in b.model.classifier.parameters())
        assert all(p.dtype == torch.bfloat16 for p in b.model.parameters() if id(p) not in head)
        assert b.ring.storage[0].dtype == torch.bfloat16
        got = _labels(b, frames)
    agree = float((got == fp32_labels).mean())
    assert agree >= 0.995, agree
    # asked for explicitly over an fp32 export: the same; fp16 on the CPU is refused
    with backend_class("torch")(export_dir, load_manifest(export_dir), "cpu",
                                precision="bf16") as b:
        assert float((_labels(b, frames) == got).mean()) == 1.0
    with pytest.raises(BackendError, match="CUDA only"):
        backend_class("torch")(export_dir, load_manifest(export_dir), "cpu", precision="fp16")


def test_window_masks_computed_once_per_size_labels_unchanged():
    from timm.models.swin_transformer import SwinTransformerBlock

    from tbn_train.models.backbones import cache_window_masks, set_fused_window_attention
    from tbn_train.models.registry import _swin

    torch.manual_seed(0)  # the presets' Swin as built for them, small: two blocks per stage
    model = _swin("swin_tiny_patch4_window7_224", None, embed_dim=32, depths=(2, 2, 2, 2),
                  num_heads=(1, 2, 4, 8), window_size=7).eval()
    x = {s: torch.randn(2, 3, *s) for s in ((64, 96), (96, 64))}
    with torch.inference_mode():
        before = {s: model(v) for s, v in x.items()}
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)
              and any(m.shift_size)]
    assert blocks and all(b.dynamic_mask for b in blocks)  # what timm does at any size
    calls = []
    for b in blocks:
        original = b.get_attn_mask
        b.get_attn_mask = lambda *a, _o=original, **k: (calls.append(1), _o(*a, **k))[1]
    assert cache_window_masks(model) >= len(blocks)
    with torch.inference_mode():
        after = {s: model(v) for s, v in x.items()}
        first = len(calls)  # once per block and padded map size (some stages share one)
        for _ in range(2):
            again = {s: model(v) for s, v in x.items()}
    assert len(blocks) <= first <= 2 * len(blocks)
    assert len(calls) == first  # not once per call
    for s in x:
        for a, b, c in zip(after[s], before[s], again[s]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(c, b, rtol=0, atol=0)
    # fused attention with the cached masks (shifted blocks, padded windows): the same values
    assert set_fused_window_attention(model, True) > 0
    with torch.inference_mode():
        fused = {s: model(v) for s, v in x.items()}
    for s in x:
        for a, b in zip(fused[s], before[s]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_attention_gives_the_same_labels(export_dir, frames, fp32_labels):
    with backend_class("torch")(export_dir, load_manifest(export_dir), "cpu",
                                fused_attention=False) as b:
        assert "timm attention" in b.describe()
        plain = _labels(b, frames)
    with backend_class("torch")(export_dir, load_manifest(export_dir), "cpu") as b:
        assert "fused attention" in b.describe()
    assert float((plain == fp32_labels).mean()) >= 0.999


def test_capture_failure_is_loud(export_dir, frames, fp32_labels, caplog):
    """A CUDA graph capture that fails (forced here on the CPU) runs that batch size eager with
    the same labels, and says so: warning, capture_failures, describe()."""
    with backend_class("torch")(export_dir, load_manifest(export_dir), "cpu") as b:
        b.use_graphs = True

        def broken(n):
            raise RuntimeError("operation not permitted when stream is capturing")

        b._capture = broken
        got = _labels(b, frames)
        assert set(b.capture_failures) == {1}
        assert "CUDA GRAPH CAPTURE FAILED (batch 1" in b.describe()
    assert "capture FAILED" in caplog.text
    np.testing.assert_array_equal(got, fp32_labels)


def test_auto_without_a_gpu_imports_no_torch(export_dir):
    from tbn_runtime.cuda import driver_gpu_count

    if driver_gpu_count():
        pytest.skip("this machine has a GPU: auto rightly asks torch about it")
    code = (
        "import sys\n"
        "from tbn_runtime.backends import open_backend\n"
        "from tbn_runtime.manifest import load_manifest\n"
        f"b, why = open_backend('auto', load_manifest({export_dir!r}), None, {export_dir!r})\n"
        "assert b.name in ('openvino', 'ort') and b.device == 'cpu', why\n"
        "bad = [m for m in ('torch', 'tbn_train', 'tensorrt', 'cuda') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print(why)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout
    assert not any(h in r.stdout + r.stderr for h in ("gpu-cu1", "onnxruntime-gpu", "pip "))
