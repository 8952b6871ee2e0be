"""tbn_export: ONNX export (fp32, fp16), the manifest, the chained graphs against PyTorch, the CLI.

Small random-init models on the CPU at 64 x 96 (padded to 64 x 96, features 8 x 12).
"""

import json
import os
import shutil

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from export_helpers import graph_io, node_dtypes
from tbn_export.cli import main
from tbn_export.fp16 import FP32_OPS
from tbn_export.onnx_export import export_onnx
from tbn_export.verify import (LABEL_AGREEMENT, compare, onnx_chain, synthetic_frames,
                               torch_chain, verify_export)
from tbn_runtime.files import sha256_file
from tbn_runtime.manifest import load_manifest
from tbn_train.checkpoint import save_checkpoint
from tbn_train.models import build_model, randomize_batchnorm

H, W = 64, 96
N_FRAMES = 14  # includes the first nine, where max(t - k, 0) clamps to frame 0
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_batchnorm(build_model("tbn_tiny")).eval()


@pytest.fixture(scope="module")
def frames():
    return synthetic_frames(N_FRAMES, H, W, seed=3)


@pytest.fixture(scope="module")
def reference(tiny, frames):
    """PyTorch features and labels per frame (model.forward on each frame's clip)."""
    return torch_chain(tiny, frames)


@pytest.fixture(scope="module")
def fp32_dir(tiny, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("fp32"))
    export_onnx(tiny, d, H, W)
    return d


@pytest.fixture(scope="module")
def fp16_dir(tiny, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("fp16"))
    export_onnx(tiny, d, H, W, fp16=True, logits=True)
    return d


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "best.safetensors")
    save_checkpoint(path, tiny, config={"model": "tbn_tiny", "crop_size": [H, W]})
    return path


