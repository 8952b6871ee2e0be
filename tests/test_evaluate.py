"""tbn-eval: the ring-based predict_video equals the naive 4-frame clip forward; --pred metrics;
mistakes (checkpoints, predictions, labels beyond the classes) named in one line."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tbn_runtime.classes import PALETTE
from tbn_runtime.masks import write_mask_png
from tbn_runtime.preprocess import normalize_bgr
from tbn_runtime.temporal import clip_indices
from tbn_train.checkpoint import save_checkpoint
from tbn_train.data.vspw import index_split, iter_video
from tbn_train.evaluate import main, predict_logits, predict_video
from tbn_train.models import build_model

from train_helpers import synth_root  # noqa: F401 (a fixture)


def _naive_logits(model, frames, t):
    idx = clip_indices(t, model.temporal_offsets) if model.temporal_offsets else [t]
    clip = torch.stack([torch.from_numpy(normalize_bgr(frames[i])) for i in idx])[None]
    with torch.no_grad():
        return model(clip)


@pytest.mark.parametrize("name", ["tbn_tiny", "bisenet_tiny"])
def test_predict_video_equals_naive_clip_forward(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(13)]
    ring = list(predict_logits(model, iter(frames), "cpu"))
    labels = list(predict_video(model, iter(frames), "cpu"))
    assert len(ring) == len(labels) == 13
    for t in range(13):  # includes frames 0..8, where past indices clamp to 0
        naive = _naive_logits(model, frames, t)
        assert torch.allclose(ring[t], naive, atol=1e-4, rtol=1e-4), t
        top2 = naive[0].topk(2, dim=0).values
        clear = (top2[0] - top2[1] > 1e-3).numpy()
        want = naive[0].argmax(0).numpy().astype(np.uint8)
        assert labels[t].dtype == np.uint8 and labels[t].shape == (64, 96)
        assert np.array_equal(labels[t][clear], want[clear]), t


def test_eval_pred_of_ground_truth_is_perfect(synth_root, tmp_path):
    for video in index_split(synth_root, "val"):
        for t, _, label in iter_video(video):
            write_mask_png(tmp_path / "pred" / video.name / f"{video.frames[t].stem}.png", label)
    out = tmp_path / "m.json"
    assert main(["--pred", str(tmp_path / "pred"), "--data", str(synth_root),
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mIoU"] == pytest.approx(100.0)
    assert result["pixel_acc"] == pytest.approx(100.0) and result["mVC8"] == pytest.approx(100.0)
    assert result["frames"] == 12 and len(result["per_class_iou"]) >= 2


def test_eval_missing_prediction_names_it(synth_root, tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    assert main(["--pred", str(tmp_path / "pred"), "--data", str(synth_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "val_000" in err and "00000000.png" in err


def test_eval_checkpoint_matches_its_saved_predictions(synth_root, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(str(ckpt), build_model("tbn_tiny"), {"note": "random"})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["--checkpoint", str(ckpt), "--data", str(synth_root), "--device", "cpu",
                 "--save-pred", str(tmp_path / "pred"), "--out", str(a)]) == 0
    assert main(["--pred", str(tmp_path / "pred"), "--data", str(synth_root),
                 "--out", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for key in ("mIoU", "pixel_acc", "mVC8"):
        assert ra[key] == pytest.approx(rb[key])
    assert ra["frames_per_s"] > 0 and ra["model"] == "tbn_tiny"
    assert "mIoU" in capsys.readouterr().out


def test_eval_bad_checkpoint_is_one_line(synth_root, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.safetensors"),
                 "--data", str(synth_root)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# -- mistakes: one line naming the file, exit 2 -------------------------------------------------
def _checkpoint(path, num_classes=124):
    torch.manual_seed(0)
    save_checkpoint(str(path), build_model("tbn_tiny", num_classes=num_classes), {})
    return path


def _fewer_classes(tmp, data):
    return ["--checkpoint", str(_checkpoint(tmp / "c10.safetensors", 10))], \
        ["val_000", "mask/00000000.png", "10 classes"]


def _label_beyond_classes_mid_video(tmp, data):  # the sample reads first/last frames only
    mask = data / "data" / "val_000" / "mask" / "00000005.png"
    img = Image.fromarray(np.full((64, 96), 110, np.uint8))  # raw 110: train id 109
    img.putpalette(PALETTE.tobytes())
    img.save(mask)
    return ["--checkpoint", str(_checkpoint(tmp / "c100.safetensors", 100))], \
        [str(mask), "train ids [109]", "100 classes"]


def _prediction_200(tmp, data):
    for video in index_split(data, "val"):
        for t, _, label in iter_video(video):
            write_mask_png(tmp / "pred" / video.name / f"{video.frames[t].stem}.png", label)
    bad = tmp / "pred" / "val_000" / "00000004.png"
    write_mask_png(bad, np.full((64, 96), 200, np.uint8))
    return ["--pred", str(tmp / "pred")], [str(bad), "train ids"]


def _pickle_checkpoint(tmp, data):
    torch.save(build_model("tbn_tiny").state_dict(), tmp / "model.pt")
    return ["--checkpoint", str(tmp / "model.pt")], ["model.pt", "pickle", "never unpickles"]


def _truncated_checkpoint(tmp, data):
    whole = _checkpoint(tmp / "whole.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(whole[:len(whole) // 2])
    return ["--checkpoint", str(tmp / "cut.safetensors")], ["cut.safetensors", "truncated"]


@pytest.mark.parametrize("make", [_fewer_classes, _label_beyond_classes_mid_video,
                                  _prediction_200, _pickle_checkpoint, _truncated_checkpoint])
def test_eval_mistakes_name_the_file(make, synth_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    argv, words = make(tmp_path, data)
    assert main(argv + ["--data", str(data), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tbn-eval: error: "), err
    assert "mIoU" not in captured.out  # no table of a wrong evaluation
    for word in words:
        assert word in err[0], err[0]
