"""The GPU paths, run wherever CUDA exists; without it each test skips with its reason.

Every test id here contains "cuda", so `pytest -k cuda` (what benchmarks/gpu_check.py runs on a
GPU machine) selects exactly these: the torch backend with CUDA graphs (fp32 and fp16), ONNX
Runtime's CUDA provider with IOBinding over a device ring, TensorRT engines built inside the
test and streamed through the trt backend, `tbn-export --engine-only`, and training on CUDA
(bf16 and fp16 AMP, gradient checkpointing, SyncBatchNorm synchronising two ranks), and the
cuda-python plumbing of the trt backend without TensorRT (tests/test_cuda_plumbing.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch

from runtime_helpers import EXPORT_H, EXPORT_W, synthetic_frames
from tbn_runtime.backends import BackendError, backend_class
from tbn_runtime.manifest import load_manifest

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
N_FRAMES = 14  # the first nine (past indices clamped to frame 0) and five after


def _trt_reason():
    if not HAS_CUDA:
        return NO_CUDA
    ok, why = backend_class("trt").available("cuda")
    return None if ok else f"TensorRT backend unavailable: {why}"


def _ort_cuda_reason():
    if not HAS_CUDA:
        return NO_CUDA
    ok, why = backend_class("ort").available("cuda")
    return None if ok else why


needs_trt = pytest.mark.skipif(_trt_reason() is not None, reason=str(_trt_reason()))
needs_ort_cuda = pytest.mark.skipif(_ort_cuda_reason() is not None,
                                    reason=str(_ort_cuda_reason()))


@pytest.fixture(scope="module")
def frames():
    return synthetic_frames(N_FRAMES, EXPORT_H, EXPORT_W, seed=7)


@pytest.fixture(scope="module")
def fp16_export(export_dir, tmp_path_factory):
    """The fp16 export of the same checkpoint as export_dir."""
    from tbn_export.onnx_export import export_onnx
    from tbn_train.checkpoint import load_model

    ckpt = load_manifest(export_dir).checkpoint["path"]
    out = str(tmp_path_factory.mktemp("fp16"))
    export_onnx(load_model(ckpt)[0], out, EXPORT_H, EXPORT_W, fp16=True, checkpoint_path=ckpt)
    return out


def _reference_on_cuda(export_dir, frames, fp16=False):
    # the fp32 reference for every precision (fp16/bf16 labels are compared against fp32)
    """The clip-inference reference, on the GPU (same device arithmetic as the backend)."""
    from tbn_train.checkpoint import load_model
    from tbn_train.reference import ClipReference

    ref = ClipReference(load_model(load_manifest(export_dir).checkpoint["path"])[0], "cuda", fp16)
    return [ref.labels(f) for f in frames]


def _stream(backend, frames):
    backend.reset()
    return [backend.infer(f) for f in frames]


def _agreement(a, b):
    return [float((x == y).mean()) for x, y in zip(a, b)]


# -- the torch backend: CUDA graphs ---------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("precision, threshold", [("fp32", 0.999), ("fp16", 0.995),
                                                  ("bf16", 0.995)])
def test_cuda_torch_backend_graphs_equal_clip_inference(export_dir, frames, precision,
                                                        threshold):
    import dataclasses

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    man = dataclasses.replace(load_manifest(export_dir), precision=precision)
    ref = _reference_on_cuda(export_dir, frames)
    with backend_class("torch")(export_dir, man, "cuda") as b:
        # a capture that fell back to eager would pass the comparison silently: refuse it
        assert not b.capture_failures and "CUDA graphs" in b.describe(), b.describe()
        assert f"{precision}" in b.describe() and ("TF32" in b.describe()) == (precision == "fp32")
        got = _stream(b, frames)
        assert min(_agreement(got, ref)) >= threshold  # frame by frame, the first nine too
        # the two stages are timed with CUDA events, push() included
        assert b.timings["feature"] > 0 and b.timings["temporal"] > 0
        b.reset()
        b.push(frames[0])
        assert b.timings["push"] > 0


def _two_streams(backend, a, b):
    """Videos a and b through streams 0 and 1 of one backend, batched frame by frame."""
    backend.reset(0)
    backend.reset(1)
    out_a, out_b = [], []
    for i in range(max(len(a), len(b))):
        idx = [s for s, v in ((0, a), (1, b)) if i < len(v)]
        got = backend.step([(a, b)[s][i] for s in idx], idx, [True] * len(idx))
        for s, labels in zip(idx, got):
            (out_a, out_b)[s].append(labels)
    return out_a, out_b


@needs_cuda
def test_cuda_torch_backend_graphs_per_batch_size_for_streams(export_dir, frames):
    """--streams 2: batches of 2 (and of 1 where one video has ended) replay their own
    graphs; each stream's labels equal its single-stream run."""
    man = load_manifest(export_dir)
    a, b = frames, synthetic_frames(9, EXPORT_H, EXPORT_W, seed=8)
    with backend_class("torch")(export_dir, man, "cuda") as one:
        single = (_stream(one, a), _stream(one, b))
    with backend_class("torch")(export_dir, man, "cuda", streams=2) as two:
        got = _two_streams(two, a, b)
        assert sorted(two._graphs) == [1, 2] and not two.capture_failures, two.describe()
    for g, s in zip(got, single):
        assert min(_agreement(g, s)) >= 0.999


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_graph_capture_at_the_presets_export_size(precision):
    """The capture that matters: random-init tbn_swin_l at its export size (480 x 864); a
    failure there would make every GPU user run eager."""
    from tbn_train.models import build_model
    from tbn_train.torch_backend import TorchBackend

    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: seconds less than on the CPU
        model = build_model("tbn_swin_l")
    with TorchBackend.from_model(model, 480, 864, "cuda", precision=precision) as b:
        assert not b.capture_failures, b.describe()
        assert b.masks_cached > 0 and b.fused_attention, b.describe()
        b.reset()
        for f in synthetic_frames(3, 480, 864, seed=1):
            assert b.infer(f).shape == (480, 864)
        assert list(b._graphs) == [1]


