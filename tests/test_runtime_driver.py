"""The one stream driver (tbn_runtime.driver) and its failure rule: a video that cannot be read
or breaks off is reported with its reason, the others go on, and the run exits 1 -- with one
stream, with --streams, and (tests/test_cluster.py) in a Ray chunk."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from runtime_helpers import decode, synthetic_frames, tbn_run, write_video
from tbn_runtime.decoder import Done, Failed, Frame, ReadAhead, VideoEnd, VideoStart
from tbn_runtime.driver import Job, drive
from tbn_runtime.masks import read_label_png
from tbn_runtime.outputs import MaskOutput
from tbn_runtime.segmenter import Segmenter
from tbn_runtime.sources import SourceError, Video, open_source

H, W = 48, 64


def _names(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _truncated(path, frames=30):
    full = write_video(path + ".full.avi", synthetic_frames(frames, H, W, seed=7),
                       fourcc="MJPG")
    data = open(full, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * 0.6)])
    os.remove(full)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """a.mp4 (8 frames), b.avi (truncated), c.mp4 (6 frames): the bad one in the middle."""
    d = tmp_path_factory.mktemp("folder")
    write_video(str(d / "a.mp4"), synthetic_frames(8, H, W, seed=1))
    _truncated(str(d / "b.avi"))
    write_video(str(d / "c.mp4"), synthetic_frames(6, H, W, seed=3))
    return d


@pytest.mark.parametrize("streams", ["1", "2"])
def test_a_truncated_video_among_good_ones_stops_only_itself(export_dir, folder, tmp_path,
                                                             streams):
    out = tmp_path / "o"
    r = tbn_run(str(folder), "--out", str(out), "--model", export_dir, "--backend", "ort",
                "--streams", streams)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("tbn-run: error:")]
    assert len(errors) == 1 and "b.avi" in errors[0] and "truncated" in errors[0], r.stderr
    assert "1 failed" in r.stdout
    # the videos before and after the bad one are complete, and equal a run of each alone
    for name, n in (("a", 8), ("c", 6)):
        assert _names(out / name) == [f"{i:08d}.png" for i in range(n)], name
        alone = tmp_path / f"alone-{name}"
        assert tbn_run(str(folder / f"{name}.mp4"), "--out", str(alone), "--model", export_dir,
                       "--backend", "ort").returncode == 0
        for f in _names(out / name):
            assert np.array_equal(read_label_png(out / name / f),
                                  read_label_png(alone / name / f)), (name, f)
    # the bad video keeps the masks of the frames it had before it broke off
    cut = int(errors[0].split("breaks off at frame ")[1].split()[0])
    assert 0 < cut < 30 and _names(out / "b") == [f"{i:08d}.png" for i in range(cut)]


def test_an_unreadable_image_ends_its_frame_folder_and_the_others_go_on(export_dir, tmp_path):
    """An image folder is one video: an unreadable image ends it there (its masks before the
    image kept; the frames after it would lose their past), the other videos go on, exit 1."""
    root = tmp_path / "vspw"
    for vid, seed in (("v1", 1), ("v2", 2), ("v3", 3)):
        d = root / "data" / vid / "origin"
        d.mkdir(parents=True)
        for i, f in enumerate(synthetic_frames(5, H, W, seed)):
            cv2.imwrite(str(d / f"{i:08d}.jpg"), f)
    (root / "data" / "v2" / "origin" / "00000002.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "o"
    r = tbn_run(str(root), "--out", str(out), "--model", export_dir, "--backend", "ort")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "00000002.jpg: cannot read the image" in r.stderr
    assert _names(out / "v1") == _names(out / "v3") == [f"{i:08d}.png" for i in range(5)]
    assert _names(out / "v2") == ["00000000.png", "00000001.png"]
    assert "12 frames of 3 videos" in r.stdout
    # --resume after the image is replaced finishes the folder
    cv2.imwrite(str(root / "data" / "v2" / "origin" / "00000002.jpg"),
                synthetic_frames(1, H, W, seed=9)[0])
    r = tbn_run(str(root), "--out", str(out), "--model", export_dir, "--backend", "ort",
                "--resume")
    assert r.returncode == 0, r.stderr
    assert _names(out / "v2") == [f"{i:08d}.png" for i in range(5)]


def test_the_overlay_keeps_the_frame_rate_of_a_video_in_a_folder(export_dir, tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    write_video(str(src / "thirty.mp4"), synthetic_frames(6, H, W, seed=2), fps=30.0)
    assert open_source(str(src))[0].fps == pytest.approx(30.0)
    assert open_source(str(src))[0].count == 6
    ov = tmp_path / "ov.mp4"
    r = tbn_run(str(src), "--out", str(tmp_path / "o"), "--model", export_dir, "--backend",
                "ort", "--overlay", str(ov))
    assert r.returncode == 0, r.stderr
    assert open_source(str(ov))[0].fps == pytest.approx(30.0, abs=0.01)
    assert len(decode(str(ov))) == 6


def _video(name, n, fail_at=None):
    def frames():
        for i in range(n):
            if i == fail_at:
                raise SourceError(f"{name}: broke at frame {i}")
            yield f"{i:08d}", np.full((H, W, 3), (17 * i) % 256, np.uint8)
    return Video(name, "file", name, 25.0, n, frames)


def test_the_decoder_speaks_in_typed_events():
    reader = ReadAhead([_video("x", 2), _video("y", 3, fail_at=1)], depth=2)
    events = list(reader)
    reader.close()
    assert [type(e) for e in events] == [VideoStart, Frame, Frame, VideoEnd, VideoStart, Frame,
                                         Failed]
    assert events[1].video.name == "x" and events[1].name == "00000000"
    assert events[-1].video.name == "y" and "broke at frame 1" in str(events[-1].error)
    reader = ReadAhead([_video("x", 4)], max_frames=3)
    assert [type(e) for e in reader] == [VideoStart, Frame, Frame, Frame, VideoEnd, Done]
    reader.close()


@pytest.mark.parametrize("streams", [1, 3])
def test_drive_reports_a_failing_video_and_owns_its_counts(export_dir, tmp_path, streams):
    videos = [_video("a", 5), _video("b", 6, fail_at=3), _video("c", 4)]
    with Segmenter(export_dir, backend="ort", device="cpu", streams=streams) as seg:
        timings = dict(seg.timings)
        seen = []
        result = drive(seg, [Job(v) for v in videos], MaskOutput(str(tmp_path), "png"),
                       on_frame=lambda job, i, frame, labels: seen.append((job.video.name, i)))
        assert seg.timings["decode"] == timings["decode"]   # the driver keeps its own
    assert result.failed == {"b": "b: broke at frame 3"}
    assert result.per_video == {"a": 5, "b": 3, "c": 4}
    assert result.frames == result.inferred == 12 and result.pushed == 0
    assert result.decode_s > 0 and result.max_decode_queue <= 8
    assert sorted(seen) == sorted([("a", i) for i in range(5)] + [("b", i) for i in range(3)]
                                  + [("c", i) for i in range(4)])
    assert _names(tmp_path / "b") == ["00000000.png", "00000001.png", "00000002.png"]
    assert len(_names(tmp_path / "c")) == 4


def test_drive_pushes_a_lead_and_numbers_frames_from_first(export_dir, tmp_path):
    """A chunk's job: its lead frames go to the feature engine only, indices count from
    `first`, and the labels after the lead equal those of the whole video."""
    with Segmenter(export_dir, backend="ort", device="cpu") as seg:
        whole = drive(seg, [Job(_video("v", 8))], MaskOutput(str(tmp_path / "whole"), "png"))
        seen = []
        part = drive(seg, [Job(_video("v", 8), first=10, lead=3, frames=6)],
                     MaskOutput(str(tmp_path / "part"), "png"),
                     on_frame=lambda job, i, frame, labels: seen.append((i, labels is None)))
    assert whole.frames == 8 and part.frames == 6
    assert part.pushed == 3 and part.inferred == 3
    assert seen == [(10, True), (11, True), (12, True), (13, False), (14, False), (15, False)]
    assert _names(tmp_path / "part" / "v") == ["00000003.png", "00000004.png", "00000005.png"]
    for f in _names(tmp_path / "part" / "v"):
        assert np.array_equal(read_label_png(tmp_path / "part" / "v" / f),
                              read_label_png(tmp_path / "whole" / "v" / f))
