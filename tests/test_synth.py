"""tbn-synth (tbn_train.data.synth): layout, label encoding, determinism, videos, the CLI."""

from __future__ import annotations

import json
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


def test_cli_refuses_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--out", str(out), "--height", "32", "--width", "48", "--frames", "3",
            "--videos-train", "1", "--videos-val", "1", "--videos-test", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "keep.txt").exists()
    assert main(args + ["--overwrite"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "2 videos (6 frames)" in line and "MB" in line
    assert not (out / "keep.txt").exists() and (out / "train.txt").exists()
    assert not (tmp_path / "out.tmp").exists()
    # the same dataset again (make demo, then the README's tbn-synth): nothing to do, untouched
    stamp = (out / "synth.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (out / "synth.json").stat().st_mtime_ns == stamp
    # other options: refused, and the dataset left as it is
    assert main(args[:-6] + ["--videos-train", "2", "--videos-val", "1", "--videos-test", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "synth.json").stat().st_mtime_ns == stamp


def test_cli_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "x"), "--height", "33"]) == 2
    assert main(["--out", str(tmp_path / "x"), "--classes", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()
