"""Mask PNG I/O and visualisation in tbn_runtime.masks."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tbn_runtime.classes import IGNORE_INDEX, PALETTE
from tbn_runtime.masks import colorize, overlay, read_label_png, write_mask_png


def _ids(h=7, w=5, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 124, size=(h, w), dtype=np.uint8)
    ids[0, 0] = IGNORE_INDEX
    return ids


def test_roundtrip_palette_png(tmp_path):
    ids = _ids()
    path = tmp_path / "a" / "b" / "00001.png"  # parent dirs created
    write_mask_png(path, ids)
    with Image.open(path) as img:
        assert img.mode == "P"
        pal = np.array(img.getpalette()[:256 * 3], dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(pal, PALETTE)
    out = read_label_png(path)
    assert out.dtype == np.uint8 and out.shape == ids.shape
    np.testing.assert_array_equal(out, ids)
    assert os.listdir(path.parent) == ["00001.png"]  # no temporary left behind


def test_write_overwrites_atomically(tmp_path, monkeypatch):
    path = tmp_path / "m.png"
    write_mask_png(path, np.zeros((3, 4), np.uint8))
    write_mask_png(path, np.full((3, 4), 7, np.uint8))
    np.testing.assert_array_equal(read_label_png(path), 7)
    assert sorted(os.listdir(tmp_path)) == ["m.png"]

    # a write that dies half-way (disk full, a kill) leaves the previous mask whole
    from PIL import Image

    def half_then_fail(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_mask_png(path, np.full((3, 4), 9, np.uint8))
    np.testing.assert_array_equal(read_label_png(path), 7)
    assert sorted(os.listdir(tmp_path)) == ["m.png"]  # and no temporary left


def test_atomic_text_write_keeps_the_old_file_when_it_fails(tmp_path, monkeypatch):
    from tbn_runtime import files

    path = tmp_path / "stats.json"
    files.atomic_write_text(str(path), '{"old": true}\n')
    real_replace = os.replace

    def crash_before_rename(src, dst):  # the process dies after writing, before the rename
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", crash_before_rename)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_text(str(path), '{"new": true}\n')
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_text() == '{"old": true}\n'
    assert os.listdir(tmp_path) == ["stats.json"]


@pytest.mark.parametrize("bad, word", [
    (np.zeros((3, 4), np.int64), "dtype"),
    (np.zeros((3, 4, 1), np.uint8), "shape"),
    (np.zeros((0, 4), np.uint8), "shape"),
])
def test_write_rejects_bad_arrays(tmp_path, bad, word):
    with pytest.raises(ValueError, match=word):
        write_mask_png(tmp_path / "x.png", bad)
    assert not (tmp_path / "x.png").exists()


def test_read_grayscale_and_raw_palette(tmp_path):
    raw = np.array([[0, 1, 124], [255, 3, 50]], np.uint8)
    Image.fromarray(raw).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png"), raw)
    img = Image.fromarray(raw)
    img.putpalette(np.random.default_rng(1).integers(0, 256, 768, dtype=np.uint8).tobytes())
    img.save(tmp_path / "p.png")  # like a raw VSPW mask: indices are the raw values
    np.testing.assert_array_equal(read_label_png(tmp_path / "p.png"), raw)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_label_png(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="junk.png"):
        read_label_png(tmp_path / "junk.png")
    Image.new("RGB", (4, 3)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png"):
        read_label_png(tmp_path / "rgb.png")


def test_colorize_is_bgr_palette():
    ids = _ids()
    col = colorize(ids)
    assert col.shape == ids.shape + (3,) and col.dtype == np.uint8
    np.testing.assert_array_equal(col[..., ::-1], PALETTE[ids])


def test_overlay_blend():
    ids = np.array([[0, IGNORE_INDEX]], np.uint8)
    frame = np.array([[[10, 20, 30], [40, 50, 60]]], np.uint8)
    out = overlay(frame, ids, alpha=0.5)
    expect = np.rint(0.5 * frame[0, 0] + 0.5 * PALETTE[0][::-1].astype(float))
    np.testing.assert_array_equal(out[0, 0], expect.astype(np.uint8))
    np.testing.assert_array_equal(out[0, 1], frame[0, 1])  # ignore pixels keep the frame
    np.testing.assert_array_equal(overlay(frame, ids, alpha=0.0), frame)
    np.testing.assert_array_equal(overlay(frame, ids, alpha=1.0)[0, 0], PALETTE[0][::-1])
    with pytest.raises(ValueError):
        overlay(frame, np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError):
        overlay(frame, ids, alpha=1.5)


def test_runtime_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['tbn_train'] = None\n"
            "import tbn_runtime.masks, tbn_runtime.metrics, tbn_runtime.temporal\n"
            "import tbn_runtime.classes, tbn_runtime.preprocess\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


def test_resizing_in_and_out_of_the_export_size():
    from tbn_runtime.preprocess import resize_frame, resize_labels

    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    small = resize_frame(frame, 12, 20)
    assert small.shape == (12, 20, 3) and small.dtype == np.uint8
    assert np.array_equal(resize_frame(frame, 30, 50), frame)
    # bilinear: a frame of two flat halves gets blended values at the seam
    halves = np.zeros((8, 8, 3), np.uint8)
    halves[:, 4:] = 200
    assert len(np.unique(resize_frame(halves, 8, 12))) > 2
    # labels are classes: nearest, never a value between two classes, and back to the size asked
    labels = np.where(np.arange(12)[None, :] < 6, 3, 9).astype(np.uint8).repeat(12, 0)
    big = resize_labels(labels, 30, 50)
    assert big.shape == (30, 50) and set(np.unique(big)) == {3, 9}
    assert resize_labels(labels, 12, 12) is labels
