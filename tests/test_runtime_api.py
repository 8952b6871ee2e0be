"""The runtime's Python API (tbn_runtime.Segmenter) and the output formats of tbn-run."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from runtime_helpers import (decode, reference_labels,
                             synthetic_frames, tbn_run, write_video)
from tbn_runtime import rle

SRC_H, SRC_W = 72, 104   # not the export size


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    path = write_video(str(d / "walk.mp4"), synthetic_frames(12, SRC_H, SRC_W, seed=11))
    return path, decode(path)


def test_segmenter_api_equals_clip_inference(export_dir, clip):
    from tbn_runtime import CLASSES, Segmenter, colorize

    path, frames = clip
    ref = reference_labels(export_dir, frames, "api-walk")
    with Segmenter(export_dir, backend="ort", device="cpu") as seg:
        got = [seg.segment(f) for f in frames]            # frames at their own size
        assert all(g.shape == (SRC_H, SRC_W) and g.dtype == np.uint8 for g in got)
        assert min(float((g == r).mean()) for g, r in zip(got, ref)) >= 0.999
        # without reset() the next frames continue the video: the first frame's labels differ
        # from a fresh start only if the past matters, so compare against a reset() instead
        seg.reset()
        again = [seg.segment(f) for f in frames[:3]]
        assert all(np.array_equal(a, g) for a, g in zip(again, got[:3]))
        results = list(seg.stream(path))
        assert [r.name for r in results] == [f"{i:08d}" for i in range(12)]
        assert {r.video for r in results} == {"walk"} and results[5].index == 5
        assert all(np.array_equal(r.labels, g) for r, g in zip(results, got))
        # display helpers: colours of the palette, names by train id
        k = int(got[0][0, 0])
        assert colorize(got[0])[0, 0].tolist() == seg.palette_bgr[k].tolist()
        assert CLASSES[k] == seg.classes[k] and len(CLASSES) == 124
        with pytest.raises(ValueError, match="uint8 H x W x 3"):
            seg.segment(frames[0][:, :, 0])


def test_segmenter_skip_keeps_the_ring(export_dir, clip):
    """skip() frames run the feature engine only; the frames after still see their past."""
    from tbn_runtime import Segmenter

    path, _ = clip
    with Segmenter(export_dir, backend="ort", device="cpu") as seg:
        full = [r.labels for r in seg.stream(path)]
        part = list(seg.stream(path, skip=lambda video, name, frame: int(name) < 7))
    assert all(r.labels is None for r in part[:7])
    assert all(np.array_equal(r.labels, f) for r, f in zip(part[7:], full[7:]))


# -- COCO RLE ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rle_matches_pycocotools(seed):
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(seed)
    labels = cv2.resize(rng.integers(0, 4, (9, 13), dtype=np.uint8), (117, 61),
                        interpolation=cv2.INTER_NEAREST)
    labels[0, 0], labels[-1, -1] = 3, 1   # runs that start and end at the corners
    for k in range(4):
        m = labels == k
        ours = rle.encode(m)
        theirs = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode() and ours["size"] == theirs["size"]
        np.testing.assert_array_equal(mask_api.decode({"size": ours["size"],
                                                       "counts": ours["counts"].encode()}), m)
        np.testing.assert_array_equal(rle.decode(ours), m)
        assert rle.bbox(m) == [int(v) for v in mask_api.toBbox(theirs)]
    empty, full = np.zeros((5, 7), bool), np.ones((5, 7), bool)
    assert rle.decode(rle.encode(empty)).sum() == 0 and rle.decode(rle.encode(full)).all()


# -- tbn-run's formats ---------------------------------------------------------------------------
def test_tbn_run_formats_hold_the_same_labels(export_dir, clip, tmp_path):
    path, frames = clip
    ref = reference_labels(export_dir, frames, "api-walk")
    outs = {}
    for fmt in ("png", "npy", "coco-rle"):
        out = tmp_path / fmt
        r = tbn_run(path, "--out", str(out), "--model", export_dir, "--backend", "ort",
                    "--format", fmt)
        assert r.returncode == 0, r.stderr
        outs[fmt] = out
    from tbn_runtime.masks import read_label_png
    pngs = [read_label_png(outs["png"] / "walk" / f"{i:08d}.png") for i in range(12)]
    npys = [np.load(outs["npy"] / "walk" / f"{i:08d}.npy") for i in range(12)]
    doc = json.loads((outs["coco-rle"] / "walk.json").read_text())
    assert doc["info"]["complete"] is True and len(doc["images"]) == 12
    assert doc["categories"][0] == {"id": 1, "name": "wall"} and len(doc["categories"]) == 124
    cocos = []
    for image in doc["images"]:
        lab = np.full((image["height"], image["width"]), 255, np.uint8)
        for ann in doc["annotations"]:
            if ann["image_id"] == image["id"]:
                m = rle.decode(ann["segmentation"])
                assert ann["area"] == int(m.sum()) and ann["iscrowd"] == 1
                lab[m] = ann["category_id"] - 1
        cocos.append(lab)
    for p, n, c, e in zip(pngs, npys, cocos, ref):
        assert np.array_equal(p, n) and np.array_equal(p, c)
        assert (p == e).mean() >= 0.999
    # --resume of a complete coco-rle video does nothing but say so
    r = tbn_run(path, "--out", str(outs["coco-rle"]), "--model", export_dir, "--backend", "ort",
                "--format", "coco-rle", "--resume")
    assert r.returncode == 0 and "1 videos already done" in r.stdout, r.stdout + r.stderr


def test_overlay_has_a_legend_of_the_classes_on_screen(export_dir, clip, tmp_path):
    from tbn_runtime.overlay import draw_legend, legend_entries

    labels = np.zeros((120, 160), np.uint8)
    labels[:, 80:] = 28                       # sky, half the frame
    labels[:2, :2] = 60                       # person: 4 pixels, under the 0.5% shown
    entries = legend_entries(labels)
    assert [k for k, _ in entries] == [28, 0] and entries[0][1] == pytest.approx(0.5)
    palette = np.zeros((124, 3), np.uint8)
    palette[28] = (255, 0, 0)
    img = draw_legend(np.full((120, 160, 3), 128, np.uint8), labels, ["wall"] * 28 + ["sky"],
                      palette)
    assert (img[:30, :80] != 128).any()           # a panel top-left
    assert (img[60:, 100:] == 128).all()           # the rest untouched
    assert ((img == (255, 0, 0)).all(axis=2)).any()  # sky's swatch in its colour
    # through tbn-run: the overlay video's first frame carries the legend panel
    path, frames = clip
    r = tbn_run(path, "--out", str(tmp_path / "m"), "--model", export_dir, "--backend", "ort",
                "--overlay", str(tmp_path / "ov.avi"))
    assert r.returncode == 0, r.stderr
    video = decode(str(tmp_path / "ov.avi"))
    assert len(video) == 12 and video[0].shape == frames[0].shape
