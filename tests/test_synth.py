"""tbn-synth (tbn_train.data.synth): layout, label encoding, determinism, videos, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from tbn_runtime.classes import NUM_CLASSES, VSPW_CLASSES
from tbn_runtime.masks import read_label_png
from tbn_train.data.synth import degradation_schedule, generate, main
from tbn_train.data.vspw import index_split

SMALL = dict(height=64, width=96, videos_train=2, videos_val=1, videos_test=1, frames=18)


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(pattern))}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate(out, seed=5, **SMALL)  # type: ignore[arg-type]
    return out


def test_layout_and_label_encoding(tree: Path) -> None:
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        videos = index_split(tree, split)
        assert len(videos) == n
        assert all(len(v) == 18 for v in videos)
    assert not tree.with_name("a.tmp").exists()
    values: set[int] = set()
    for png in tree.rglob("mask/*.png"):
        raw = read_label_png(png)
        assert raw.shape == (64, 96)
        values |= set(np.unique(raw).tolist())
    assert {0, 255} <= values
    classes = values - {0, 255}
    assert classes and all(1 <= v <= NUM_CLASSES for v in classes)
    meta = json.loads((tree / "synth.json").read_text())
    assert all(VSPW_CLASSES[int(r) - 1] == name for r, name in meta["raw_ids"].items())
    assert classes <= {int(r) for r in meta["raw_ids"]}
    frame = cv2.imread(str(next(tree.rglob("origin/*.jpg"))))
    assert frame.shape == (64, 96, 3)


def test_deterministic(tree: Path, tmp_path: Path) -> None:
    generate(tmp_path / "b", seed=5, **SMALL)  # type: ignore[arg-type]
    for pattern in ("*.png", "*.jpg", "*.txt"):
        a, b = _files(tree, pattern), _files(tmp_path / "b", pattern)
        assert a and a == b, pattern
    generate(tmp_path / "c", seed=6, **SMALL)  # type: ignore[arg-type]
    assert _files(tree, "*.png") != _files(tmp_path / "c", "*.png")


def test_mp4_per_val_and_test_video(tree: Path) -> None:
    assert sorted(p.name for p in (tree / "videos").iterdir()) == ["test_000.mp4", "val_000.mp4"]
    from tbn_runtime.sources import open_source

    for mp4 in (tree / "videos").iterdir():
        frames = [frame for _, frame in open_source(str(mp4))[0].frames()]
        assert len(frames) == 18 and all(f.shape == (64, 96, 3) for f in frames)


def test_degraded_frames_have_clean_past() -> None:
    for seed in range(20):
        sched = degradation_schedule(np.random.default_rng(seed), 60)
        bad = [t for t, kind in enumerate(sched) if kind is not None]
        assert bad and len(bad) < 30
        assert all(t >= 4 for t in bad)
        assert all(sched[t - 3] is None for t in bad)  # stretches are at most 3 frames long
        # and at least 6 clean frames apart
        starts = [t for t in bad if sched[t - 1] is None]
        assert all(b - a >= 7 for a, b in zip(starts, starts[1:]))


ARGS = ["--height", "32", "--width", "48", "--frames", "3", "--videos-train", "1",
        "--videos-val", "1", "--videos-test", "0"]


def _notes(out: Path) -> None:
    out.mkdir()
    (out / "keep.txt").write_text("mine")


def _dataset_and_notes(out: Path) -> None:
    assert main(["--out", str(out), *ARGS]) == 0
    (out / "keep.txt").write_text("mine")


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
@pytest.mark.parametrize("make", [_notes, _dataset_and_notes])
def test_cli_never_replaces_what_it_did_not_write(tmp_path: Path, capsys, flags, make) -> None:
    """--overwrite replaces a dataset tbn-synth wrote; a folder with anything else in it
    (the user's files, alone or beside a dataset) is refused in one line naming them."""
    out = tmp_path / "out"
    make(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["--out", str(out), *ARGS, "--seed", "3", *flags]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "keep.txt" in err and "did not write" in err, err
    assert err.count("\n") == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary left beside it


def test_cli_replaces_its_own_dataset_with_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    (tmp_path / "out.tmp").mkdir()  # someone's folder that merely looks like a temporary
    (tmp_path / "out.tmp" / "x").write_text("theirs")
    assert main(["--out", str(out), *ARGS]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "2 videos (6 frames)" in line and "MB" in line
    # the same dataset again (make demo, then the README's tbn-synth): nothing to do, untouched
    stamp = (out / "synth.json").stat().st_mtime_ns
    assert main(["--out", str(out), *ARGS]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (out / "synth.json").stat().st_mtime_ns == stamp
    # other options: refused, and the dataset left as it is; with --overwrite, replaced whole
    other = ARGS[:-6] + ["--videos-train", "2", "--videos-val", "1", "--videos-test", "0"]
    assert main(["--out", str(out), *other]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "synth.json").stat().st_mtime_ns == stamp
    assert main(["--out", str(out), *other, "--overwrite"]) == 0
    assert (out / "train.txt").read_text().split() == ["train_000", "train_001"]
    assert sorted(os.listdir(tmp_path)) == ["out", "out.tmp"]
    assert (tmp_path / "out.tmp" / "x").read_text() == "theirs"


def test_cli_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "x"), "--height", "33"]) == 2
    assert main(["--out", str(tmp_path / "x"), "--classes", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()
