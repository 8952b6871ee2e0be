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


def test_the_marker_names_the_videos_and_stays_inside(export_dir, video, tmp_path):
    """A tampered marker naming folders outside --out removes nothing there."""
    out, victim = tmp_path / "o", tmp_path / "victim"
    victim.mkdir()
    (victim / "00000000.png").write_bytes(b"precious")
    r = tbn_run(video, "--out", str(out), "--model", export_dir)
    assert r.returncode == 0, r.stderr
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["videos"] == ["cam"] and marker["written_by"] == "tbn-run"
    marker["videos"] += ["../victim", str(victim)]
    (out / RUN_MARKER).write_text(json.dumps(marker))
    r = tbn_run(video, "--out", str(out), "--model", export_dir, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (victim / "00000000.png").read_bytes() == b"precious"


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