# -- ONNX Runtime's CUDA provider ---------------------------------------------------------------
@needs_ort_cuda
def test_cuda_ort_provider_with_device_ring_equals_cpu(export_dir, frames):
    man = load_manifest(export_dir)
    with backend_class("ort")(export_dir, man, "cuda") as gpu, \
            backend_class("ort")(export_dir, man, "cpu") as cpu:
        assert "CUDAExecutionProvider" in gpu.describe() and "'cuda'" in gpu.describe()
        assert min(_agreement(_stream(gpu, frames), _stream(cpu, frames))) >= 0.999


@needs_ort_cuda
def test_cuda_ort_provider_two_streams_batched(export_dir, frames):
    """streams=2 on the CUDA provider: the batched path gathers and scatters ring rows on the
    device (ort.py's _copy_rows, cudaMemcpy); each stream equals its single-stream run."""
    man = load_manifest(export_dir)
    a, b = frames, synthetic_frames(9, EXPORT_H, EXPORT_W, seed=8)
    with backend_class("ort")(export_dir, man, "cuda") as one:
        single = (_stream(one, a), _stream(one, b))
    with backend_class("ort")(export_dir, man, "cuda", streams=2) as two:
        assert two.batch_limit == 2, two.describe()
        got = _two_streams(two, a, b)
    for g, s in zip(got, single):
        assert min(_agreement(g, s)) >= 0.999


# -- TensorRT -------------------------------------------------------------------------------------
def _with_engines(src, tmp_path):
    from tbn_export.tensorrt_build import build_engines

    d = str(tmp_path / "export")
    shutil.copytree(src, d)
    build_engines(d, workspace_gb=1.0)
    return d


