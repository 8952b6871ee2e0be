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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from tbn_runtime.classes import PALETTE, VSPW_CLASSES

from tbn_runtime.console import OneLineParser, add_verbosity_flags, setup_logging
from tbn_runtime.files import (backup_name, disk_full, disk_full_error, make_temporary_dir,
                               sweep_stale, unmark_temporary_dir)

log = logging.getLogger("tbn_train.data.synth")  # not __main__ under python -m

#: what tbn-synth writes in --out (--overwrite replaces a folder of these and nothing else)
OWN_ENTRIES = ("train.txt", "val.txt", "test.txt", "data", "videos", "synth.json")
JPEG_QUALITY = 80
FPS = 15
DEGRADATIONS = ("noise", "flash", "lowcontrast")
BACKGROUNDS = ("sky", "building", "road", "grass", "sand", "sea", "wall", "floor")
# (class, shape, BGR colour, texture); `--classes N` uses the first N.
OBJECTS = (
    ("car", "rect", (40, 40, 210), "hstripes"),
    ("person", "ellipse_v", (200, 120, 40), "vstripes"),
    ("ball", "circle", (30, 220, 240), "checker"),
    ("dog", "ellipse_h", (40, 80, 140), "spots"),
    ("ship_or_boat", "trapezoid", (20, 120, 240), "hstripes"),
    ("airplane", "triangle", (215, 215, 205), "shade"),
    ("bicycle", "ring", (60, 200, 60), "shade"),
    ("bottle_or_cup", "diamond", (200, 60, 200), "checker"),
)
_BG_COLOUR = {"sky": (235, 195, 140), "building": (125, 120, 130), "road": (80, 80, 85),
              "grass": (40, 140, 60), "sand": (120, 180, 210), "sea": (140, 90, 30),
              "wall": (90, 110, 170), "floor": (60, 100, 150)}


def raw_id(name: str) -> int:
    """Raw VSPW mask value of a class name (train id + 1)."""
    return VSPW_CLASSES.index(name) + 1


@dataclass(frozen=True)
class SynthSummary:
    """What `generate` wrote (or found: `existing`, the same dataset already in place)."""

    root: Path
    videos: int
    frames: int
    bytes: int
    seconds: float
    existing: bool = False


@dataclass
class _Obj:
    cls: int  # index into OBJECTS
    r: float
    pos: np.ndarray  # (y, x)
    vel: np.ndarray
    bounce: bool
    colour: np.ndarray


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    small = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)  # type: ignore[return-value]


