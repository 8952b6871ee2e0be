"""Many streams on one device: batched engine calls and per-stream rings give every stream the
labels it gets alone; lanes take the next video when one ends; a failing video stops only
itself."""

from __future__ import annotations

import os

import numpy as np
import pytest

from runtime_helpers import (EXPORT_H, EXPORT_W, synthetic_frames, tbn_run,
                             write_video)
from tbn_runtime.backends import backend_class
from tbn_runtime.manifest import load_manifest
from tbn_runtime.masks import read_label_png


@pytest.mark.parametrize("name", ["ort", "torch"])
def test_batched_streams_equal_each_stream_alone(export_dir, name):
    man = load_manifest(export_dir)
    videos = [synthetic_frames(n, EXPORT_H, EXPORT_W, seed=30 + n) for n in (13, 11, 6)]
    cls = backend_class(name)
    with cls(export_dir, man, "cpu") as one:
        alone = []
        for frames in videos:
            one.reset()
            alone.append([one.infer(f) for f in frames])
    with cls(export_dir, man, "cpu", streams=3) as many:
        assert many.batch_limit == 3 and len(many.rings) == 3
        got = [[] for _ in videos]
        # staggered: stream 2 starts late, then pushes (features only) on one of its frames
        for t in range(15):
            frames, streams, want = [], [], []
            for s, v in enumerate(videos):
                i = t - (4 if s == 2 else 0)
                if 0 <= i < len(v):
                    frames.append(v[i])
                    streams.append(s)
                    want.append(not (s == 2 and i == 1))
            for s, lab in zip(streams, many.step(frames, streams, want)):
                got[s].append(lab)
    for s in range(3):
        for i, (a, b) in enumerate(zip(got[s], alone[s])):
            if s == 2 and i == 1:
                assert a is None  # pushed, not classified
                continue
            assert np.array_equal(a, b), (name, s, i)


def test_tbn_run_streams_equal_single_runs_and_a_bad_video_stops_only_itself(export_dir,
                                                                            tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    lengths = {"a": 14, "b": 5, "c": 9, "d": 12}
    for k, n in lengths.items():
        write_video(str(src / f"{k}.mp4"), synthetic_frames(n, 48, 64, seed=ord(k)))
    (src / "e.mp4").write_text("not a video")
    r = tbn_run(str(src), "--out", str(tmp_path / "many"), "--model", export_dir,
                "--backend", "ort", "--streams", "2")
    assert r.returncode == 1, r.stderr          # one video failed: reported, not hidden
    assert "e.mp4" in r.stderr and "Traceback" not in r.stderr
    assert "1 failed" in r.stdout
    for k, n in lengths.items():
        single = tmp_path / f"one-{k}"
        assert tbn_run(str(src / f"{k}.mp4"), "--out", str(single), "--model", export_dir,
                       "--backend", "ort").returncode == 0
        names = sorted(os.listdir(tmp_path / "many" / k))
        assert names == [f"{i:08d}.png" for i in range(n)]
        for name in names:
            assert np.array_equal(read_label_png(tmp_path / "many" / k / name),
                                  read_label_png(single / k / name)), (k, name)
    # --overlay needs one stream; two sources with one video name would mix their labels
    r = tbn_run(str(src / "a.mp4"), "--out", str(tmp_path / "x"), "--model", export_dir,
                "--streams", "2", "--overlay", str(tmp_path / "o.mp4"))
    assert r.returncode == 2 and "--streams 1" in r.stderr
    other = tmp_path / "other"
    other.mkdir()
    write_video(str(other / "a.mp4"), synthetic_frames(3, 48, 64, seed=1))
    r = tbn_run(str(src / "a.mp4"), str(other / "a.mp4"), "--out", str(tmp_path / "y"),
                "--model", export_dir)
    assert r.returncode == 2 and "two videos are named a" in r.stderr
