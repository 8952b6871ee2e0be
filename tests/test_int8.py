"""INT8: the Q/DQ feature graph (what is INT8, what stays float, TensorRT validity), the
manifest record, calibration frames and the held-out frames, the --verify gate, the CLI's
one-line errors, tbn-run on the INT8 export without torch, and the benchmarks' INT8 rows.

A random-init tbn_tiny (BatchNorm statistics randomised) at 64 x 96, calibrated on a few frames
of a synthetic video.
"""

import json
import os
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export_helpers import TINY_H, TINY_W, checkpoint, tiny  # noqa: F401 (fixtures)
from runtime_helpers import decode, synthetic_frames, tbn_run, write_video
from tbn_export import int8
from tbn_export.cli import main
from tbn_export.onnx_export import export_onnx
from tbn_export.verify import (FEATURE_REL_TOL, LABEL_AGREEMENT, compare, onnx_chain,
                               verify_export)
from tbn_runtime.files import sha256_file
from tbn_runtime.manifest import load_manifest
from tbn_runtime.masks import read_label_png

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import accuracy  # noqa: E402
import latency  # noqa: E402

H, W = TINY_H, TINY_W
CALIB_FRAMES = 6


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """Two videos: calibration reads a.mp4, --verify the held-out b.mp4."""
    d = tmp_path_factory.mktemp("calib")
    write_video(str(d / "a.mp4"), synthetic_frames(32, H, W, seed=1))
    write_video(str(d / "b.mp4"), synthetic_frames(16, H, W, seed=2))
    return str(d)


@pytest.fixture(scope="module")
def int8_dir(checkpoint, calib_dir, tmp_path_factory):
    """tbn-export --int8 --verify: exit 0 means the gate passed on the held-out video."""
    out = str(tmp_path_factory.mktemp("int8") / "export")
    assert main(["--checkpoint", checkpoint, "--out", out, "--int8", "--calib", calib_dir,
                 "--calib-frames", str(CALIB_FRAMES), "--verify", "--verify-frames", "12"]) == 0
    return out


@pytest.fixture(scope="module")
def fp32_feature(tiny, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("fp32"))
    export_onnx(tiny, d, H, W)
    return onnx.load(os.path.join(d, "feature.onnx"))


def _feature(export_dir):
    return onnx.load(os.path.join(export_dir, "feature.onnx"))


def _dq_fed(model):
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if any(i in dq_out for i in n.input)}


# -- the graph --------------------------------------------------------------------------------
def test_convs_and_weight_matmuls_are_int8_the_rest_float(int8_dir, fp32_feature):
    q = _feature(int8_dir)
    ops = int8.int8_ops(q)
    assert ops.get("Conv", 0) >= 10 and ops.get("MatMul", 0) >= 4, ops
    # LayerNorm, Softmax, GELU (Erf), the residual Adds: present, and none computed in INT8
    present = {n.op_type for n in q.graph.node}
    assert {"LayerNormalization", "Softmax", "Erf", "Add"} <= present
    assert not set(ops) & set(int8.FLOAT_OPS), ops
    # attention's two activation products read no dequantized input
    attention = set(int8.activation_matmuls(fp32_feature))
    assert len(attention) >= 2
    fed = _dq_fed(q)
    assert not attention & fed
    assert {n.name for n in q.graph.node if n.op_type == "MatMul"} - attention <= fed
    # the fusion module's conv over the Concat of both paths stays float (OpenVINO computes
    # its quantized form wrongly), every other Conv reads a dequantized input
    fusion = set(int8.concat_convs(fp32_feature))
    assert len(fusion) == 1 and not fusion & fed
    assert {n.name for n in q.graph.node if n.op_type == "Conv"} - fusion <= fed
    # the temporal graph stays float
    temporal = onnx.load(os.path.join(int8_dir, "temporal.onnx"))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in temporal.graph.node}


