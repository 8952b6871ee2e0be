"""tbn-run's command line: every user mistake is one line and a non-zero exit, no traceback;
the package and --help work with torch absent."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from runtime_helpers import one_line_error, synthetic_frames, tbn_run, write_video


@pytest.fixture(scope="module")
def good_video(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return write_video(str(d / "good.mp4"), synthetic_frames(4, 48, 64))


def test_import_and_help_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['tbn_train'] = None\n"
            "import tbn_runtime, tbn_runtime.cli, tbn_runtime.stream, tbn_runtime.sources\n"
            "import tbn_runtime.backends, tbn_runtime.backends.ort, tbn_runtime.backends.trt\n"
            "bad = [m for m in ('tensorrt', 'cuda', 'cuda.bindings') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = tbn_run("--help")
    assert r.returncode == 0 and "SOURCE" in r.stdout and "--resume" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tbn_runtime", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "usage: tbn-run" in r.stdout


def test_missing_file(export_dir, tmp_path):
    one_line_error(tbn_run(str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "o"),
                            "--model", export_dir), "no such file")


def test_not_a_video(export_dir, tmp_path):
    p = tmp_path / "notes.mp4"
    p.write_text("this is text, not a video\n")
    one_line_error(tbn_run(str(p), "--out", str(tmp_path / "o"), "--model", export_dir),
                    "not a video")


def test_empty_videos(export_dir, tmp_path):
    p = tmp_path / "zero.mp4"
    p.write_bytes(b"")
    one_line_error(tbn_run(str(p), "--out", str(tmp_path / "o"), "--model", export_dir),
                    "empty")
    q = str(tmp_path / "noframes.mp4")        # a container with no frames in it
    cv2.VideoWriter(q, cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48)).release()
    one_line_error(tbn_run(q, "--out", str(tmp_path / "o2"), "--model", export_dir))
    d = tmp_path / "emptydir"
    d.mkdir()
    one_line_error(tbn_run(str(d), "--out", str(tmp_path / "o3"), "--model", export_dir),
                    "holds no videos")


def test_truncated_video_keeps_what_was_written(export_dir, tmp_path):
    full = write_video(str(tmp_path / "full.avi"), synthetic_frames(30, 48, 64), fourcc="MJPG")
    data = open(full, "rb").read()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:int(len(data) * 0.6)])
    out = tmp_path / "o"
    r = tbn_run(str(cut), "--out", str(out), "--model", export_dir)
    assert r.returncode == 1, r.stderr   # work was done, then it failed: not a usage error (2)
    line = one_line_error(r, "breaks off at frame", "truncated")
    n = int(line.split("breaks off at frame ")[1].split()[0])
    assert 0 < n < 30
    assert sorted(os.listdir(out / "cut")) == [f"{i:08d}.png" for i in range(n)]


def test_camera_that_does_not_open(export_dir, tmp_path):
    one_line_error(tbn_run("57", "--out", str(tmp_path / "o"), "--model", export_dir),
                    "camera 57 does not open")


def test_manifest_missing_and_newer(good_video, export_dir, tmp_path):
    one_line_error(tbn_run(good_video, "--out", str(tmp_path / "o"), "--model",
                            str(tmp_path)), "manifest.json")
    newer = tmp_path / "newer"
    shutil.copytree(export_dir, newer)
    data = json.load(open(newer / "manifest.json"))
    data["format_version"] = 99
    json.dump(data, open(newer / "manifest.json", "w"))
    one_line_error(tbn_run(good_video, "--out", str(tmp_path / "o"), "--model", str(newer)),
                    "newer")


def test_onnx_sha256_mismatch(good_video, export_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    with open(bad / "feature.onnx", "r+b") as f:
        f.truncate(1000)
    one_line_error(tbn_run(good_video, "--out", str(tmp_path / "o"), "--model", str(bad),
                            "--backend", "ort"), "sha256")


def test_backend_not_installed(good_video, export_dir, tmp_path):
    one_line_error(tbn_run(good_video, "--out", str(tmp_path / "o"), "--model", export_dir,
                            "--backend", "torch"), "tbn-vit[train]")
    one_line_error(tbn_run(good_video, "--out", str(tmp_path / "o"), "--model", export_dir,
                            "--backend", "trt"), "--engine-only")


def test_output_folder_with_masks_refused(good_video, export_dir, tmp_path):
    out = tmp_path / "o"
    r = tbn_run(good_video, "--out", str(out), "--model", export_dir, "--max-frames", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out / "good")) == ["00000000.png", "00000001.png"]
    one_line_error(tbn_run(good_video, "--out", str(out), "--model", export_dir),
                    "already holds labels", "--overwrite")
    r = tbn_run(good_video, "--out", str(out), "--model", export_dir, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(out / "good")) == 4


def _duplicate_frames(d):
    (d / "frames").mkdir()
    cv2.imwrite(str(d / "frames" / "f.png"), np.zeros((48, 64, 3), np.uint8))
    cv2.imwrite(str(d / "frames" / "f.jpg"), np.zeros((48, 64, 3), np.uint8))
    return d / "frames"


def _link_loop(d):
    os.symlink(d / "b", d / "a")
    os.symlink(d / "a", d / "b")
    return d / "a"


def _dangling_link(d):
    os.symlink(d / "gone.mp4", d / "v.mp4")
    return d / "v.mp4"


@pytest.mark.parametrize("make, needles", [
    (_duplicate_frames, ("f.jpg and f.png are both frame 'f'", "rename one")),
    (_link_loop, ("symbolic link", "Too many levels", "point it at")),
    (_dangling_link, ("symbolic link", "No such file", "point it at")),
])
def test_sources_refused_up_front(export_dir, tmp_path, make, needles):
    source = make(tmp_path)
    out = tmp_path / "o"
    one_line_error(tbn_run(str(source), "--out", str(out), "--model", export_dir), *needles)
    assert not out.exists()  # refused before any label
