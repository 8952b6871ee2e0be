"""What tbn-run's --overwrite replaces (only the labels tbn-run wrote there, all of them) and
which export tbn-run takes without --model (the one tbn-export made or confirmed last)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from runtime_helpers import one_line_error, synthetic_frames, tbn_run, write_video
from tbn_runtime.outputs import RUN_MARKER
from tbn_runtime.segmenter import EXPORTED_STAMP


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    d = tmp_path_factory.mktemp("overwrite")
    return write_video(str(d / "cam.mp4"), synthetic_frames(6, 48, 64, seed=5))


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs if not f.startswith("."))


# (flags of the first run, flags of the --overwrite rerun, what the folder holds after)
@pytest.mark.parametrize("first, again, after", [
    # a longer earlier run: its frames beyond the rerun's are gone, not scored stale
    ([], ["--max-frames", "2"], ["cam/00000000.png", "cam/00000001.png"]),
    # another format: the earlier format's files are gone
    ([], ["--format", "npy", "--max-frames", "1"], ["cam/00000000.npy"]),
    (["--format", "coco-rle"], ["--max-frames", "1"], ["cam/00000000.png"]),
])
def test_overwrite_leaves_no_stale_labels(export_dir, video, tmp_path, first, again, after):
    out = tmp_path / "o"
    r = tbn_run(video, "--out", str(out), "--model", export_dir, *first)
    assert r.returncode == 0, r.stderr
    (out / "cam" / "notes.txt").parent.mkdir(exist_ok=True)
    (out / "cam" / "notes.txt").write_text("mine")   # not a label: kept
    (out / "readme.png").write_bytes(b"mine")        # not in a video's folder: kept
    r = tbn_run(video, "--out", str(out), "--model", export_dir, "--overwrite", *again)
    assert r.returncode == 0, r.stderr
    assert _files(out) == sorted(after + ["cam/notes.txt", "readme.png"])


def test_overwrite_refuses_labels_tbn_run_did_not_write(export_dir, video, tmp_path):
    out = tmp_path / "o"
    (out / "cam").mkdir(parents=True)
    (out / "cam" / "00000099.png").write_bytes(b"someone's mask")
    line = one_line_error(tbn_run(video, "--out", str(out), "--model", export_dir,
                                   "--overwrite"), "did not write", RUN_MARKER, "another --out")
    assert str(out) in line
    assert _files(out) == ["cam/00000099.png"]
    assert (out / "cam" / "00000099.png").read_bytes() == b"someone's mask"


def test_overwrite_replaces_these_videos_only(export_dir, video, tmp_path):
    """Other videos' labels in the folder stay (a corpus labelled a video at a time); labels
    of this run's video that the marker does not record are refused, and nothing removed."""
    other = write_video(str(tmp_path / "other.mp4"), synthetic_frames(3, 48, 64, seed=7))
    out = tmp_path / "o"
    for src in (video, other):
        r = tbn_run(src, "--out", str(out), "--model", export_dir, "--resume")
        assert r.returncode == 0, r.stderr
    assert json.loads((out / RUN_MARKER).read_text())["videos"] == ["cam", "other"]
    r = tbn_run(video, "--out", str(out), "--model", export_dir, "--overwrite",
                "--max-frames", "2")
    assert r.returncode == 0, r.stderr
    assert _files(out) == ["cam/00000000.png", "cam/00000001.png", "other/00000000.png",
                           "other/00000001.png", "other/00000002.png"]

    stray = write_video(str(tmp_path / "stray.mp4"), synthetic_frames(2, 48, 64, seed=8))
    (out / "stray").mkdir()
    (out / "stray" / "00000000.png").write_bytes(b"not tbn-run's")
    before = _files(out)
    one_line_error(tbn_run(stray, "--out", str(out), "--model", export_dir, "--overwrite"),
                   "stray", "did not write", "another --out")
    assert _files(out) == before
    assert (out / "stray" / "00000000.png").read_bytes() == b"not tbn-run's"


def test_without_model_the_export_made_last_runs_and_the_first_line_says_so(
        export_dir, video, tmp_path):
    runs = tmp_path / "runs" / "tbn"
    for name, when in (("export", 2000.0), ("export-fp16", 1000.0)):
        shutil.copytree(export_dir, runs / name)
        (runs / name / EXPORTED_STAMP).write_text(json.dumps({"exported_at": when}))
    # the fp16 one was confirmed up to date last, though its manifest is not the newest
    os.utime(runs / "export" / "manifest.json", (3000, 3000))
    (runs / "export-fp16" / EXPORTED_STAMP).write_text(json.dumps({"exported_at": 4000.0}))
    r = tbn_run(video, "--out", "o", cwd=str(tmp_path))  # --backend auto
    assert r.returncode == 0, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("tbn-run: model runs/tbn/export-fp16: ") and "last" in first, first
    assert "pip install" not in r.stderr  # no install hints for what was not asked for