def test_qdq_graph_is_tensorrt_explicit_quantization_input(int8_dir):
    q = _feature(int8_dir)
    assert int8.tensorrt_qdq_problems(q) == []
    # every Q produces int8 (not uint8) and no bias is dequantized from int32
    zps = {n.input[2] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    assert zps and all(inits[z].dtype == np.int8 and not inits[z].any() for z in zps)
    # the checker itself: an asymmetric uint8 zero point is named
    z = sorted(zps)[0]
    for init in q.graph.initializer:
        if init.name == z:
            init.CopyFrom(numpy_helper.from_array(np.array(128, np.uint8), z))
    problems = int8.tensorrt_qdq_problems(q)
    assert problems and "uint8" in problems[0]


def test_manifest_records_the_quantization(int8_dir, calib_dir):
    m = load_manifest(int8_dir)
    assert m.precision == "int8" and m.feature_dtype == "float32"
    q = m.quantization
    assert q["quantizer"] == "onnxruntime.quantization.quantize_static"
    assert q["format"] == "QDQ" and q["calibration_method"] == "minmax"
    assert "symmetric" in q["activations"] and "symmetric" in q["weights"]
    assert q["calibration"] == {"source": os.path.abspath(calib_dir), "frames": CALIB_FRAMES,
                                "videos": 1, "stride": int8.CALIB_STRIDE}
    graph = _feature(int8_dir)
    assert q["qdq"]["QuantizeLinear"] == sum(n.op_type == "QuantizeLinear"
                                             for n in graph.graph.node)
    assert m.files["feature.onnx"]["sha256"] == sha256_file(os.path.join(int8_dir,
                                                                         "feature.onnx"))
    m.verify_file(int8_dir, "temporal.onnx")


# -- calibration frames -------------------------------------------------------------------------
def test_calibration_frames_and_held_out_frames(calib_dir):
    a, b = decode(os.path.join(calib_dir, "a.mp4")), decode(os.path.join(calib_dir, "b.mp4"))
    c = int8.read_calibration(calib_dir, 4, H, W, held_out=5)
    assert c.videos == ["a"] and len(c.frames) == 4
    for got, want in zip(c.frames, a[::int8.CALIB_STRIDE]):
        assert np.array_equal(got, want)
    assert len(c.held_out) == 5 and all(np.array_equal(x, y) for x, y in zip(c.held_out, b))
    # one video: the held-out frames follow its last calibration frame
    one = int8.read_calibration(os.path.join(calib_dir, "a.mp4"), 3, H, W, held_out=4)
    last = 2 * int8.CALIB_STRIDE
    assert all(np.array_equal(x, y) for x, y in zip(one.held_out, a[last + 1:last + 5]))
    assert len(one.held_out) == 4
    # resized to the export size
    small = int8.read_calibration(calib_dir, 2, 32, 48)
    assert small.frames[0].shape == (32, 48, 3)


def test_vspw_split_list_calibrates_on_that_split_only(tmp_path):
    from tbn_train.data.synth import generate

    root = tmp_path / "vspw"
    generate(root, height=32, width=48, videos_train=2, videos_val=1, videos_test=0, frames=6)
    c = int8.read_calibration(str(root / "train.txt"), 8, 32, 48)
    train = (root / "train.txt").read_text().split()
    assert c.videos and set(c.videos) <= set(train)
    (root / "other.txt").write_text("no_such_video\n")
    with pytest.raises(int8.Int8Error, match="lists 'no_such_video'"):
        int8.read_calibration(str(root / "other.txt"), 4, 32, 48)


# -- the gate --------------------------------------------------------------------------------------
def _break_scales(model, factor=0.02):
    """Shrink every activation scale: nearly everything saturates (a broken calibration)."""
    weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"} & {
        i.name for i in model.graph.initializer}
    scales = {n.input[1] for n in model.graph.node
              if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in weights}
    for init in model.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor,
                                                  init.name))
    return model


def test_verify_gate_passes_int8_and_fails_a_broken_one(int8_dir, tiny, calib_dir, tmp_path):
    held = int8.read_calibration(calib_dir, CALIB_FRAMES, H, W, held_out=12).held_out
    good = verify_export(int8_dir, tiny, held)
    assert good.precision == "int8" and good.threshold == LABEL_AGREEMENT["int8"] == 0.99
    assert good.ok, good.table()
    broken = str(tmp_path / "broken")
    shutil.copytree(int8_dir, broken)
    onnx.save(_break_scales(_feature(broken)), os.path.join(broken, "feature.onnx"))
    m = load_manifest(broken)
    m.add_file(broken, "feature.onnx")
    m.save(broken)
    bad = verify_export(broken, tiny, held)
    # (this random model's labels hardly depend on its features, so the feature bound is
    # what catches the broken calibration here; the label threshold is tested below)
    assert not bad.ok and bad.feature_rel > FEATURE_REL_TOL["int8"], bad.table()


