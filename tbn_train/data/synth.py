"""tbn-synth: a small synthetic dataset in the VSPW layout (`python -m tbn_train.data.synth`).

Writes OUT/{train,val,test}.txt, OUT/data/<video>/origin/<t:08d>.jpg, OUT/data/<video>/mask/
<t:08d>.png (palette PNG of raw VSPW values: 0 others, 1..124 classes, 255 void), an
OUT/videos/<video>.mp4 per val/test video and OUT/synth.json (options, classes used). Unlike
real VSPW, test has masks too. A fair test of the temporal module: textured backgrounds, a
slow pan, textured moving objects of several classes (some bounce, some wrap around), and
1-3 frame stretches, at least 6 frames apart, where the image alone is ambiguous (heavy noise,
a white flash or occluder, very low contrast) while the labels stay true -- so frames t-3,
t-6, t-9 are mostly clean when t is not. The same options give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from tbn_runtime.classes import PALETTE, VSPW_CLASSES
from tbn_runtime.console import (OneLineParser, add_verbosity_flags, run_command,
                                 setup_logging)
from tbn_runtime.files import (backup_name, disk_full, disk_full_error, make_temporary_dir,
                               sweep_stale, unmark_temporary_dir)

# the scenes live in .scenes; these names stay importable from here (tests, tbn-export --verify)
from .scenes import (BACKGROUNDS, DEGRADATIONS, OBJECTS, degradation_schedule,  # noqa: F401
                     make_video, raw_id, synthetic_frames)

log = logging.getLogger("tbn_train.data.synth")  # not __main__ under python -m

#: what tbn-synth writes in --out (--overwrite replaces a folder of these and nothing else)
OWN_ENTRIES = ("train.txt", "val.txt", "test.txt", "data", "videos", "synth.json")
JPEG_QUALITY = 80
FPS = 15


@dataclass(frozen=True)
class SynthSummary:
    """What `generate` wrote (or found: `existing`, the same dataset already in place)."""

    root: Path
    videos: int
    frames: int
    bytes: int
    seconds: float
    existing: bool = False


def _write_mask(path: Path, raw: np.ndarray) -> None:
    img = Image.fromarray(np.ascontiguousarray(raw))
    img.putpalette(PALETTE.tobytes())
    img.save(path, format="PNG", compress_level=6)


def _write_mp4(path: Path, frames: Sequence[np.ndarray]) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (w, h))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write mp4v video here (no video backend)")
    for f in frames:
        writer.write(f)
    writer.release()
    from tbn_runtime.sources import SourceError, open_source

    try:
        n = sum(1 for _ in open_source(str(path))[0].frames())
    except SourceError as e:
        raise OSError(f"{path}: the video written does not read back ({e})") from None
    if n != len(frames):
        raise OSError(f"{path}: wrote {len(frames)} frames but reading back gives {n}")


def generate(out: "str | Path", seed: int = 0, height: int = 160, width: int = 224,
             videos_train: int = 10, videos_val: int = 3, videos_test: int = 2,
             frames: int = 40, classes: int = 5, overwrite: bool = False) -> SynthSummary:
    """Write the dataset to `out` (see the module docstring) and return a summary.

    The tree is built in a hidden temporary folder beside `out` and renamed into place at the
    end. Raises FileExistsError if `out` holds anything tbn-synth did not write (also with
    `overwrite`: it replaces only a dataset of its own), or another dataset without
    `overwrite`; ValueError for bad options. Over 60 lines: the steps (check, write the tree,
    describe it, rename) share the temporary folder and its clean-up.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise ValueError(f"height and width must be even and >= 16, got {height}x{width}")
    if frames < 1 or min(videos_train, videos_val, videos_test) < 0 or not (
            1 <= classes <= len(OBJECTS)):
        raise ValueError(f"need frames >= 1, video counts >= 0, classes in 1..{len(OBJECTS)}")
    counts = {"train": videos_train, "val": videos_val, "test": videos_test}
    options = {"seed": seed, "height": height, "width": width, "frames": frames,
               "videos": counts, "object_classes": [o[0] for o in OBJECTS[:classes]]}
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder for the dataset")
    if out.is_dir() and any(out.iterdir()):
        # synth.json is written last and the tree renamed into place whole: if it says these
        # options, the dataset is this one (the same options write the same bytes)
        try:
            found = json.loads((out / "synth.json").read_text())
        except (OSError, ValueError):
            found = None
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES) \
            if isinstance(found, dict) else sorted(p.name for p in out.iterdir())
        if foreign:  # --overwrite replaces a dataset tbn-synth wrote, and nothing else
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more"
                                              if len(foreign) > 3 else "")
            raise FileExistsError(f"{out} holds files tbn-synth did not write ({shown}); it "
                                  f"replaces only a dataset of its own: choose another --out")
        if not overwrite and {k: found.get(k) for k in options} == options:
            return SynthSummary(out, sum(counts.values()), frames * sum(counts.values()), 0,
                                time.perf_counter() - t0, existing=True)
        if not overwrite:
            raise FileExistsError(f"{out} holds another tbn-synth dataset (other options); "
                                  f"pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(str(out.parent))
    tmp = Path(make_temporary_dir(str(out)))
    (tmp / "videos").mkdir()
    n_frames = 0
    try:
        for s, (split, n) in enumerate(counts.items()):
            names = [f"{split}_{i:03d}" for i in range(n)]
            for i, name in enumerate(names):
                rng = np.random.default_rng([seed, s, i])
                imgs, masks = make_video(rng, height, width, frames, classes, first_class=i)
                (tmp / "data" / name / "origin").mkdir(parents=True)
                (tmp / "data" / name / "mask").mkdir()
                for t, (img, mask) in enumerate(zip(imgs, masks)):
                    cv2.imwrite(str(tmp / "data" / name / "origin" / f"{t:08d}.jpg"), img,
                                [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                    _write_mask(tmp / "data" / name / "mask" / f"{t:08d}.png", mask)
                if split != "train":
                    _write_mp4(tmp / "videos" / f"{name}.mp4", imgs)
                n_frames += len(imgs)
            (tmp / f"{split}.txt").write_text("".join(f"{v}\n" for v in names))
        used = sorted(raw_id(n) for n in BACKGROUNDS + tuple(o[0] for o in OBJECTS[:classes]))
        meta = {**options, "raw_ids": {str(r): VSPW_CLASSES[r - 1] for r in used}}
        (tmp / "synth.json").write_text(json.dumps(meta, indent=1) + "\n")
        unmark_temporary_dir(str(tmp))
        old = None
        if out.exists():  # a dataset of ours (checked above): moved aside, then removed
            old = Path(backup_name(str(out)))
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise disk_full_error(str(out), e) from None
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return SynthSummary(out, sum(counts.values()), n_frames, size, time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tbn-synth", description=__doc__.split("\n")[0],
                      epilog="exit codes: 0 written; 2 a mistake in the options, or --out is "
                             "not empty (one line says which)")
    p.add_argument("--out", default="data/synth",
                   help="dataset root to write (default: %(default)s)")
    for flag, default, note in (
            ("--seed", 0, "everything derives from it: the same options write the same bytes"),
            ("--height", 160, "frame height in pixels, even, >= 16"),
            ("--width", 224, "frame width in pixels, even, >= 16"),
            ("--videos-train", 10, "videos in the train split"),
            ("--videos-val", 3, "videos in the val split (each also written as an .mp4)"),
            ("--videos-test", 2, "videos in the test split (each also written as an .mp4)"),
            ("--frames", 40, "frames per video (> 16 for mVC16)"),
            ("--classes", 5, f"moving-object classes, 1..{len(OBJECTS)}: "
                             f"{', '.join(o[0] for o in OBJECTS)} (in that order)")):
        p.add_argument(flag, type=int, default=default, help=f"{note} (default: {default})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset tbn-synth wrote in --out (never other files)")
    add_verbosity_flags(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry of tbn-synth; returns the exit code."""
    return run_command("tbn-synth", lambda: _main(argv),
                       user_errors=(FileExistsError, ValueError))


def _main(argv: Optional[Sequence[str]]) -> int:
    a = build_parser().parse_args(argv)
    setup_logging("tbn-synth", a.verbose, a.quiet)
    log.debug(f"writing {a.videos_train + a.videos_val + a.videos_test} videos of "
              f"{a.frames} frames, {a.height}x{a.width}, to {a.out}")
    summary = generate(a.out, seed=a.seed, height=a.height, width=a.width,
                       videos_train=a.videos_train, videos_val=a.videos_val,
                       videos_test=a.videos_test, frames=a.frames, classes=a.classes,
                       overwrite=a.overwrite)
    if summary.existing:
        log.info(f"{summary.root} already holds this dataset (the same options); nothing to "
                 f"do (--overwrite writes it again)")
    elif not a.quiet:  # what was written: the command's output, on stdout (messages: stderr)
        print(f"tbn-synth: wrote {summary.videos} videos ({summary.frames} frames) to "
              f"{summary.root}, {summary.bytes / 1e6:.1f} MB, {summary.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
