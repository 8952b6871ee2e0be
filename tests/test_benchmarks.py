"""benchmarks/: latency.py, accuracy.py (and its release gate), streams.py on a tiny model
(gpu_check.py: tests/test_gpu_check.py).

The outputs are checked for their form and content (keys, row names, positive numbers, the
gate's verdict), never for timing values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import accuracy  # noqa: E402
import latency  # noqa: E402

H, W = 64, 96


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A random-init tbn_tiny (BN randomised), its fp32 and fp16 exports, and a 1-video val split
    whose ground truth is the PyTorch reference's own output (so the reference scores 100 mIoU
    and any backend that deviates loses mIoU visibly)."""
    import torch
    from tbn_export.onnx_export import export_onnx
    from tbn_runtime.classes import train_ids_to_raw
    from tbn_runtime.masks import write_mask_png
    from tbn_train.checkpoint import save_checkpoint
    from tbn_train.data.synth import generate
    from tbn_train.data.vspw import index_split

    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    from tbn_train.models import build_model, randomize_batchnorm
    model = build_model("tbn_tiny").eval()
    randomize_batchnorm(model, seed=3)
    ckpt = str(root / "tiny.safetensors")
    save_checkpoint(ckpt, model)
    fp32, fp16 = str(root / "export"), str(root / "export-fp16")
    export_onnx(model, fp32, H, W, checkpoint_path=ckpt)
    export_onnx(model, fp16, H, W, fp16=True, checkpoint_path=ckpt)
    data = root / "data"
    generate(data, height=H, width=W, videos_train=0, videos_val=1, videos_test=0, frames=18)
    videos = index_split(data, "val")
    ref = accuracy.reference_predictions(model, videos, H, W)
    for v in videos:
        for pred, mask in zip(ref[v.name], v.masks):
            write_mask_png(mask, train_ids_to_raw(pred))
    return {"ckpt": ckpt, "fp32": fp32, "fp16": fp16, "data": str(data), "root": root}


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _has_openvino():
    from tbn_runtime.backends import backend_class
    return backend_class("openvino").available("cpu")[0]


def _check_machine(report):
    m = report["machine"]
    assert m["cpu"] and m["cores"] >= 1 and isinstance(m["gpus"], list)
    for lib in ("torch", "onnxruntime", "openvino", "onnx", "tensorrt"):
        assert lib in m["versions"]
    # the CPU's vector / matrix extensions, which the CPU engines' ratios depend on
    from tbn_runtime.cpu import cpu_flags
    assert isinstance(m["cpu_extensions"], list)
    assert ("AVX2" in m["cpu_extensions"]) == ("avx2" in cpu_flags())


def _check_timed_row(r, frames):
    for k in ("median_ms", "p90_ms", "p99_ms", "fps", "speedup", "peak_host_mb"):
        assert isinstance(r[k], float) and r[k] > 0, (r["row"], k, r.get(k))
    assert r["frames"] == frames and len(r["times_ms"]) == frames  # warm-up frames not timed