def test_a_backend_that_fails_the_int8_check_is_recorded_and_refuses_the_export(
        checkpoint, calib_dir, tmp_path, monkeypatch, capsys):
    """ONNX Runtime passes and OpenVINO (here: a stand-in giving wrong labels, as OpenVINO
    2026.4 computes this random model's Q/DQ graph) fails: the export is still written, the
    manifest records both checks, the openvino backend refuses the export naming what was
    measured, and auto runs it on ONNX Runtime."""
    from tbn_export import verify
    from tbn_runtime.backends import select_backend
    from tbn_runtime.backends.openvino import OpenVinoBackend

    def wrong(export_dir, frames, manifest):
        features, labels = onnx_chain(export_dir, frames, manifest)
        return features, [(lab + 1) % manifest.num_classes for lab in labels]
    monkeypatch.setattr(verify, "openvino_runs", lambda manifest, bf16=False: True)
    monkeypatch.setattr(verify, "openvino_chain", wrong)
    out = str(tmp_path / "export")
    assert main(["--checkpoint", checkpoint, "--out", out, "--int8", "--calib", calib_dir,
                 "--calib-frames", "4", "--verify", "--verify-frames", "10"]) == 0
    captured = capsys.readouterr()
    assert "recorded: the openvino backend refuses this export" in captured.out
    assert "openvino backend computes this export wrongly" in captured.err
    m = load_manifest(out)
    assert m.verified["ort"]["passed"] is True and m.verified["ort"]["labels_agree"] >= 0.99
    assert m.verified["openvino"]["passed"] is False
    assert m.verified["openvino"]["labels_agree"] < 0.01 and m.verified["ort"]["machine"]
    ok, why = OpenVinoBackend.accepts(m)
    assert not ok and "failed verification on the openvino backend" in why
    assert "--backend ort" in why and "% equal to PyTorch's" in why
    assert select_backend("auto", m, "cpu", out)[0].name == "ort"
    # a check that passed refuses nothing
    m.verified["openvino"]["passed"] = True
    assert OpenVinoBackend.accepts(m)[0] or "no VNNI" in OpenVinoBackend.accepts(m)[1]


def test_int8_label_threshold():
    """The int8 gate needs 99% of the labels (looser than fp32's 99.9%, no looser)."""
    feats = [np.ones((4, 2, 2), np.float32)]
    ref = np.zeros((20, 50), np.uint8)
    for flipped, ok in ((5, True), (20, False)):  # 0.5% and 2% of the pixels differ
        labels = ref.copy()
        labels.flat[:flipped] = 1
        result = compare((feats, [labels]), (feats, [ref]), "int8")
        assert result.ok is ok, result.table()
    assert not compare((feats, [labels]), (feats, [ref]), "fp32").ok