@needs_trt
@pytest.mark.parametrize("which, threshold", [("fp32", 0.999), ("fp16", 0.995)])
def test_cuda_trt_engines_built_here_equal_ort(export_dir, fp16_export, frames, tmp_path, which,
                                               threshold):
    from tbn_runtime.files import sha256_file

    src = export_dir if which == "fp32" else fp16_export
    d = _with_engines(src, tmp_path)
    man = load_manifest(d)
    assert man.tensorrt["strongly_typed"] and man.tensorrt["compute_capability"]
    for name in ("feature.engine", "temporal.engine"):
        assert man.files[name]["sha256"] == sha256_file(os.path.join(d, name))
    with backend_class("trt")(d, man, "cuda") as trt, \
            backend_class("ort")(src, load_manifest(src), "cpu") as ort:
        assert min(_agreement(_stream(trt, frames), _stream(ort, frames))) >= threshold
        assert trt.timings["feature"] > 0 and trt.timings["temporal"] > 0


@needs_trt
def test_cuda_trt_bf16_engine_from_the_bf16_export(export_dir, frames, tmp_path):
    """A bf16 export's engines: the feature engine built from its bf16-typed copy (ModelOpt
    AutoCast), the temporal one fp32; labels >= 99.5% equal to ONNX Runtime fp32."""
    from tbn_export.onnx_export import export_onnx
    from tbn_train.checkpoint import load_model

    ckpt = load_manifest(export_dir).checkpoint["path"]
    src = str(tmp_path / "bf16")
    export_onnx(load_model(ckpt)[0], src, EXPORT_H, EXPORT_W, bf16=True, checkpoint_path=ckpt)
    d = _with_engines(src, tmp_path)
    man = load_manifest(d)
    assert man.compute_precision["feature"] == "bf16" and man.tensorrt["strongly_typed"]
    assert not [f for f in os.listdir(d) if f.startswith(".tbn-")]  # the typed copy is gone
    with backend_class("trt")(d, man, "cuda") as trt, \
            backend_class("ort")(export_dir, load_manifest(export_dir), "cpu") as ort:
        assert min(_agreement(_stream(trt, frames), _stream(ort, frames))) >= 0.995


@needs_trt
def test_cuda_trt_profiles_one_frame_and_batches(export_dir, frames, tmp_path):
    """Engines with profile 0 for one frame (tuned for 1) and profile 1 for 2..max_batch: one
    stream runs profile 0, two streams batched profile 1, each equal to its single run."""
    d = _with_engines(export_dir, tmp_path)
    man = load_manifest(d)
    assert man.tensorrt["profiles"] == [[1, 1, 1], [2, man.max_batch, man.max_batch]]
    a, b = frames, synthetic_frames(9, EXPORT_H, EXPORT_W, seed=8)
    with backend_class("trt")(d, man, "cuda") as one:
        assert len(one._contexts) == 2
        single = (_stream(one, a), _stream(one, b))
    with backend_class("trt")(d, man, "cuda", streams=2) as two:
        assert two.batch_limit == 2
        got = _two_streams(two, a, b)
    for g, s in zip(got, single):
        assert min(_agreement(g, s)) >= 0.999


@needs_trt
def test_cuda_export_engine_only_on_an_existing_export(export_dir, tmp_path, capsys):
    from tbn_export.cli import main

    d = str(tmp_path / "export")
    shutil.copytree(export_dir, d)
    assert main(["--engine-only", "--out", d]) == 0
    man = load_manifest(d)
    assert {"feature.engine", "temporal.engine"} <= set(man.files)
    assert os.path.isfile(os.path.join(d, "timing.cache"))
    assert "built TensorRT" in capsys.readouterr().err  # tbn-export logs to stderr
    assert main(["--engine-only", "--out", d]) == 0  # again: the timing cache is reused


@needs_trt
def test_cuda_trt_engines_for_another_build_are_refused(export_dir, tmp_path):
    bad = str(tmp_path / "export")
    shutil.copytree(export_dir, bad)
    for name in ("feature.engine", "temporal.engine"):
        with open(os.path.join(bad, name), "wb") as f:
            f.write(b"not an engine")
    man = load_manifest(bad)
    man.add_file(bad, "feature.engine")
    man.add_file(bad, "temporal.engine")
    man.tensorrt = {"version": "0.0.0", "gpu": "none", "compute_capability": "0.0"}
    man.save(bad)
    with pytest.raises(BackendError, match="--engine-only"):
        backend_class("trt")(bad, load_manifest(bad), "cuda")


# -- training on CUDA ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from train_helpers import make_synth
    return make_synth(tmp_path_factory.mktemp("cuda-train") / "synth")