def _texture(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """A float32 h x w x 3 BGR texture of background class `kind`."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(_BG_COLOUR[kind], np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
    noise = rng.standard_normal((h, w))
    shade = np.zeros((h, w), np.float32)
    if kind == "sky":
        shade = -30 * (1 - yy / h) + 8 * _smooth_noise(rng, h, w, 16)
    elif kind == "building":
        shade = -55 * (((yy % 10) > 5) & ((xx % 8) > 3)) + 5 * noise  # windows
    elif kind == "road":  # asphalt and a dashed lane marking
        lane = (np.abs(yy - h * rng.uniform(0.6, 0.85)) < 1.5) & ((xx % 24) < 12)
        shade = 8 * noise + 140 * lane
    elif kind == "grass":
        shade = 18 * noise + 15 * np.sin(xx * 1.3)
    elif kind == "sand":
        shade = 10 * noise + 10 * _smooth_noise(rng, h, w, 8)
    elif kind == "sea":
        shade = 22 * np.sin(yy * 0.8 + 2 * np.sin(xx * 0.1)) + 5 * noise
    elif kind == "wall":  # bricks
        mortar = ((yy % 9) < 1.5) | (((xx + 9 * ((yy // 9) % 2)) % 18) < 1.5)
        shade = 90 * mortar + 8 * noise
    elif kind == "floor":
        shade = -40 * ((xx % 14) < 1.5) + 12 * np.sin(yy * 0.35 + 3 * _smooth_noise(rng, h, w, 12))
    return base + shade[..., None].astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """A textured background (float32 h x w x 3 BGR) and its raw labels (uint8 h x w)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.7:  # outdoor: sky above a wavy horizon, two ground classes below
        top = "sky"
        ground = [("road", "grass"), ("sand", "sea"), ("grass", "road"), ("road", "sand")][
            int(rng.integers(4))]
    else:  # indoor: wall above the floor, another floor-level class beside it
        top, ground = "wall", ("floor", ("road", "grass")[int(rng.integers(2))])
    horizon = h * rng.uniform(0.3, 0.5) + 4 * np.sin(xx * rng.uniform(0.02, 0.06))
    slope = rng.uniform(-1.0, 1.0)
    split = w * rng.uniform(0.3, 0.7) + slope * (yy - h)
    names = [top, ground[0], ground[1]]
    region = np.where(yy < horizon, 0, np.where(xx < split, 1, 2))
    if top == "sky" and rng.random() < 0.6:  # a block of buildings standing on the horizon
        x0, bw = w * rng.uniform(0, 0.6), w * rng.uniform(0.15, 0.35)
        roof = horizon - h * rng.uniform(0.12, 0.25)
        region = np.where((xx >= x0) & (xx < x0 + bw) & (yy >= roof) & (yy < horizon), 3,
                          region)
        names.append("building")
    img = np.zeros((h, w, 3), np.float32)
    label = np.zeros((h, w), np.uint8)
    for k, name in enumerate(names):
        m = region == k
        img[m] = _texture(rng, name, h, w)[m]
        label[m] = raw_id(name)
    return img, label


# Shapes and textures in object coordinates (dy, dx relative to the centre, r the radius).
_SHAPES: Dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "rect": lambda dy, dx, r: (np.abs(dx) < r) & (np.abs(dy) < 0.55 * r),
    "ellipse_v": lambda dy, dx, r: (dx / (0.5 * r)) ** 2 + (dy / r) ** 2 < 1,
    "ellipse_h": lambda dy, dx, r: ((dx / r) ** 2 + (dy / (0.6 * r)) ** 2 < 1) | (
        (dx - 0.95 * r) ** 2 + (dy + 0.5 * r) ** 2 < (0.35 * r) ** 2),  # body and head
    "circle": lambda dy, dx, r: dx ** 2 + dy ** 2 < (0.8 * r) ** 2,
    "trapezoid": lambda dy, dx, r: (np.abs(dy) < 0.45 * r) & (
        np.abs(dx) < r * (0.95 - 0.4 * (dy / r + 0.45))),
    "triangle": lambda dy, dx, r: (dy < 0.7 * r) & (np.abs(dx) < 0.7 * (dy + r)),
    "ring": lambda dy, dx, r: ((dx ** 2 + dy ** 2) > (0.45 * r) ** 2) & (
        (dx ** 2 + dy ** 2) < (0.9 * r) ** 2),
    "diamond": lambda dy, dx, r: np.abs(dx) / (0.6 * r) + np.abs(dy) / r < 1,
}
_TEXTURES: Dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "hstripes": lambda dy, dx, r: 1 + 0.3 * np.sign(np.sin(dy * 0.9)),
    "vstripes": lambda dy, dx, r: 1 + 0.3 * np.sign(np.sin(dx * 0.9)),
    "checker": lambda dy, dx, r: 0.7 + 0.5 * ((np.floor(dx / 4) + np.floor(dy / 4)) % 2),
    "spots": lambda dy, dx, r: 1 - 0.5 * (np.sin(dx * 0.6) * np.sin(dy * 0.6) > 0.5),
    "shade": lambda dy, dx, r: 1 - 0.25 * dy / r,
}