def test_cli_refuses_an_int8_export_that_fails_the_gate(checkpoint, calib_dir, tmp_path,
                                                        monkeypatch, capsys):
    real = int8.quantize_feature_graph
    monkeypatch.setattr(int8, "quantize_feature_graph",
                        lambda *a, **k: _break_scales(real(*a, **k)))
    out = tmp_path / "export"
    assert main(["--checkpoint", checkpoint, "--out", str(out), "--int8", "--calib", calib_dir,
                 "--calib-frames", "4", "--verify", "--verify-frames", "10"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "verification failed" in captured.err
    assert not out.exists() and os.listdir(tmp_path) == []


# -- the CLI's one-line errors --------------------------------------------------------------------
def _one_line(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tbn-export: ") and "Traceback" not in err
    assert needle in err, err


@pytest.mark.parametrize("flags,needle", [
    (["--int8"], "--int8 needs --calib SOURCE"),
    (["--calib", "CALIB"], "only apply to --int8"),
    (["--calib-frames", "8"], "only apply to --int8"),
    (["--int8", "--fp16", "--calib", "CALIB"], "exclude each other"),
    (["--int8", "--calib", "MISSING"], "calibration source not found"),
    (["--int8", "--calib", "CALIB", "--calib-frames", "0"], "--calib-frames must be >= 1"),
    (["--int8", "--calib", "GARBAGE"], "cannot read calibration source"),
    (["--int8", "--calib", "EMPTY"], "cannot read calibration source"),
    (["--int8", "--calib", "SHORT", "--calib-frames", "64", "--verify"], "pass --video FILE"),
])
def test_cli_int8_errors(flags, needle, checkpoint, calib_dir, tmp_path, capsys):
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all" * 100)
    (tmp_path / "empty").mkdir()
    short = write_video(str(tmp_path / "short.mp4"), synthetic_frames(6, H, W, seed=4))
    paths = {"CALIB": calib_dir, "MISSING": str(tmp_path / "nope"), "EMPTY": str(tmp_path / "empty"),
             "GARBAGE": str(tmp_path / "garbage.mp4"), "SHORT": short}
    flags = [paths.get(f, f) for f in flags]
    out = tmp_path / "export"
    assert main(["--checkpoint", checkpoint, "--out", str(out)] + flags) == 2
    _one_line(capsys, needle)
    assert not out.exists()


# -- the runtime ---------------------------------------------------------------------------------
def test_tbn_run_streams_the_int8_export_without_torch(int8_dir, calib_dir, tmp_path):
    video = os.path.join(calib_dir, "b.mp4")
    out = tmp_path / "masks"
    r = tbn_run(video, "--out", str(out), "--model", int8_dir, "--backend", "ort")
    assert r.returncode == 0, r.stderr
    frames = decode(video)
    _, labels = onnx_chain(int8_dir, frames)
    for t, want in enumerate(labels):
        assert np.array_equal(read_label_png(out / "b" / f"{t:08d}.png"), want), t
    assert len(os.listdir(out / "b")) == len(frames)


def _no_tensorrt_gpu():
    from tbn_export.tensorrt_build import tensorrt_available

    ok, why = tensorrt_available()
    return f"TensorRT not importable ({why})" if not ok else (
        None if torch.cuda.is_available() else "no CUDA GPU")


@pytest.mark.skipif(_no_tensorrt_gpu() is not None, reason=str(_no_tensorrt_gpu()))
def test_cuda_tensorrt_builds_and_streams_the_int8_export(int8_dir, tmp_path):
    """The Q/DQ graph as explicit-quantization input of a strongly typed TensorRT build, whose
    engines label frames as ONNX Runtime does with the same graph."""
    from tbn_export.tensorrt_build import build_engines
    from tbn_runtime.backends import backend_class

    d = str(tmp_path / "export")
    shutil.copytree(int8_dir, d)
    m = build_engines(d, workspace_gb=1.0)
    for name in ("feature.engine", "temporal.engine"):
        assert m.files[name]["sha256"] == sha256_file(os.path.join(d, name))
    frames = synthetic_frames(12, H, W, seed=5)
    with backend_class("trt")(d, m, "cuda") as trt, \
            backend_class("ort")(int8_dir, load_manifest(int8_dir), "cpu") as ort:
        agree = [float((trt.infer(f) == ort.infer(f)).mean()) for f in frames]
    assert min(agree) >= 0.99, agree


# -- the benchmarks' INT8 rows ----------------------------------------------------------------
def test_latency_int8_row(tmp_path):
    out = tmp_path / "lat.json"
    assert latency.main(["--model", "tbn_tiny", "--size", f"{H}x{W}", "--frames", "2",
                         "--warmup", "0", "--only", "ort,ort-int8", "--calib-frames", "3",
                         "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert rows["ort-int8"]["label"] == "ONNX Runtime int8"
    assert rows["ort-int8"]["median_ms"] > 0 and rows["ort-int8"]["frames"] == 2
    assert "ort" in rows["ort-int8"]["describe"]
    assert report["config"]["int8_calibration"] == {"source": "synthetic", "frames": 3}


def test_accuracy_int8_row_and_its_tolerance(checkpoint, tiny, tmp_path):
    from tbn_train.data.synth import generate

    data = tmp_path / "data"
    generate(data, height=H, width=W, videos_train=2, videos_val=1, videos_test=0, frames=12)
    fp32 = str(tmp_path / "export")
    export_onnx(tiny, fp32, H, W, checkpoint_path=checkpoint)
    out = tmp_path / "acc.json"
    rc = accuracy.main(["--data", str(data), "--exports", fp32, "--no-fp16", "--backends", "ort",
                        "--calib-frames", "4", "--tol-int8", "100", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    row = rows["ort int8"]
    assert rc == 0 and row["passed"] is True and row["precision"] == "int8"
    for k in ("mIoU", "mVC8", "d_mIoU", "agreement"):
        assert row[k] is not None, k
    assert report["tolerances"]["int8"] == 100
    assert report["config"]["int8_calibration"]["source"] == str(data / "train.txt")
    # the default int8 tolerance is 0.5 mIoU points
    assert accuracy.parse_args([]).tol_int8 == 0.5
    ref = {"mIoU": 50.0}
    assert accuracy.gate({"precision": "int8", "mIoU": 49.6}, ref, {"int8": 0.5})[0] is True
    assert accuracy.gate({"precision": "int8", "mIoU": 49.4}, ref, {"int8": 0.5})[0] is False
    # no calibration frames: the row is reported as not run, the gate does not fail for it
    rc = accuracy.main(["--data", str(data), "--exports", fp32, "--no-fp16", "--backends", "ort",
                        "--calib", str(tmp_path / "nothing"), "--json", str(out)])
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert rc == 0 and "pass --calib" in rows["ort int8"]["skipped"]
