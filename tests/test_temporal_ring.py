"""The past-frame rule and the feature ring in tbn_runtime.temporal."""

import numpy as np
import pytest

from tbn_runtime.temporal import FeatureRing, RingIndex, clip_indices, past_indices


def test_past_indices():
    assert past_indices(20, (3, 6, 9)) == [17, 14, 11]
    assert past_indices(4, (3, 6, 9)) == [1, 0, 0]
    assert past_indices(0, (3, 6, 9)) == [0, 0, 0]
    assert past_indices(9, (9, 3)) == [0, 6]  # offsets order kept


def test_clip_indices():
    assert clip_indices(20, (3, 6, 9)) == [11, 14, 17, 20]
    assert clip_indices(4, (3, 6, 9)) == [0, 0, 1, 4]
    assert clip_indices(0, (3, 6, 9)) == [0, 0, 0, 0]
    assert clip_indices(20, (9, 3, 6)) == [11, 14, 17, 20]


def test_ring_index_first_frames():
    r = RingIndex((3, 6, 9))
    assert r.capacity == 10 and r.frame == -1
    with pytest.raises(RuntimeError):
        r.past_slots()
    assert r.next_frame() == 0 and r.frame == 0
    assert r.past_slots() == [0, 0, 0]
    for t in range(1, 10):
        assert r.next_frame() == t
        assert r.past_slots() == past_indices(t, (3, 6, 9))  # no wrap yet: slot == frame
    assert r.next_frame() == 0 and r.frame == 10  # frame 10 overwrites frame 0's slot
    assert r.past_slots() == [7, 4, 1]


def _run_against_reference(ring, offsets, frames):
    history = []  # brute force: every frame kept
    for t in range(frames):
        target = ring.write_target()
        target[...] = t
        history.append(t)
        assert ring.frame == t
        got = [int(s[0]) for s in ring.past()]
        want = [history[i] for i in past_indices(t, offsets)]
        assert got == want, (t, got, want)


@pytest.mark.parametrize("offsets", [(3, 6, 9), (1,), (2, 5), (0, 4)])
def test_feature_ring_wraparound_matches_reference(offsets):
    cap = max(offsets) + 1
    slots = [np.full(1, -1, np.int64) for _ in range(cap)]
    ring = FeatureRing(slots, offsets)
    assert ring.capacity == cap
    _run_against_reference(ring, offsets, 537)
    ring.reset()  # a new video: past frames clamp to the new video's frame 0
    assert ring.frame == -1
    _run_against_reference(ring, offsets, 23)


def test_reset_mid_video_does_not_leak_old_frames():
    slots = [np.full(1, -1, np.int64) for _ in range(10)]
    ring = FeatureRing(slots)
    for t in range(15):
        ring.write_target()[...] = 1000 + t
    ring.reset()
    ring.write_target()[...] = 0
    assert [int(s[0]) for s in ring.past()] == [0, 0, 0]
    for t in range(1, 4):
        ring.write_target()[...] = t
    assert [int(s[0]) for s in ring.past()] == [0, 0, 0]  # t=3 -> frames 0, 0, 0
    ring.write_target()[...] = 4
    assert [int(s[0]) for s in ring.past()] == [1, 0, 0]


def test_feature_ring_validates_storage():
    with pytest.raises(ValueError, match="10"):
        FeatureRing([object()] * 9, (3, 6, 9))
    with pytest.raises(ValueError):
        RingIndex(())
    with pytest.raises(ValueError):
        RingIndex((3, -1))
