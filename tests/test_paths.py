"""Names taken from user data never become paths outside their folder: split-list lines, folder
entries (symlinks), video and frame names used for outputs. One check (tbn_runtime.files.inside)
used by every reader and writer; a refusal names the entry and why, and nothing is read or
written outside."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from runtime_helpers import one_line_error, synthetic_frames, tbn_run
from tbn_runtime.files import UnsafePathError, inside
from tbn_runtime.outputs import MaskOutput
from tbn_runtime.sources import SourceError, open_source


@pytest.fixture
def root(tmp_path):
    """A VSPW-layout root with one good video (val_000) and a 'victim' folder beside it that a
    hostile split list aims at: frames to read, and a mask-named PNG that must survive."""
    vspw = tmp_path / "vspw"
    for name, frames in (("val_000", 3),):
        origin = vspw / "data" / name / "origin"
        origin.mkdir(parents=True)
        for i, f in enumerate(synthetic_frames(frames, 48, 64, seed=2)):
            cv2.imwrite(str(origin / f"{i:08d}.jpg"), f)
    victim = tmp_path / "victim"
    (victim / "origin").mkdir(parents=True)
    cv2.imwrite(str(victim / "origin" / "00000000.jpg"), synthetic_frames(1, 48, 64, seed=3)[0])
    (victim / "00000000.png").write_bytes(b"precious")
    return vspw


@pytest.mark.parametrize("name, why", [
    ("../x", "climbs out with '..'"),
    ("a/../../x", "climbs out with '..'"),
    ("..", "climbs out with '..'"),
    ("/etc", "is an absolute path"),
    ("", "is empty"),
    ("a\x00b", "NUL byte"),
])
def test_inside_refuses_names_that_leave_the_root(tmp_path, name, why):
    with pytest.raises(UnsafePathError, match="val.txt line 3") as e:
        inside(str(tmp_path), name, "val.txt line 3")
    assert why in str(e.value)


def test_inside_follows_symlinks_and_keeps_readable_paths(tmp_path):
    (tmp_path / "root" / "real").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "link_in").symlink_to(tmp_path / "root" / "real")
    (tmp_path / "root" / "link_out").symlink_to(tmp_path / "outside")
    root = str(tmp_path / "root")
    assert inside(root, "real", "x") == os.path.join(root, "real")
    assert inside(root, "link_in", "x") == os.path.join(root, "link_in")
    assert inside(root, "not_yet/made.png", "x") == os.path.join(root, "not_yet", "made.png")
    with pytest.raises(UnsafePathError, match="leads outside"):
        inside(root, "link_out", "x")
    with pytest.raises(UnsafePathError, match="leads outside"):
        inside(root, "link_out/f.png", "x")
    # a root that is itself a symlink is compared by its resolved path
    (tmp_path / "alias").symlink_to(tmp_path / "root")
    assert inside(str(tmp_path / "alias"), "real", "x") == str(tmp_path / "alias" / "real")


@pytest.mark.parametrize("line", ["../../victim", "ABS"])
def test_a_hostile_split_list_is_refused_and_nothing_is_written_outside(export_dir, root,
                                                                       tmp_path, line):
    victim = tmp_path / "victim"
    line = str(victim) if line == "ABS" else line
    (root / "val.txt").write_text(f"val_000\n{line}\n")
    out = tmp_path / "out"
    r = tbn_run(str(root / "val.txt"), "--out", str(out), "--model", export_dir,
                "--backend", "ort")
    assert r.returncode == 2, r.stderr
    one_line_error(r, "val.txt line 2", repr(line))
    assert (victim / "00000000.png").read_bytes() == b"precious"
    assert sorted(os.listdir(victim)) == ["00000000.png", "origin"]
    assert not out.exists() or not any(out.rglob("*.png"))


def test_a_symlinked_entry_leading_outside_is_refused(root, tmp_path):
    (root / "data" / "val_001").symlink_to(tmp_path / "victim", target_is_directory=True)
    with pytest.raises(SourceError, match="val_001.*leads outside"):
        open_source(str(root))
    (root / "val.txt").write_text("val_000\nval_001\n")
    with pytest.raises(SourceError, match="line 2.*leads outside"):
        open_source(str(root / "val.txt"))


def test_a_symlinked_image_leading_outside_is_refused(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "secret.png").write_bytes(b"x")
    (folder / "b.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(SourceError, match="'b.png' leads outside"):
        open_source(str(folder))


def test_a_dangling_link_is_refused_naming_its_target(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (folder / "b.png").symlink_to(folder / "moved-away.png")
    with pytest.raises(UnsafePathError, match="moved-away.png.*does not exist"):
        inside(str(folder), "b.png", "x")
    with pytest.raises(SourceError, match="'b.png' is a symbolic link to .*moved-away.png"):
        open_source(str(folder))


def test_the_training_reader_refuses_a_hostile_split_list(root):
    from tbn_train.data.vspw import index_split
    from tbn_train.errors import DatasetError

    (root / "val.txt").write_text("val_000\n../../victim\n")
    with pytest.raises(DatasetError, match="val.txt line 2.*climbs out"):
        index_split(root, "val", with_masks=False)
    (root / "val.txt").write_bytes(b"val_000\n\xff\xfe\n")
    with pytest.raises(DatasetError, match="val.txt: cannot read the split list"):
        index_split(root, "val", with_masks=False)


@pytest.mark.parametrize("fmt", ["png", "npy", "coco-rle"])
def test_outputs_refuse_video_names_that_leave_out_dir(tmp_path, fmt):
    out = MaskOutput(str(tmp_path / "out"), fmt)
    assert out.path("v", "00000000").startswith(str(tmp_path / "out") + os.sep)
    with pytest.raises(UnsafePathError):
        out.path("../v", "00000000")
    with pytest.raises(UnsafePathError):
        out.begin_video("/tmp/v" if fmt != "coco-rle" else "../v")