def _draw(obj: _Obj, img: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint `obj` into img/label in place; return its full-frame mask."""
    h, w = label.shape
    name, shape, _, tex = OBJECTS[obj.cls]
    cy, cx = obj.pos
    y0, y1 = max(int(cy - obj.r) - 1, 0), min(int(cy + obj.r) + 2, h)
    x0, x1 = max(int(cx - 1.4 * obj.r) - 1, 0), min(int(cx + 1.4 * obj.r) + 2, w)
    full = np.zeros((h, w), bool)
    if y0 >= y1 or x0 >= x1:
        return full
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy -= cy
    dx -= cx
    m = _SHAPES[shape](dy, dx, obj.r)
    colour = obj.colour * _TEXTURES[tex](dy, dx, obj.r)[..., None]
    colour += 6 * rng.standard_normal(colour.shape).astype(np.float32)
    img[y0:y1, x0:x1][m] = colour[m]
    label[y0:y1, x0:x1][m] = raw_id(name)
    full[y0:y1, x0:x1] = m
    return full


def _move(obj: _Obj, h: int, w: int) -> None:
    obj.pos = obj.pos + obj.vel
    lim = np.array([h, w], np.float32)
    if obj.bounce:
        for k in range(2):
            if obj.pos[k] < 0 or obj.pos[k] > lim[k]:
                obj.vel[k] = -obj.vel[k]
                obj.pos[k] = np.clip(obj.pos[k], 0, lim[k])
    else:  # wrap around once fully out of view
        obj.pos = (obj.pos + 2 * obj.r) % (lim + 4 * obj.r) - 2 * obj.r


def _degrade(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    if kind == "noise":
        return img + rng.uniform(80, 120) * rng.standard_normal(img.shape).astype(np.float32)
    if kind == "flash":
        if rng.random() < 0.5:  # the whole frame washes out
            return img + rng.uniform(0.88, 0.97) * (255 - img)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # a white occluder over most of it
        cy, cx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7)
        m = ((yy - cy) / (0.7 * h)) ** 2 + ((xx - cx) / (0.7 * w)) ** 2 < 1
        return np.where(m[..., None], np.float32(250), img)
    mean = img.mean(axis=(0, 1), keepdims=True)  # low contrast
    return mean + (img - mean) * rng.uniform(0.03, 0.07) + 2 * rng.standard_normal(img.shape)


def degradation_schedule(rng: np.random.Generator, frames: int) -> List[Optional[str]]:
    """Per frame: None (clean) or the degradation of a 1-3 frame stretch."""
    out: List[Optional[str]] = [None] * frames
    t = int(rng.integers(4, 9))
    while t < frames:
        length, kind = int(rng.integers(1, 4)), DEGRADATIONS[int(rng.integers(3))]
        out[t:t + length] = [kind] * len(out[t:t + length])
        t += length + int(rng.integers(6, 11))
    return out


def make_video(rng: np.random.Generator, height: int, width: int, frames: int,
               classes: int, first_class: int = 0) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Render one video: (uint8 BGR frames, uint8 raw masks)."""
    h, w = height, width
    pan = rng.uniform(-0.8, 0.8)
    wide = w + int(np.ceil(abs(pan) * frames)) + 1
    bg, bg_label = _background(rng, h, wide)
    start = 0 if pan >= 0 else wide - w
    offs = [int(round(start + pan * t)) for t in range(frames)]
    # a small static "others" patch (raw 0), in view for the whole video where the pan allows
    ph, pw = max(2, h // 12), max(2, w // 10)
    lo, hi = max(offs), min(offs) + w - pw
    py, px = int(rng.integers(0, h - ph)), int(rng.integers(lo, max(lo, hi) + 1))
    stripes = (np.arange(pw)[None, :] % 4 < 2).astype(np.float32)
    bg[py:py + ph, px:px + pw] = np.array([200, 60, 200], np.float32) * (
        0.6 + 0.4 * stripes[..., None])
    bg_label[py:py + ph, px:px + pw] = 0
    objs = []
    for i in range(int(rng.integers(2, 5))):  # 2..4 objects; the first cycles through classes
        cls = (first_class % classes) if i == 0 else int(rng.integers(classes))
        ang, speed = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 3.5) * min(h, w) / 160
        pos = np.array([rng.uniform(0.15, 0.85) * h, rng.uniform(0.1, 0.9) * w], np.float32)
        vel = np.array([np.sin(ang), np.cos(ang)], np.float32) * speed
        colour = np.array(OBJECTS[cls][2], np.float32) + rng.uniform(-20, 20, 3)
        objs.append(_Obj(cls, float(rng.uniform(0.08, 0.16) * min(h, w)), pos, vel,
                         bool(rng.random() < 0.6), colour.astype(np.float32)))
    schedule = degradation_schedule(rng, frames)
    imgs, masks = [], []
    for t in range(frames):
        img = bg[:, offs[t]:offs[t] + w].copy()
        label = bg_label[:, offs[t]:offs[t] + w].copy()
        first = None
        for obj in objs:
            m = _draw(obj, img, label, rng)
            first = m if first is None else first
            _move(obj, h, w)
        if first is not None and first.any():  # a thin void outline around the first object
            ring = cv2.dilate(first.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            label[ring & ~first] = 255
        img += 2 * rng.standard_normal(img.shape).astype(np.float32)
        if schedule[t] is not None:
            img = _degrade(img, schedule[t], rng)
        imgs.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        masks.append(label)
    return imgs, masks


def synthetic_frames(n: int, height: int, width: int, seed: int = 0) -> List[np.ndarray]:
    """n uint8 BGR frames of one synthetic video (make_video's moving textured objects on a
    panning background, with its degraded stretches): the frames tests, `tbn-export --verify`
    and the benchmarks feed the engines when no real video is given."""
    h, w = height + height % 2, width + width % 2  # make_video draws on even sizes
    imgs, _ = make_video(np.random.default_rng(seed), h, w, n, classes=len(OBJECTS))
    return [np.ascontiguousarray(f[:height, :width]) for f in imgs]


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
    cap, n = cv2.VideoCapture(str(path)), 0
    while cap.read()[0]:
        n += 1
    cap.release()
    if n != len(frames):
        raise OSError(f"{path}: wrote {len(frames)} frames but reading back gives {n}")


def generate(out: "str | Path", seed: int = 0, height: int = 160, width: int = 224,
             videos_train: int = 10, videos_val: int = 3, videos_test: int = 2,
             frames: int = 40, classes: int = 5, overwrite: bool = False) -> SynthSummary:
    """Write the dataset to `out` (see the module docstring) and return a summary.

    The tree is built in a hidden temporary folder beside `out` and renamed into place at the
    end. Raises FileExistsError if `out` holds anything tbn-synth did not write (also with
    `overwrite`: it replaces only a dataset of its own), or another dataset without
    `overwrite`; ValueError for bad options.
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
    setup_logging("tbn-synth")
    try:
        a = build_parser().parse_args(argv)
        setup_logging("tbn-synth", a.verbose, a.quiet)
        log.debug(f"writing {a.videos_train + a.videos_val + a.videos_test} videos of "
                  f"{a.frames} frames, {a.height}x{a.width}, to {a.out}")
        summary = generate(a.out, seed=a.seed, height=a.height, width=a.width,
                           videos_train=a.videos_train, videos_val=a.videos_val,
                           videos_test=a.videos_test, frames=a.frames, classes=a.classes,
                           overwrite=a.overwrite)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (FileExistsError, ValueError, OSError) as e:
        log.error(str(e))
        return 2
    if summary.existing:
        log.info(f"{summary.root} already holds this dataset (the same options); nothing to "
                 f"do (--overwrite writes it again)")
    elif not a.quiet:  # what was written: the command's output, on stdout (messages: stderr)
        print(f"tbn-synth: wrote {summary.videos} videos ({summary.frames} frames) to "
              f"{summary.root}, {summary.bytes / 1e6:.1f} MB, {summary.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
