"""VSPW metrics in tbn_runtime.metrics, on cases small enough to count by hand."""

import json

import numpy as np
import pytest

from tbn_runtime.classes import IGNORE_INDEX, VSPW_CLASSES
from tbn_runtime.metrics import SegMetrics, confusion_matrix, format_table

U8 = np.uint8


def _official_vc(gts, preds, n):
    """The official VSPW per-clip loop (VC_perclip.py), kept close to the original."""
    accs = []
    for i in range(len(gts) - n):
        g_common = np.ones(gts[0].shape, bool)
        p_common = np.ones(gts[0].shape, bool)
        for j in range(1, n):
            g_common &= gts[i] == gts[i + j]
            p_common &= preds[i] == preds[i + j]
        accs.append((g_common & p_common).sum() / g_common.sum())
    return accs


def test_confusion_matrix_counts_and_ignore():
    gt = np.array([[0, 0, 1], [2, IGNORE_INDEX, 1]], U8)
    pred = np.array([[0, 1, 1], [1, 2, 1]], U8)
    cm = confusion_matrix(pred, gt, num_classes=3)
    assert cm.dtype == np.int64 and cm.shape == (3, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [0, 1, 0]])
    assert cm.sum() == 5  # the 255 pixel is excluded


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), U8), np.zeros((2, 3), U8))
    with pytest.raises(ValueError, match="train ids"):
        confusion_matrix(np.full((2, 2), 5, U8), np.zeros((2, 2), U8), num_classes=3)
    # out-of-range predictions on ignored pixels do not matter
    cm = confusion_matrix(np.full((2, 2), 255, U8), np.full((2, 2), 255, U8), num_classes=3)
    assert cm.sum() == 0


def test_perfect_prediction():
    gt = [np.array([[0, 1], [2, 2]], U8)] * 10
    m = SegMetrics(num_classes=3, vc_windows=(8,))
    m.add_video(gt, gt)
    s = m.summary()
    assert s["mIoU"] == 100.0 and s["pixel_acc"] == 100.0 and s["mVC8"] == 100.0
    assert s["frames"] == 10 and s["videos"] == 1
    assert m.vc_window_counts == {8: 2}  # T - N = 10 - 8


def test_consistently_wrong_prediction():
    gt = [np.zeros((2, 2), U8)] * 9
    pred = [np.ones((2, 2), U8)] * 9
    m = SegMetrics(num_classes=2, vc_windows=(8,))
    m.add_video(pred, gt)
    s = m.summary()
    assert s["mIoU"] == 0.0 and s["pixel_acc"] == 0.0
    assert s["per_class_iou"] == {VSPW_CLASSES[0]: 0.0}  # class 1 only in pred: not in the mean
    assert s["mVC8"] == 100.0  # wrong but consistent
    assert m.vc_window_counts == {8: 1}


def test_class_only_in_prediction_not_in_mean():
    gt = np.array([[0, 0, 1, 1]], U8)
    pred = np.array([[0, 2, 1, 1]], U8)
    m = SegMetrics(num_classes=3, vc_windows=(2,))
    m.add_video([pred], [gt])
    s = m.summary()
    # class 0: TP 1, FN 1 -> 1/2; class 1: 2/2; class 2 (pred only) ignored
    assert s["per_class_iou"] == {"wall": 50.0, "ceiling": 100.0}
    assert s["mIoU"] == pytest.approx(75.0)
    assert s["pixel_acc"] == pytest.approx(75.0)


def test_ignore_pixels_excluded_from_iou():
    gt = np.array([[0, IGNORE_INDEX]], U8)
    pred = np.array([[0, 1]], U8)
    m = SegMetrics(num_classes=2)
    m.add_video([pred], [gt])
    s = m.summary()
    assert s["mIoU"] == 100.0 and s["pixel_acc"] == 100.0
    assert list(s["per_class_iou"]) == ["wall"]


def test_flickering_prediction_by_hand():
    # 4 pixels, T = 5, N = 2 -> windows i = 0, 1, 2 (frames 3-4 never form a window)
    gt = [np.zeros((1, 4), U8)] * 5
    pred = [np.array([[0, 0, 0, t % 2]], U8) for t in range(5)]  # last pixel flickers
    m = SegMetrics(num_classes=2, vc_windows=(2, 3))
    m.add_video(pred, gt)
    s = m.summary()
    assert m.vc_window_counts == {2: 3, 3: 2}
    assert s["mVC2"] == pytest.approx(75.0) and s["mVC3"] == pytest.approx(75.0)
    # a flicker only in the last frame is outside every window: the official stop-short
    pred2 = [np.zeros((1, 4), U8)] * 4 + [np.ones((1, 4), U8)]
    m2 = SegMetrics(num_classes=2, vc_windows=(2,))
    m2.add_video(pred2, gt)
    assert m2.summary()["mVC2"] == 100.0


