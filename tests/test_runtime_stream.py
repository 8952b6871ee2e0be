"""The streaming pipeline: equality with PyTorch clip inference, atomic writes, resume, memory."""

import os
import tracemalloc

import cv2
import numpy as np
import pytest

from runtime_helpers import (decode, reference_labels, synthetic_frames, tbn_run,
                             write_video)
from tbn_runtime.backends import backend_class
from tbn_runtime.backends.base import Backend
from tbn_runtime.manifest import load_manifest
from tbn_runtime.masks import read_label_png
from tbn_runtime.segmenter import Segmenter
from tbn_runtime.sources import Video
from tbn_runtime.stream import run_stream

SRC_H, SRC_W = 72, 104   # not the export size: the stream resizes in and out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    path = write_video(str(d / "clip.mp4"), synthetic_frames(12, SRC_H, SRC_W, seed=5))
    return path, decode(path)


def _masks(folder, n):
    return [read_label_png(os.path.join(folder, f"{i:08d}.png")) for i in range(n)]


def _leftovers(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp" in f]


def test_stream_ort_cli_equals_clip_inference(export_dir, video, tmp_path):
    path, frames = video
    ref = reference_labels(export_dir, frames, "clip")
    out = tmp_path / "masks"
    stats = tmp_path / "stats.json"
    r = tbn_run(path, "--out", str(out), "--model", export_dir, "--backend", "ort",
                "--device", "cpu", "--stats", str(stats), "--overlay", str(tmp_path / "ov.mp4"))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    got = _masks(out / "clip", len(frames))
    assert len(os.listdir(out / "clip")) == len(frames)
    for g, e in zip(got, ref):           # frame by frame, the first nine included
        assert g.shape == (SRC_H, SRC_W)
        assert (g == e).mean() >= 0.999
    assert os.path.isfile(tmp_path / "ov.mp4") and len(decode(str(tmp_path / "ov.mp4"))) == 12
    assert _leftovers(tmp_path) == []    # atomic writes: no temporary files left
    import json
    s = json.load(open(stats))
    assert s["frames"] == 12 and set(s["stages"]) == {"decode", "preprocess", "feature",
                                                       "temporal", "postprocess", "write"}
    assert s["peak_rss_mb"] > 0


def test_stream_torch_equals_clip_inference(export_dir, video, tmp_path):
    path, frames = video
    ref = reference_labels(export_dir, frames, "clip")
    man = load_manifest(export_dir)
    with Segmenter(backend=backend_class("torch")(export_dir, man, "cpu")) as seg:
        stats = run_stream(seg, path, str(tmp_path), progress=False)
    assert stats["frames"] == 12
    for g, e in zip(_masks(tmp_path / "clip", 12), ref):
        assert (g == e).mean() >= 0.999


def test_resume_gives_identical_result(export_dir, video, tmp_path):
    path, frames = video
    man = load_manifest(export_dir)
    out = str(tmp_path / "m")
    with Segmenter(backend=backend_class("ort")(export_dir, man, "cpu")) as seg:
        run_stream(seg, path, out, progress=False)
        first = _masks(os.path.join(out, "clip"), 12)
        for i in (4, 10, 11):
            os.remove(os.path.join(out, "clip", f"{i:08d}.png"))
        with open(os.path.join(out, "clip", "00000007.png"), "r+b") as f:   # a torn file
            f.truncate(40)
        stats = run_stream(seg, path, out, resume=True, progress=False)
    assert stats["frames_resumed"] == 8 and stats["frames_inferred"] == 4
    for a, c in zip(first, _masks(os.path.join(out, "clip"), 12)):
        np.testing.assert_array_equal(a, c)
    # the CLI refuses a folder with masks unless --overwrite or --resume
    r = tbn_run(path, "--out", out, "--model", export_dir, "--backend", "ort")
    assert r.returncode != 0 and "already holds labels" in r.stderr
    r = tbn_run(path, "--out", out, "--model", export_dir, "--backend", "ort", "--resume")
    assert r.returncode == 0, r.stderr
    assert "12 frames already done" in r.stdout
    assert _leftovers(out) == []


def test_vspw_frame_folder_names(export_dir, tmp_path):
    root = tmp_path / "vspw"
    for vid, seed in (("127_abc", 1), ("9_x", 2)):
        d = root / "data" / vid / "origin"
        d.mkdir(parents=True)
        for i, f in enumerate(synthetic_frames(3, 48, 64, seed)):
            cv2.imwrite(str(d / f"{i * 15:08d}.jpg"), f)
    out = tmp_path / "out"
    r = tbn_run(str(root), "--out", str(out), "--model", export_dir, "--backend", "ort")
    assert r.returncode == 0, r.stderr
    assert sorted(e for e in os.listdir(out) if not e.startswith(".")) == ["127_abc", "9_x"]
    assert sorted(os.listdir(out / "9_x")) == ["00000000.png", "00000015.png", "00000030.png"]
    assert read_label_png(out / "9_x" / "00000030.png").shape == (48, 64)


# -- memory on a long stream, with a fake backend -------------------------------------------
class FakeBackend(Backend):
    """The ring machinery with numpy slots and trivial engines: fast, counts live buffers."""
    name = "fake"

    @classmethod
    def available(cls, device="cpu"):
        return True, "test"

    def __init__(self, h, w):
        from tbn_runtime.manifest import Manifest
        man = Manifest(model="fake", num_classes=3, class_names=[], palette=[], height=h,
                       width=w, mean=[0, 0, 0], std=[1, 1, 1], feature_shape=[1, 1, h, w],
                       feature_dtype="float32", temporal_offsets=[3, 6, 9], precision="fp32")
        super().__init__("", man, "cpu")
        self._make_rings(lambda: np.zeros((h, w), np.float32))

    def _run_feature(self, frames, slots):
        for frame, slot in zip(frames, slots):
            slot[...] = frame[:, :, 0]

    def _run_temporal(self, current, past):
        return np.stack([(c + sum(p)).astype(np.uint8) % 124 for c, p in zip(current, past)])


def _long_stream(n, tmp_path):
    def frames():
        for i in range(n):
            yield f"{i:08d}", np.full((8, 12, 3), i % 256, np.uint8)
    videos = [Video("endless", "camera", "fake", 25.0, None, frames)]
    b = FakeBackend(8, 12)
    tracemalloc.start()
    stats = run_stream(Segmenter(backend=b), videos, str(tmp_path / f"m{n}"), progress=False,
                       queue_depth=8, max_pending_writes=16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return stats, peak


def test_memory_flat_on_long_stream(tmp_path):
    short, peak_short = _long_stream(300, tmp_path)
    long, peak_long = _long_stream(3000, tmp_path)
    assert long["frames"] == 3000
    assert len(os.listdir(tmp_path / "m3000" / "endless")) == 3000
    for s in (short, long):
        assert s["max_decode_queue"] <= 9        # bounded decode queue (depth 8, +1 in hand)
        assert s["max_pending_writes"] <= 16     # bounded writes in flight
    # ten times the frames, not ten times the memory: the peak does not grow with the length
    assert peak_long < peak_short * 1.5 + 256 * 1024, (peak_short, peak_long)