# -- graphs and manifest -----------------------------------------------------------------------
def test_fp32_graphs_and_manifest(fp32_dir, tiny):
    m = load_manifest(fp32_dir)
    assert m.model == "tbn_tiny" and m.num_classes == 124 and len(m.class_names) == 124
    assert len(m.palette) == 124 and (m.height, m.width) == (H, W)
    assert m.feature_shape == [1, tiny.feature_chs, H // 8, W // 8]
    assert m.feature_dtype == "float32" and m.precision == "fp32"
    assert m.temporal_offsets == [3, 6, 9] and m.ring_size == 10
    assert m.past_inputs == ["past_3", "past_6", "past_9"] and m.logits_output is None
    assert m.versions["torch"] and m.versions["onnx"] and m.versions["onnxruntime"]
    for name in ("feature.onnx", "temporal.onnx"):
        assert m.files[name]["sha256"] == sha256_file(os.path.join(fp32_dir, name))
        m.verify_file(fp32_dir, name)
    feat = onnx.load(os.path.join(fp32_dir, "feature.onnx"))
    temp = onnx.load(os.path.join(fp32_dir, "temporal.onnx"))
    onnx.checker.check_model(feat)
    onnx.checker.check_model(temp)
    fshape = ["batch"] + m.feature_shape[1:]  # one frame per stream on the batch axis
    assert graph_io(feat) == {"inputs": {"frame": ("uint8", ["batch", H, W, 3])},
                              "outputs": {"feature": ("float32", fshape)}}
    io = graph_io(temp)
    assert list(io["inputs"]) == ["current", "past_3", "past_6", "past_9"]
    assert all(v == ("float32", fshape) for v in io["inputs"].values())
    assert io["outputs"] == {"labels": ("uint8", ["batch", H, W])}
    for g in (feat, temp):
        ops = {n.op_type for n in g.graph.node}
        assert not ops & {"Dropout", "BatchNormalization"}
        assert g.opset_import[0].version >= 17
    assert "LayerNormalization" in {n.op_type for n in feat.graph.node}


def test_fp16_graph_io(fp16_dir, tiny):
    m = load_manifest(fp16_dir)
    assert m.precision == "fp16" and m.feature_dtype == "float16" and m.logits_output == "logits"
    feat = graph_io(onnx.load(os.path.join(fp16_dir, "feature.onnx")))
    temp = graph_io(onnx.load(os.path.join(fp16_dir, "temporal.onnx")))
    assert feat["inputs"] == {"frame": ("uint8", ["batch", H, W, 3])}
    fshape = ["batch"] + m.feature_shape[1:]
    assert feat["outputs"] == {"feature": ("float16", fshape)}
    assert all(v == ("float16", fshape) for v in temp["inputs"].values())
    assert temp["outputs"] == {"labels": ("uint8", ["batch", H, W]),
                               "logits": ("float32", ["batch", 124, H, W])}


def test_fp16_graphs_take_a_batch_of_streams(fp16_dir, frames):
    """The fp16 pass keeps the batch axis: two frames in one call give each frame's feature."""
    import numpy as np

    from tbn_runtime.backends.ort import create_session

    sess = create_session(os.path.join(fp16_dir, "feature.onnx"))
    both = sess.run(None, {"frame": np.stack(frames[:2])})[0]
    for i in range(2):
        alone = sess.run(None, {"frame": frames[i][None]})[0]
        assert np.array_equal(both[i:i + 1], alone)


def test_fp16_keeps_layernorm_softmax_reductions_fp32(fp16_dir):
    for name in ("feature.onnx", "temporal.onnx"):
        g = onnx.load(os.path.join(fp16_dir, name))
        onnx.checker.check_model(g)
        dtypes = node_dtypes(g)
        kept = [(n, op, t) for n, (op, t) in dtypes.items() if op in FP32_OPS]
        assert kept, name
        for node, op, types in kept:  # data input (and LayerNorm's scale/bias) stay float32
            assert types[0] == FLOAT, (name, node, op, types)
            if op == "LayerNormalization":
                assert all(t == FLOAT for t in types), (node, types)
        heavy = [t for op, t in dtypes.values() if op in ("Conv", "MatMul")]
        assert heavy and all(t[0] == FLOAT16 and t[1] == FLOAT16 for t in heavy), name
    ops = {op for op, _ in node_dtypes(onnx.load(os.path.join(fp16_dir, "feature.onnx"))).values()}
    assert {"LayerNormalization", "Softmax", "ReduceMean"} <= ops


# -- the chain against PyTorch -----------------------------------------------------------------
def test_fp32_chain_matches_pytorch(fp32_dir, frames, reference):
    result = compare(onnx_chain(fp32_dir, frames), reference, "fp32")
    assert result.frames == N_FRAMES
    assert result.feature_rel < 1e-4, result.table()
    # frame by frame, the first nine included (the clamped past indices)
    assert min(result.per_frame_agree) >= LABEL_AGREEMENT["fp32"], result.per_frame_agree
    assert result.ok


def test_fp16_chain_matches_pytorch(fp16_dir, frames, reference):
    result = compare(onnx_chain(fp16_dir, frames), reference, "fp16")
    assert result.feature_rel < 2e-2, result.table()
    assert min(result.per_frame_agree) >= LABEL_AGREEMENT["fp16"], result.per_frame_agree
    assert result.ok


def test_broken_ring_fails_the_threshold(fp32_dir, frames, reference):
    """Feeding the current feature as every past feature (a broken ring) must fall below the
    fp32 agreement threshold, so the chain checks above would catch a ring bug."""
    from tbn_runtime.backends.ort import create_session

    m = load_manifest(fp32_dir)
    fs = create_session(os.path.join(fp32_dir, "feature.onnx"))
    ts = create_session(os.path.join(fp32_dir, "temporal.onnx"))
    t = N_FRAMES - 1
    (feat,) = fs.run(None, {"frame": frames[t][None]})
    (lab,) = ts.run(None, {"current": feat, **{k: feat for k in m.past_inputs}})
    assert (lab[0] == reference[1][t]).mean() < LABEL_AGREEMENT["fp32"]


@pytest.fixture(scope="module")
def bisenet():
    torch.manual_seed(1)
    return randomize_batchnorm(build_model("bisenet_tiny", num_classes=11)).eval()


@pytest.fixture(scope="module")
def bisenet_dir(bisenet, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bisenet"))
    export_onnx(bisenet, d, H, W)
    return d


def test_image_model_exports_current_only(bisenet, bisenet_dir):
    m = load_manifest(bisenet_dir)
    assert m.temporal_offsets == [] and m.past_inputs == [] and m.ring_size == 1
    assert len(m.class_names) == 11 and len(m.palette) == 11
    io = graph_io(onnx.load(os.path.join(bisenet_dir, "temporal.onnx")))
    assert list(io["inputs"]) == ["current"]
    clip_frames = synthetic_frames(3, H, W, seed=5)
    result = verify_export(bisenet_dir, bisenet, clip_frames)
    assert result.labels_agree >= LABEL_AGREEMENT["fp32"], result.table()


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_export_then_reexport(checkpoint, tiny, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["--checkpoint", checkpoint, "--out", str(out)]) == 0
    text = capsys.readouterr().err
    assert f"{H}x{W}" in text and "crop_size" in text  # the size used, and where it came from
    m = load_manifest(str(out))
    assert (m.height, m.width) == (H, W)
    assert m.checkpoint == {"path": os.path.abspath(checkpoint), "sha256": sha256_file(checkpoint),
                            "file": "weights.safetensors"}
    # the weights travel with the export: a byte copy of the checkpoint, listed with its sha256
    assert m.files["weights.safetensors"]["sha256"] == sha256_file(checkpoint)
    try:
        import tensorrt  # noqa: F401
    except Exception:
        assert "tbn-export --engine-only --out" in text
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary directory left beside it
    first = sha256_file(str(out / "feature.onnx"))
    stamp = os.path.getmtime(out / "manifest.json")

    # the same checkpoint again: up to date, nothing rewritten
    assert main(["--checkpoint", checkpoint, "--out", str(out)]) == 0
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("tbn-export: ") and "nothing to do" in said[0]
    assert main(["--checkpoint", checkpoint, "--out", str(out), "-q"]) == 0
    assert capsys.readouterr() == ("", "")  # -q: warnings and errors only
    assert os.path.getmtime(out / "manifest.json") == stamp

    # a newer checkpoint of the same model: exported again, in place of the old one
    newer = tmp_path / "newer.safetensors"
    with torch.no_grad():
        changed = build_model("tbn_tiny").eval()
        changed.load_state_dict(tiny.state_dict())
        changed.classifier[-1].bias.add_(1.0)
    save_checkpoint(str(newer), changed, config={"model": "tbn_tiny", "crop_size": [H, W]})
    assert main(["--checkpoint", str(newer), "--out", str(out)]) == 0
    assert "replacing the fp32 export" in capsys.readouterr().err
    m = load_manifest(str(out))
    assert m.checkpoint["sha256"] == sha256_file(str(newer))
    assert sha256_file(str(out / "temporal.onnx")) == m.files["temporal.onnx"]["sha256"]
    assert sha256_file(str(out / "feature.onnx")) == first  # the feature half did not change
    assert sorted(os.listdir(tmp_path)) == ["export", "newer.safetensors"]


def test_each_precision_has_its_own_default_folder(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--checkpoint", checkpoint]) == 0
    assert main(["--checkpoint", checkpoint, "--fp16"]) == 0
    runs = tmp_path / "runs" / "tbn"
    assert load_manifest(str(runs / "export")).precision == "fp32"
    assert load_manifest(str(runs / "export-fp16")).precision == "fp16"
    # tbn-run without --model takes what tbn-export made or found up to date last, whichever
    # manifest is newest (make demo, then the README's chain: its --fp16 is "up to date")
    from tbn_runtime.segmenter import choose_export

    for flags, taken in (([], "export"), (["--fp16"], "export-fp16"), ([], "export")):
        assert main(["--checkpoint", checkpoint, *flags]) == 0
        assert "nothing to do" in capsys.readouterr().err
        path, why = choose_export()
        assert path == os.path.join("runs", "tbn", taken) and "last" in why
    # an fp16 export into the fp32 folder is refused, and the folder left as it was
    before = sha256_file(str(runs / "export" / "manifest.json"))
    capsys.readouterr()
    assert main(["--checkpoint", checkpoint, "--fp16", "--out", str(runs / "export")]) == 2
    _assert_one_line_error(capsys, "fp32 export", "--overwrite")
    assert sha256_file(str(runs / "export" / "manifest.json")) == before


def test_out_dir_rules(fp32_dir, tmp_path):
    from tbn_export.out_dir import OutDirError as UsageError, check_out_dir as _check_out_dir

    m = load_manifest(fp32_dir)
    same = {"sha256": m.checkpoint["sha256"], "size": [m.height, m.width], "logits": False}
    assert _check_out_dir(str(tmp_path / "new"), "tbn_tiny", "fp32", False)[0] == "new"
    assert _check_out_dir(fp32_dir, "tbn_tiny", "fp32", False, same)[0] == "up to date"
    other_ckpt = dict(same, sha256="0" * 64)
    assert _check_out_dir(fp32_dir, "tbn_tiny", "fp32", False, other_ckpt)[0] == "replace"
    assert _check_out_dir(fp32_dir, "tbn_tiny", "fp32", False, dict(same, size=[32, 32]))[0] \
        == "replace"
    with pytest.raises(UsageError, match="tbn_tiny"):
        _check_out_dir(fp32_dir, "tbn_swin_l", "fp32", False)
    with pytest.raises(UsageError, match="fp32 export"):
        _check_out_dir(fp32_dir, "tbn_tiny", "fp16", False)
    assert "--overwrite" in _check_out_dir(fp32_dir, "tbn_swin_l", "fp16", True)[1]


def test_killed_exports_temporaries_are_swept(checkpoint, tmp_path):
    from runtime_helpers import dead_pid

    from tbn_runtime.files import TEMPORARY_MARK

    dead = tmp_path / f".tbn-export.tmp-{dead_pid()}-0123abcd"  # left by a killed export
    dead.mkdir()
    (dead / TEMPORARY_MARK).write_text("1\n")
    (dead / "feature.onnx").write_bytes(b"half")
    assert main(["--checkpoint", checkpoint, "--out", str(tmp_path / "export")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["export"]


def _assert_one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tbn-export: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.safetensors"),
                 "--out", str(tmp_path / "o")]) == 2
    _assert_one_line_error(capsys, "not found")
    assert not (tmp_path / "o").exists()


def test_cli_truncated_checkpoint(checkpoint, tmp_path, capsys):
    data = open(checkpoint, "rb").read()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    _assert_one_line_error(capsys, "truncated")


def test_cli_config_does_not_match_weights(checkpoint, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(checkpoint, framework="pt") as f:
        meta = dict(f.metadata())
    meta["model_kwargs"] = json.dumps({"fused_chs": 48})  # weights are for 64 channels
    bad = tmp_path / "mismatch.safetensors"
    save_file(load_file(checkpoint), str(bad), metadata=meta)
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    _assert_one_line_error(capsys, "do not match")


@pytest.mark.parametrize("size", [("16", "96"), ("64", "0"), ("-64", "96"), ("64", "abc"),
                                  ("100000", "96"), ("64", "16385")])  # the runtime: 32..16384
def test_cli_bad_export_size(checkpoint, tmp_path, capsys, size):
    assert main(["--checkpoint", checkpoint, "--out", str(tmp_path / "o"),
                 "--height", size[0], "--width", size[1]]) == 2
    _assert_one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_cli_refuses_another_models_export(checkpoint, bisenet_dir, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(bisenet_dir, out)
    before = sha256_file(str(out / "manifest.json"))
    assert main(["--checkpoint", checkpoint, "--out", str(out)]) == 2
    _assert_one_line_error(capsys, "bisenet_tiny", "--overwrite")
    assert sha256_file(str(out / "manifest.json")) == before  # untouched
    assert main(["--checkpoint", checkpoint, "--out", str(out), "--overwrite"]) == 0
    assert load_manifest(str(out)).model == "tbn_tiny"
    assert sorted(os.listdir(tmp_path)) == ["other"]  # the old export moved aside and removed


def _training_run(d):  # what tbn-train leaves in its --out
    (d / "stage1").mkdir(parents=True)
    (d / "best.safetensors").write_bytes(b"weights")
    (d / "stage1" / "last.safetensors").write_bytes(b"weights")
    (d / "metrics.jsonl").write_text("{}\n")


def _export_and_more(d, fp32_dir):  # an export with files of the user's beside it
    shutil.copytree(fp32_dir, d)
    (d / "masks").mkdir()
    (d / "masks" / "00000000.png").write_bytes(b"a mask")


def _notes(d):
    d.mkdir()
    (d / "notes.txt").write_text("mine")


def _hidden(d):
    d.mkdir()
    (d / ".git").write_text("mine, hidden")


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
@pytest.mark.parametrize("make, named", [
    (lambda d, fp32: _notes(d), "notes.txt"),
    (lambda d, fp32: _training_run(d), "best.safetensors"),
    (_export_and_more, "masks"),
    (lambda d, fp32: _hidden(d), ".git"),
])
def test_cli_replaces_only_an_export_it_wrote(checkpoint, fp32_dir, tmp_path, capsys, flags,
                                             make, named):
    """--overwrite replaces an export, never a folder of other files (a training run, notes,
    masks beside an export): refused in one line naming them, every file left as it was."""
    out = tmp_path / "stuff"
    make(out, fp32_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["--checkpoint", checkpoint, "--out", str(out), *flags]) == 2
    _assert_one_line_error(capsys, str(out), "not a tbn-vit export", named, "another --out")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["stuff"]  # no temporary left beside it


def test_cli_missing_video(checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--verify",
                 "--video", str(tmp_path / "nope.mp4")]) == 2
    _assert_one_line_error(capsys, "video not found")


def test_cli_engine_only_without_export(tmp_path, capsys):
    assert main(["--engine-only", "--out", str(tmp_path)]) == 2
    _assert_one_line_error(capsys, "manifest.json")


def test_cli_unknown_flag(capsys):
    assert main(["--no-such-flag"]) == 2
    _assert_one_line_error(capsys)