def _losses(out):
    lines = (out / "stage1" / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_training_with_amp_lowers_a_finite_loss(synth_root, tmp_path, amp):
    from tbn_train import train

    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    out = tmp_path / "run"
    rc = train.main(["--preset", "demo", "--data", str(synth_root), "--out", str(out),
                     "--device", "cuda", "--amp", amp, "--iters", "8", "--batch-size", "2",
                     "--lr", "0.1", "--warmup-iters", "0", "--crop-size", "64", "64",
                     "--workers", "0", "--log-interval", "1", "--eval-interval", "100"])
    assert rc == 0
    losses = _losses(out)
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    state = torch.load(out / "stage1" / "last.state.pt", weights_only=True)
    assert bool(state["scaler"]) == (amp == "fp16")  # fp16 trains with a gradient scaler


def _tiny_step_grads(checkpointing):
    from tbn_train.models import build_model

    torch.manual_seed(0)
    model = build_model("tbn_tiny").cuda().train()
    model.set_grad_checkpointing(checkpointing)
    g = torch.Generator().manual_seed(1)
    clip = torch.randn(2, 4, 3, 64, 96, generator=g).cuda()
    target = torch.randint(0, 124, (2, 64, 96), generator=g).cuda()
    loss = torch.nn.functional.cross_entropy(model(clip), target)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


@needs_cuda
def test_cuda_grad_checkpointing_gives_the_same_gradients():
    plain, ckpt = _tiny_step_grads(False), _tiny_step_grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], rtol=1e-3, atol=1e-5), name


def _syncbn_rank(rank, world, port, x, out):
    """One rank of the SyncBatchNorm test: its share of the batch through SyncBatchNorm."""
    import torch.distributed as dist
    import torch.nn as nn

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        bn = nn.SyncBatchNorm(x.shape[1]).cuda().train()
        y = bn(torch.from_numpy(x).chunk(world)[rank].cuda())
        out.put((rank, y.detach().cpu().numpy(), bn.running_mean.cpu().numpy(),
                 bn.running_var.cpu().numpy()))
    finally:
        dist.destroy_process_group()


@needs_cuda
def test_cuda_syncbatchnorm_synchronises_two_ranks():
    """Two ranks, each half of the batch: SyncBatchNorm's output and running statistics equal
    plain BatchNorm over the whole batch, which they would not without synchronisation. One
    GPU holds both ranks: NCCL refuses two ranks on one device, so the group is gloo (whose
    all_gather takes CUDA tensors); NCCL's own transport between GPUs is not tested here."""
    import multiprocessing as mp

    import torch.nn as nn

    x = np.random.default_rng(0).standard_normal((8, 6, 5, 7)).astype(np.float32)
    x[4:] = 3 * x[4:] + 2  # the halves differ: unsynchronised statistics would differ too
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_syncbn_rank, args=(r, 2, port, x, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (out.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    bn = nn.BatchNorm2d(x.shape[1]).train()
    y = bn(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.concatenate([got[0][0], got[1][0]]), y, rtol=1e-4, atol=1e-4)
    for r in (0, 1):
        np.testing.assert_allclose(got[r][1], bn.running_mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[r][2], bn.running_var.numpy(), rtol=1e-4, atol=1e-5)


@needs_cuda
def test_cuda_syncbatchnorm_step_in_an_nccl_group():
    """The training setup on NCCL: convert_sync_batchnorm, DDP, one step. With world_size 1
    torch skips SyncBatchNorm's synchronisation: that is the test above."""
    import torch.distributed as dist
    import torch.nn as nn

    from tbn_train.models import build_model

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model("tbn_tiny")).cuda().train()
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0])
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        clip = torch.randn(2, 4, 3, 64, 96, device="cuda")
        target = torch.randint(0, 124, (2, 64, 96), device="cuda")
        loss = torch.nn.functional.cross_entropy(ddp(clip), target)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        moved = sum(int(not torch.equal(a, b)) for a, b in zip(before, model.parameters()))
        assert moved > 0.9 * len(before)
    finally:
        dist.destroy_process_group()