def test_gt_changes_shrink_g():
    # pixel 0: gt changes at frame 1 -> not in G for windows covering frames 0-1
    gt = [np.array([[0, 1]], U8)] + [np.array([[1, 1]], U8)] * 3
    pred = [np.array([[0, 0]], U8)] + [np.array([[0, 1]], U8)] * 3
    m = SegMetrics(num_classes=2, vc_windows=(2,))
    m.add_video(pred, gt)
    # T = 4, N = 2 -> windows 0, 1. Window 0 (frames 0,1): G = {px1}, P = {px0} -> 0;
    # window 1 (frames 1,2): G = P = all -> 1
    assert m.summary()["mVC2"] == pytest.approx(50.0)
    assert m.vc_window_counts == {2: 2}


def test_short_videos_skipped_and_none():
    m = SegMetrics(num_classes=2)
    m.add_video([np.zeros((2, 2), U8)] * 8, [np.zeros((2, 2), U8)] * 8)  # T = N = 8
    s = m.summary()
    assert s["mVC8"] is None and s["mVC16"] is None
    assert m.vc_window_counts == {8: 0, 16: 0}
    json.dumps(s)  # JSON-safe: no NaN
    m.add_video([np.zeros((2, 2), U8)] * 9, [np.zeros((2, 2), U8)] * 9)
    s = m.summary()
    assert s["mVC8"] == 100.0 and s["mVC16"] is None
    assert s["videos"] == 2 and s["frames"] == 17


def test_empty_g_windows_skipped():
    # pixel 0 gt flickers every frame, pixel 1 ignored-but-stable: only video 2 has |G| > 0
    gt_a = [np.array([[t % 2]], U8) for t in range(4)]
    m = SegMetrics(num_classes=2, vc_windows=(2,))
    m.add_video(gt_a, gt_a)
    assert m.vc_window_counts == {2: 2} and m.summary()["mVC2"] is None
    gt_b = [np.zeros((1, 1), U8)] * 3
    pred_b = [np.array([[t % 2]], U8) for t in range(3)]
    m.add_video(pred_b, gt_b)
    assert m.summary()["mVC2"] == 0.0  # two windows of video b, both acc 0; a's skipped


def test_window_counts_are_t_minus_n_over_videos():
    m = SegMetrics(num_classes=2, vc_windows=(8, 16))
    for t in (5, 8, 9, 16, 17, 40):
        m.add_video([np.zeros((1, 1), U8)] * t, [np.zeros((1, 1), U8)] * t)
    assert m.vc_window_counts == {8: 1 + 8 + 9 + 32, 16: 1 + 24}


@pytest.mark.parametrize("seed", range(4))
def test_random_videos_match_official_loop_and_frame_api(seed):
    rng = np.random.default_rng(seed)
    videos = []
    for _ in range(3):
        T = int(rng.integers(3, 30))
        gts = [rng.choice(np.array([0, 1, 2, 255], U8), size=(6, 7), p=[.5, .2, .2, .1])
               for _ in range(T)]
        # mostly stable gt/pred so that G and P are not empty
        gts = [np.where(rng.random((6, 7)) < 0.9, gts[0], g).astype(U8) for g in gts]
        preds = [np.where(rng.random((6, 7)) < 0.85, np.minimum(g, 2), rng.integers(0, 3))
                 .astype(U8) for g in gts]
        videos.append((preds, gts))
    windows = (2, 4, 8)
    whole = SegMetrics(num_classes=3, vc_windows=windows)
    per_frame = SegMetrics(num_classes=3, vc_windows=windows)
    for preds, gts in videos:
        whole.add_video(preds, gts)
    # interleave the videos frame by frame
    longest = max(len(p) for p, _ in videos)
    for t in range(longest):
        for v, (preds, gts) in enumerate(videos):
            if t < len(preds):
                per_frame.add_frame(f"v{v}", preds[t], gts[t])
    a, b = whole.summary(), per_frame.summary()
    assert a.pop("per_class_iou") == b.pop("per_class_iou")
    assert a == pytest.approx(b)  # same windows; only the summation order differs
    assert whole.vc_window_counts == per_frame.vc_window_counts
    cm = sum(confusion_matrix(p, g, 3) for preds, gts in videos for p, g in zip(preds, gts))
    np.testing.assert_array_equal(whole.cm, cm)
    for n in windows:
        accs = [x for preds, gts in videos for x in _official_vc(gts, preds, n)]
        assert whole.vc_window_counts[n] == len(accs)
        accs = [x for x in accs if not np.isnan(x)]
        if accs:
            assert a[f"mVC{n}"] == pytest.approx(np.mean(accs) * 100)
        else:
            assert a[f"mVC{n}"] is None


def test_add_video_length_mismatch_and_size_change():
    m = SegMetrics(num_classes=2)
    with pytest.raises(ValueError, match="numbers"):
        m.add_video([np.zeros((1, 1), U8)] * 2, [np.zeros((1, 1), U8)] * 3)
    m.add_frame("v", np.zeros((2, 2), U8), np.zeros((2, 2), U8))
    with pytest.raises(ValueError, match="frame size"):
        m.add_frame("v", np.zeros((3, 2), U8), np.zeros((3, 2), U8))


def test_format_table():
    m = SegMetrics(num_classes=2, vc_windows=(8, 16))
    m.add_video([np.zeros((2, 2), U8)] * 10, [np.zeros((2, 2), U8)] * 10)
    text = format_table(m.summary())
    for word in ("mIoU", "pixel acc", "mVC8", "mVC16", "frames", "100.00", "n/a", "10"):
        assert word in text
