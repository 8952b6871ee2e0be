"""tbn-run and the export manifest against bad input and faults: each gets one line naming the
problem (and its fix), a non-zero exit code, no traceback, and nothing written is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from runtime_helpers import (NO_TORCH, dead_pid, one_line_error, synthetic_frames, tbn_run,
                             write_video)
from tbn_runtime.files import FolderLock
from tbn_runtime.masks import read_label_png


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    return write_video(str(d / "cam.mp4"), synthetic_frames(6, 48, 64, seed=4))


# -- the manifest is validated at load -------------------------------------------------------------
def _set(field, value):
    def edit(m):
        m[field] = value
    return edit


def _files(m):
    m["files"]["../elsewhere.onnx"] = dict(m["files"]["feature.onnx"])


def _palette(m):
    m["palette"] = m["palette"][:10]


@pytest.mark.parametrize("edit, needle", [
    (_set("height", -5), "field 'height'"),
    (_set("width", "wide"), "field 'width'"),
    (_set("feature_dtype", "float64"), "field 'feature_dtype'"),
    (_set("temporal_offsets", [3, 6, 900]), "field 'temporal_offsets'"),
    (_set("ring_size", 4), "field 'ring_size'"),
    (_set("num_classes", 300), "field 'num_classes'"),
    (_palette, "field 'palette' has 10 colours for num_classes 124"),
    (_set("past_inputs", ["past_3"]), "field 'past_inputs'"),
    (_set("precision", "int4"), "field 'precision'"),
    (_set("std", [58.4, 0, 57.4]), "field 'std'"),
    (_files, "plain names"),
    (_set("verified", {"openvino": {"passed": "no"}}), "field 'verified'"),
    # valid values, but not the graphs': the content hash binds them to what was exported
    (lambda m: m.update(temporal_offsets=[1, 2, 3], ring_size=4), "changed after export"),
    (_set("height", 128), "changed after export"),
    (_set("max_batch", 4), "changed after export"),
    # a check recorded as failed cannot be edited into a pass (the backend would run it)
    (_set("verified", {"openvino": {"passed": True}}), "changed after export"),
    (lambda m: m.pop("content_sha256"), "carries no content hash"),
])
def test_a_bad_manifest_is_one_line_naming_the_field(export_dir, video, tmp_path, edit, needle):
    bad = tmp_path / "export"
    shutil.copytree(export_dir, bad)
    data = json.loads((bad / "manifest.json").read_text())
    edit(data)
    (bad / "manifest.json").write_text(json.dumps(data))
    line = one_line_error(tbn_run(video, "--out", str(tmp_path / "o"), "--model", str(bad)),
                           needle, "export again")
    assert "manifest.json" in line
    assert not (tmp_path / "o").exists()  # nothing written, not even an empty folder


# -- outputs checked before the first frame --------------------------------------------------------
def test_outputs_are_checked_before_the_first_frame(export_dir, video, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    out = tmp_path / "o"
    # an overlay under a file: the reason is the path, not a missing codec
    line = one_line_error(tbn_run(video, "--out", str(out), "--model", export_dir,
                                   "--overlay", str(blocker / "ov.mp4")), "overlay")
    assert "codec" not in line and "encoder" not in line
    one_line_error(tbn_run(video, "--out", str(out), "--model", export_dir,
                            "--overlay", str(tmp_path / "ov.gif")), ".mp4")
    one_line_error(tbn_run(video, "--out", str(out), "--model", export_dir,
                            "--stats", str(blocker / "s.json")), "--stats", "cannot write")
    assert not out.exists()  # refused before any mask
    one_line_error(tbn_run(video, "--out", str(blocker), "--model", export_dir),
                    "not a folder")
    one_line_error(tbn_run(video, "--out", str(out), "--model", export_dir, "--max-frames",
                            "0"), "--max-frames")


# -- one run per output folder ---------------------------------------------------------------------
def test_a_second_run_into_the_same_folder_is_refused(export_dir, video, tmp_path):
    out = tmp_path / "o"
    with FolderLock(str(out), "tbn-run other.mp4 --out o"):
        line = one_line_error(tbn_run(video, "--out", str(out), "--model", export_dir),
                               "in use by", f"pid {os.getpid()}", "other.mp4")
        assert "choose another output folder" in line
    # released (or its holder dead): the next run takes the folder
    r = tbn_run(video, "--out", str(out), "--model", export_dir)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(out / FolderLock.NAME)


def test_a_lock_left_by_a_killed_run_is_taken_over(export_dir, video, tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from tbn_runtime.files import FolderLock\n"
        f"FolderLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line_error(tbn_run(video, "--out", str(out), "--model", export_dir), "in use by")
        holder.kill()  # SIGKILL: no clean-up, the lock file stays behind
        holder.wait()
        assert os.path.exists(out / FolderLock.NAME)
        r = tbn_run(video, "--out", str(out), "--model", export_dir)
        assert r.returncode == 0, r.stderr
    finally:
        if holder.poll() is None:
            holder.kill()


def test_temporaries_of_killed_runs_are_swept_and_live_ones_kept(export_dir, video, tmp_path):
    out = tmp_path / "o"
    (out / "cam").mkdir(parents=True)
    dead = out / "cam" / f".tbn-00000003.png.tmp-{dead_pid()}-0123abcd"
    dead.write_bytes(b"half a png")
    live = out / "cam" / f".tbn-00000004.png.tmp-{os.getpid()}-0123abcd"  # this process lives
    live.write_bytes(b"being written")
    ovl = tmp_path / f".tbn-ov.mp4.tmp-{dead_pid()}-0123abcd.mp4"
    ovl.write_bytes(b"half a video")
    r = tbn_run(video, "--out", str(out), "--model", export_dir, "--overlay",
                str(tmp_path / "ov.mp4"))
    assert r.returncode == 0, r.stderr
    assert not dead.exists() and not ovl.exists() and live.exists()
    assert "left by a run that was killed" in r.stderr


# -- SIGTERM stops cleanly; --resume finishes identically ------------------------------------------
def test_sigterm_stops_cleanly_and_resume_finishes_identically(export_dir, tmp_path):
    long = write_video(str(tmp_path / "long.mp4"), synthetic_frames(150, 48, 64, seed=9))
    full = tmp_path / "full"
    r = tbn_run(long, "--out", str(full), "--model", export_dir, "--backend", "ort")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "cut"
    cmd = [sys.executable, "-c", NO_TORCH, "--no-progress", long, "--out", str(out), "--model",
           export_dir, "--backend", "ort", "--overlay", str(tmp_path / "ov.mp4")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            done = os.listdir(out / "long") if (out / "long").is_dir() else []
            if len([f for f in done if f.endswith(".png")]) >= 5:
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert "Traceback" not in err and "stopped (SIGTERM)" in err
    names = sorted(os.listdir(out / "long"))
    assert 5 <= len(names) < 150 and all(n.endswith(".png") for n in names)  # no temporaries
    assert not (tmp_path / "ov.mp4").exists()  # the overlay of a stopped run is not kept
    assert [f for f in os.listdir(tmp_path) if ".tmp-" in f] == []
    for n in names:  # what was written is whole
        assert read_label_png(out / "long" / n).shape == (48, 64)
    r = tbn_run(long, "--out", str(out), "--model", export_dir, "--backend", "ort", "--resume")
    assert r.returncode == 0, r.stderr
    for i in range(150):
        name = f"{i:08d}.png"
        assert np.array_equal(read_label_png(out / "long" / name),
                              read_label_png(full / "long" / name)), name


# -- a full disk is said as such, naming the file, and nothing half-written is kept --------------
# RLIMIT_FSIZE makes every write past the limit short (EFBIG), as a full disk does: a real
# short write through numpy, Pillow and OpenCV's encoder, without root or a tmpfs.
@pytest.mark.parametrize("flags, limit, needles", [
    (["--format", "npy"], 2048, ("00000000.npy", "the disk is full")),
    (["--overlay", "OV"], 4000, ("ov.mp4", "not written whole", "disk full")),
])
def test_a_full_disk_is_named_and_leaves_nothing_half_written(export_dir, tmp_path, flags,
                                                              limit, needles):
    big = write_video(str(tmp_path / "big.mp4"), synthetic_frames(8, 96, 128, seed=6))
    out = tmp_path / "o"
    flags = [str(tmp_path / "ov.mp4") if f == "OV" else f for f in flags]
    line = one_line_error(tbn_run(big, "--out", str(out), "--model", export_dir, "--backend",
                                   "ort", *flags, fsize=limit), *needles)
    assert "requested and" not in line or "disk is full" in line
    assert not (tmp_path / "ov.mp4").exists()
    left = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert not [f for f in left if ".tmp-" in f], left  # no temporary left
    for f in left:
        if f.endswith(".npy"):
            assert np.load(f).shape == (96, 128)  # what was written is whole
