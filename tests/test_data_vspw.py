"""The VSPW reader (tbn_train.data.vspw) and the clip transforms, on tiny synth trees."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tbn_runtime.classes import IGNORE_INDEX, PALETTE
from tbn_runtime.preprocess import MEAN_RGB, STD_RGB, normalize_bgr
from tbn_train.data.synth import generate
from tbn_train.data.transforms import AugParams, augment_clip, sample_params
from tbn_train.data.vspw import DatasetError, VSPWClips, index_split, iter_video, read_mask

H, W, T = 64, 96, 12


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vspw") / "synth"
    generate(out, seed=3, height=H, width=W, videos_train=2, videos_val=1, videos_test=1,
             frames=T)
    return out


@pytest.fixture()
def copy(root: Path, tmp_path: Path) -> Path:
    """A private copy of the tree that a test may break."""
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def _save_raw(path: Path, raw: np.ndarray) -> None:
    img = Image.fromarray(raw.astype(np.uint8))
    img.putpalette(PALETTE.tobytes())
    img.save(path)


def test_index_split(root: Path) -> None:
    videos = index_split(root, "train")
    assert [v.name for v in videos] == ["train_000", "train_001"]
    for v in videos:
        assert len(v) == T and v.masks is not None and len(v.masks) == T
        assert v.frames == sorted(v.frames)
        assert [f.stem for f in v.frames] == [m.stem for m in v.masks]
    (test,) = index_split(root, "test", with_masks=False)
    assert test.masks is None


def test_label_mapping(root: Path, copy: Path) -> None:
    video = index_split(root, "val")[0]
    seen = set()
    for t, frame, label in iter_video(video):
        raw = np.array(Image.open(video.masks[t]))  # type: ignore[index]
        assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
        assert label is not None and label.shape == (H, W)
        expect = np.where((raw == 0) | (raw == 255), 255, raw.astype(np.int32) - 1)
        np.testing.assert_array_equal(label, expect)
        seen |= set(np.unique(raw).tolist())
    assert {0, 255} <= seen and len(seen - {0, 255}) >= 3
    # every boundary value, written explicitly
    mask = next(copy.glob("data/val_000/mask/*.png"))
    raw = np.zeros((H, W), np.uint8)
    raw[0, :4] = [0, 1, 124, 255]
    _save_raw(mask, raw)
    ids = read_mask(mask)
    assert ids[0, :4].tolist() == [255, 0, 123, 255] and ids.dtype == np.uint8


def test_clip_indices_first_frames(root: Path) -> None:
    ds = VSPWClips(root, "train", train=False)
    assert len(ds) == 2 * T
    assert ds.frame_indices(0) == [0, 0, 0, 0]
    assert ds.frame_indices(1) == [0, 0, 0, 1]
    assert ds.frame_indices(4) == [0, 0, 1, 4]
    assert ds.frame_indices(11) == [2, 5, 8, 11]
    assert ds.frame_indices(T) == [0, 0, 0, 0]  # first frame of the second video
    clip, label = ds[4]
    assert clip.shape == (4, 3, H, W) and clip.dtype == torch.float32
    assert label.shape == (H, W) and label.dtype == torch.int64
    video = ds.videos[0]
    for k, i in enumerate([0, 0, 1, 4]):
        want = normalize_bgr(cv2.imread(str(video.frames[i])))
        np.testing.assert_array_equal(clip[k].numpy(), want)
    np.testing.assert_array_equal(label.numpy(), read_mask(video.masks[4]))  # type: ignore


def _coded_frame(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A frame whose colour encodes its label: 8x8 blocks of 6 classes, distinct colours."""
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                        [0, 255, 255]], np.float32)
    blocks = rng.integers(0, 6, (H // 8, W // 8)).astype(np.uint8)
    label = np.kron(blocks, np.ones((8, 8), np.uint8))
    return colours[label].astype(np.uint8), label, colours


def _decode(chw: np.ndarray, colours: np.ndarray) -> np.ndarray:
    rgb = chw.transpose(1, 2, 0) * np.array(STD_RGB, np.float32) + np.array(MEAN_RGB, np.float32)
    bgr = rgb[..., ::-1]
    return np.argmin(((bgr[:, :, None, :] - colours[None, None]) ** 2).sum(-1), axis=-1)


def test_augmentation_keeps_frames_and_label_aligned() -> None:
    rng = np.random.default_rng(0)
    frame, label, colours = _coded_frame(rng)
    flips = 0
    for _ in range(12):
        p = sample_params(rng, (H, W), (40, 56), (0.5, 2.0), flip=True)
        flips += p.flip
        clip, lab = augment_clip([frame] * 4, label, p)
        assert clip.shape == (4, 3, 40, 56) and lab is not None and lab.shape == (40, 56)
        for k in range(1, 4):  # one transform for every frame of the clip
            np.testing.assert_array_equal(clip[k], clip[0])
        # compare away from block borders, where bilinear and nearest resizing may differ
        inner = cv2.erode((lab != IGNORE_INDEX).astype(np.uint8), np.ones((3, 3)))
        same = cv2.erode(lab, np.ones((3, 3))) == cv2.dilate(lab, np.ones((3, 3)))
        keep = (inner > 0) & same
        assert keep.sum() > 100
        assert (_decode(clip[0], colours)[keep] == lab[keep]).mean() > 0.99
    assert 0 < flips < 12
    # flipping mirrors both
    p = AugParams(size=(H, W), crop=(0, 0), crop_size=(H, W), flip=False)
    c0, l0 = augment_clip([frame], label, p)
    c1, l1 = augment_clip([frame], label, AugParams((H, W), (0, 0), (H, W), True))
    np.testing.assert_array_equal(l1, l0[:, ::-1])  # type: ignore[index]
    np.testing.assert_allclose(c1, c0[..., ::-1])


def test_crop_padding_uses_ignore_and_zero() -> None:
    rng = np.random.default_rng(1)
    frame, label, _ = _coded_frame(rng)
    p = sample_params(rng, (H, W), (80, 120), (0.5, 0.5), flip=False)
    assert p.size == (32, 48) and p.crop == (0, 0)
    clip, lab = augment_clip([frame] * 4, label, p)
    assert clip.shape == (4, 3, 80, 120) and lab is not None
    assert (lab[32:] == IGNORE_INDEX).all() and (lab[:, 48:] == IGNORE_INDEX).all()
    assert (lab[:32, :48] != IGNORE_INDEX).all()
    assert (clip[:, :, 32:] == 0).all() and (clip[:, :, :, 48:] == 0).all()


def test_clips_deterministic_given_torch_seed(root: Path) -> None:
    ds = VSPWClips(root, "train", crop_size=(48, 48), scale_range=(0.75, 1.5))
    torch.manual_seed(7)
    a = [ds[i] for i in (0, 5, 5)]
    torch.manual_seed(7)
    b = [ds[i] for i in (0, 5, 5)]
    for (ca, la), (cb, lb) in zip(a, b):
        assert torch.equal(ca, cb) and torch.equal(la, lb)
    assert a[0][0].shape == (4, 3, 48, 48) and a[0][1].shape == (48, 48)


def test_dataloader_with_workers(root: Path) -> None:
    ds = VSPWClips(root, "train", crop_size=(48, 64), scale_range=(0.75, 1.25))

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        loader = DataLoader(ds, batch_size=6, shuffle=True, num_workers=2)
        return [torch.cat([c.flatten(), lab.flatten().float()]) for c, lab in loader]

    first = run()
    assert len(first) == 4
    second = run()
    assert all(torch.equal(x, y) for x, y in zip(first, second))


# ---- every DatasetError case names the file --------------------------------------------


def _raises(match: str, fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(DatasetError) as err:
        fn(*args)
    msg = str(err.value)
    assert match in msg and "\n" not in msg, msg
    return msg


def test_missing_root(tmp_path: Path) -> None:
    _raises(str(tmp_path / "nowhere"), index_split, tmp_path / "nowhere", "train")


def test_missing_split_file(copy: Path) -> None:
    (copy / "val.txt").unlink()
    _raises(str(copy / "val.txt"), index_split, copy, "val")


def test_video_without_frames(copy: Path) -> None:
    with open(copy / "train.txt", "a") as f:
        f.write("ghost\n")
    _raises(str(copy / "data" / "ghost" / "origin"), index_split, copy, "train")
    (copy / "data" / "ghost" / "origin").mkdir(parents=True)  # an empty folder
    _raises(str(copy / "data" / "ghost" / "origin"), VSPWClips, copy, "train")


def test_frame_without_mask(copy: Path) -> None:
    mask = copy / "data" / "train_001" / "mask" / "00000003.png"
    mask.unlink()
    msg = _raises(str(mask), index_split, copy, "train")
    assert "00000003.jpg" in msg
    assert len(index_split(copy, "train", with_masks=False)) == 2


def test_mask_size_differs(copy: Path) -> None:
    mask = copy / "data" / "val_000" / "mask" / "00000002.png"
    _save_raw(mask, np.ones((H // 2, W), np.uint8))
    msg = _raises(str(mask), lambda: list(iter_video(index_split(copy, "val")[0])))
    assert "00000002.jpg" in msg
    ds = VSPWClips(copy, "val", train=False)
    _raises(str(mask), ds.__getitem__, 2)


def test_label_values_out_of_range(copy: Path) -> None:
    mask = copy / "data" / "val_000" / "mask" / "00000001.png"
    raw = np.ones((H, W), np.uint8)
    raw[3, 3] = 200
    _save_raw(mask, raw)
    msg = _raises(str(mask), VSPWClips(copy, "val", train=False).__getitem__, 1)
    assert "[200]" in msg


def test_unreadable_image(copy: Path) -> None:
    frame = copy / "data" / "val_000" / "origin" / "00000005.jpg"
    frame.write_bytes(b"not a jpeg")
    _raises(str(frame), lambda: list(iter_video(index_split(copy, "val")[0])))
    _raises(str(frame), VSPWClips(copy, "val").__getitem__, 8)  # a past frame of t=8