def test_latency_export_dirs(bench, tmp_path, capsys):
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    rc = latency.main(["--export", f"{bench['fp32']},{bench['fp16']}", "--frames", "2",
                       "--warmup", "1", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "latency" and report["device"] == "cpu"
    assert report["config"]["height"] == H and report["config"]["width"] == W
    assert report["config"]["random_weights"] is False
    _check_machine(report)
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == list(latency.ROWS)
    for name in ("naive", "ring", "ort", "ort-fp16", "tbn-run"):
        _check_timed_row(rows[name], 2)
    assert rows["naive"]["speedup"] == 1.0 and rows["ring"]["speedup_vs"] == "naive"
    # every row's labels against naive's on the same frames: the ring and ONNX Runtime fp32
    # compute what model(clip) computes; a wrong past frame or a broken ring would show here
    for name in ("naive", "ring", "ort", "ort-fp16"):
        assert rows[name]["agreement_vs"] == "naive"
    assert rows["naive"]["agreement"] == 1.0 and rows["ring"]["agreement"] == 1.0
    assert rows["ort"]["agreement"] >= 0.999 and rows["ort-fp16"]["agreement"] >= 0.99
    for name in ("naive-fp16", "ring-fp16"):  # CUDA only
        assert "skipped" in rows[name] and "median_ms" not in rows[name]
    from tbn_runtime.cpu import has_native_bf16
    if has_native_bf16():  # bf16 weights on the CPU (AMX / AVX512-BF16)
        _check_timed_row(rows["ring-bf16"], 2)
        assert "bf16 weights in the feature half" in rows["ring-bf16"]["describe"]
        # bf16's 8-bit mantissa on random weights (near-tied logits); a trained model's gate
        # is tbn-export --bf16 --verify (>= 99.5%, test_openvino)
        assert rows["ring-bf16"]["agreement"] >= 0.95
    else:  # emulated bf16 would be measured as what no user runs
        assert "no native bf16" in rows["ring-bf16"]["skipped"]
    for name in ("trt", "trt-fp32"):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            assert "not installed" in rows[name]["skipped"] and "median_ms" not in rows[name]
    assert rows["tbn-run"]["stream_stats"]["frames"] == 2
    if _has_openvino():  # the same export in OpenVINO computes what PyTorch computes
        from tbn_runtime.cpu import has_vnni
        _check_timed_row(rows["openvino"], 2)
        assert rows["openvino"]["agreement"] >= 0.999
        assert "fp32 export: feature graph in f32" in rows["openvino"]["describe"]
        _check_timed_row(rows["openvino-bf16"], 2)   # a bf16 export made on the fly
        assert rows["openvino-bf16"]["agreement"] >= 0.99
        if not has_vnni():
            assert "no VNNI" in rows["openvino-int8"]["skipped"]
    assert _is_png(png)
    table = capsys.readouterr().out
    assert "| PyTorch naive" in table and "ONNX Runtime fp16" in table
    assert "Machine:" in table and "cores" in table and "labels =" in table


def test_latency_a_failing_row_does_not_lose_the_others(bench, tmp_path, capsys):
    broken = tmp_path / "export-fp16"
    import shutil
    shutil.copytree(bench["fp16"], broken)
    with open(broken / "temporal.onnx", "r+b") as f:  # a damaged export: its sha256 differs
        f.truncate(100)
    out = tmp_path / "lat.json"
    rc = latency.main(["--export", f"{bench['fp32']},{broken}", "--frames", "2", "--warmup", "0",
                       "--only", "naive,ort,ort-fp16", "--json", str(out)])
    assert rc == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert "sha256" in rows["ort-fp16"]["failed"] and "median_ms" not in rows["ort-fp16"]
    for name in ("naive", "ort"):
        _check_timed_row(rows[name], 2)
    assert "FAILED" in capsys.readouterr().out


def test_latency_time_budget_covers_the_exports(tmp_path):
    """A budget spent before the first row: nothing is exported or built, all is reported."""
    out = tmp_path / "lat.json"
    rc = latency.main(["--model", "tbn_tiny", "--size", "64x96", "--frames", "2",
                       "--only", "naive,ort,tbn-run", "--time-budget", "0", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["export_seconds"] == {}  # the ort row's export was never made
    for r in report["rows"]:
        assert "time budget" in r["skipped"], r


def test_latency_sigterm_reports_what_was_measured_and_cleans_up(tmp_path):
    import glob
    import signal
    import tempfile
    import time

    out = tmp_path / "lat.json"
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "benchmarks", "latency.py"),
                          "--model", "tbn_tiny", "--size", "64x96", "--frames", "100000",
                          "--warmup", "0", "--only", "naive,ort", "--json", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    tmp_dirs = []
    try:
        for line in p.stderr:  # wait until both rows are built and being timed
            tmp_dirs = tmp_dirs or glob.glob(os.path.join(tempfile.gettempdir(),
                                                          f"tbn-latency-{p.pid}-*"))
            if "ort: ready" in line:
                break
        time.sleep(2)
        p.send_signal(signal.SIGTERM)
        stdout, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    report = json.loads(out.read_text())
    assert report["stopped"] == "SIGTERM"
    rows = {r["row"]: r for r in report["rows"]}
    assert rows["naive"]["frames"] >= 1 and rows["ort"]["frames"] >= 1
    assert "Stopped early: SIGTERM" in stdout
    assert tmp_dirs and not any(os.path.exists(d) for d in tmp_dirs)  # its exports removed


def test_latency_without_flags_times_the_exports_under_runs_tbn(bench, tmp_path, monkeypatch):
    import shutil
    runs = tmp_path / "runs" / "tbn"
    shutil.copytree(bench["fp32"], runs / "export")
    shutil.copytree(bench["fp16"], runs / "export-fp16")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "lat.json"
    assert latency.main(["--frames", "1", "--warmup", "0", "--only", "ort,ort-fp16",
                         "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["random_weights"] is False
    assert report["config"]["exports"] == {"fp32": os.path.join("runs", "tbn", "export"),
                                           "fp16": os.path.join("runs", "tbn", "export-fp16")}


def test_latency_random_model_and_row_choice(tmp_path):
    out = tmp_path / "lat.json"
    rc = latency.main(["--model", "tbn_tiny", "--size", "64x96", "--frames", "2", "--warmup",
                       "0", "--only", "ring,naive", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["random_weights"] is True and report["config"]["model"] == "tbn_tiny"
    assert [r["row"] for r in report["rows"]] == ["naive", "ring"]  # canonical order
    for r in report["rows"]:
        _check_timed_row(r, 2)


def test_latency_bad_flags_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        latency.main(["--only", "naive,warp"])
    assert e.value.code == 2 and "unknown rows" in capsys.readouterr().err
    assert latency.main(["--export", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_accuracy_gate_passes_for_the_real_backends(bench, tmp_path):
    out, png = tmp_path / "acc.json", tmp_path / "acc.png"
    # The ground truth is the reference's output, so every flipped pixel costs mIoU; a random
    # model has near-ties that fp16 flips, hence the wider fp16 tolerance here, and bf16 (three
    # mantissa bits fewer) flips more where the CPU computes it natively: 0.98 points at 99.52%
    # of the labels on an AVX512-BF16 EPYC. The trained demo model is gated at the defaults.
    rc = accuracy.main(["--data", bench["data"], "--exports", f"{bench['fp32']},{bench['fp16']}",
                        "--tol-fp16", "0.5", "--tol-bf16", "2", "--json", str(out),
                        "--plot", str(png)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["passed"] is True
    _check_machine(report)
    ref = report["reference"]
    assert ref["mIoU"] == pytest.approx(100.0) and ref["frames"] == 18 and ref["videos"] == 1
    rows = {r["row"]: r for r in report["rows"]}
    assert {"ort fp32", "ort fp16", "trt fp32", "trt fp16"} <= set(rows)
    for name in ("ort fp32", "ort fp16"):
        r = rows[name]
        assert r["passed"] is True
        for k in ("mIoU", "mVC8", "mVC16"):
            assert 0 < r[k] <= 100 and r[f"d_{k}"] is not None
        assert 0.99 < r["agreement"] <= 1.0
    assert abs(rows["ort fp32"]["d_mIoU"]) <= 0.01
    # a bf16 export made on the fly: ONNX Runtime refuses it, OpenVINO scores it
    assert "bf16" in rows["ort bf16"]["skipped"] and "openvino" in rows["ort bf16"]["skipped"]
    if _has_openvino():
        for name in ("openvino fp32", "openvino fp16", "openvino bf16"):
            assert rows[name]["passed"] is True and rows[name]["agreement"] > 0.99, name
        assert abs(rows["openvino fp32"]["d_mIoU"]) <= 0.01
    assert _is_png(png)


def test_accuracy_gate_fails_for_a_wrong_past_frame(bench, tmp_path, capsys):
    out = tmp_path / "acc.json"
    rc = accuracy.main(["--data", bench["data"], "--exports", bench["fp32"], "--no-fp16",
                        "--fault", "wrong-past", "--json", str(out)])
    assert rc == 1
    report = json.loads(out.read_text())
    row = next(r for r in report["rows"] if r["row"] == "ort fp32")
    assert report["passed"] is False and row["passed"] is False and row["fault"] == "wrong-past"
    assert row["d_mIoU"] < -0.01 and row["agreement"] < 1.0
    assert "gate: FAIL" in capsys.readouterr().out


def test_evaluate_backend_hook(bench):
    """The gate's test hook: any Backend-like object, made wrong by inject_fault or by hand."""
    from tbn_runtime.backends.ort import OrtBackend
    from tbn_runtime.manifest import load_manifest
    from tbn_train.checkpoint import load_model
    from tbn_train.data.vspw import index_split

    import numpy as np

    videos = index_split(bench["data"], "val")
    model, _ = load_model(bench["ckpt"])
    ref_preds = accuracy.reference_predictions(model, videos, H, W)
    ref = accuracy.evaluate_backend(_Replay(ref_preds, videos), videos, ref_preds)
    # a replay with 37 labelled pixels of one frame changed: agreement counts exactly those
    changed = {v.name: [p.copy() for p in ref_preds[v.name]] for v in videos}
    frame = changed[videos[0].name][5]
    frame.flat[:37] = (frame.flat[:37].astype(int) + 1) % 124
    row = accuracy.evaluate_backend(_Replay(changed, videos), videos, ref_preds)
    labelled = sum(int(np.count_nonzero(m != 255)) for v in videos for m in _labels(v))
    flipped = int(np.count_nonzero(_labels(videos[0])[5].flat[:37] != 255))
    assert flipped > 0
    assert row["agreement"] == pytest.approx(1 - flipped / labelled)
    assert row["mIoU"] < ref["mIoU"]
    tol = {"fp32": 0.01, "fp16": 0.1}

    good = OrtBackend(bench["fp32"], load_manifest(bench["fp32"]), "cpu")
    row = {"precision": "fp32", **accuracy.evaluate_backend(good, videos, ref_preds)}
    assert accuracy.gate(row, ref, tol)[0] is True
    good.close()

    bad = accuracy.inject_fault(OrtBackend(bench["fp32"], load_manifest(bench["fp32"]), "cpu"),
                                "wrong-past")
    row = {"precision": "fp32", **accuracy.evaluate_backend(bad, videos, ref_preds)}
    passed, why = accuracy.gate(row, ref, tol)
    assert passed is False and "dmIoU" in why
    bad.close()


def _labels(video):
    from tbn_train.data.vspw import iter_video
    return [label for _, _, label in iter_video(video)]


class _Replay:
    """A Backend-like object that replays stored labels (the reference itself)."""

    def __init__(self, preds, videos):
        self.height, self.width = H, W
        self._queue = [p for v in videos for p in preds[v.name]]

    def reset(self):
        pass

    def infer(self, frame):
        return self._queue.pop(0)


def test_streams_benchmark_batches_what_it_says(tmp_path):
    import streams
    out = tmp_path / "streams.json"
    assert streams.main(["--size", "64x96", "--counts", "1,3", "--steps", "1", "--warmup", "0",
                         "--json", str(out)]) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    names = ["ort", "torch"] + (["openvino", "openvino-batch"] if _has_openvino() else [])
    for name in names:
        counts = rows[name]["counts"]
        assert counts["1"]["speedup"] == 1.0 and counts["1"]["batch_limit"] == 1
        assert counts["3"]["batch_limit"] == 3 and counts["3"]["frames_per_s"] > 0
    if _has_openvino():
        assert "3 async requests" in rows["openvino"]["describe"]
        assert "batched request" in rows["openvino-batch"]["describe"]
