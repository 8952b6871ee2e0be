"""A Segmenter used in ways that would give wrong labels: shared between threads, used after
close(), fed empty frames or streams it does not have. Each is one clear error, or the right
labels; never another video's past."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from runtime_helpers import synthetic_frames
from tbn_runtime.segmenter import Segmenter, SegmenterError


@pytest.fixture(scope="module")
def videos():
    """Two different videos of 12 frames (the ring's past matters from frame 3 on)."""
    return synthetic_frames(12, 64, 96, seed=21), synthetic_frames(12, 64, 96, seed=22)


@pytest.fixture(scope="module")
def alone(export_dir, videos):
    """Each video's labels run alone, one after the other: what threads must get."""
    with Segmenter(export_dir, backend="ort", device="cpu") as seg:
        out = []
        for frames in videos:
            seg.reset()
            out.append([seg.segment(f) for f in frames])
    return out


def _closed(seg, frame):
    seg.close()
    seg.segment(frame)


def _reset_closed(seg, frame):
    seg.close()
    seg.reset()


@pytest.mark.parametrize("use, error, needles", [
    (_closed, SegmenterError, ("closed", "make a new Segmenter")),
    (_reset_closed, SegmenterError, ("closed",)),
    (lambda seg, f: seg.segment(f[:0]), ValueError, ("at least one pixel", "(0, 96, 3)")),
    (lambda seg, f: seg.segment(f[:, :0]), ValueError, ("at least one pixel",)),
    (lambda seg, f: seg.segment(None), ValueError, ("got None", "cv2.imread")),
    (lambda seg, f: seg.segment(f, stream=1), ValueError, ("one stream, 0", "streams=N")),
    (lambda seg, f: seg.segment_many([f, f], [0, 0]), ValueError, ("one frame per call",)),
])
def test_misuse_is_one_clear_error(export_dir, videos, use, error, needles):
    seg = Segmenter(export_dir, backend="ort", device="cpu")
    try:
        with pytest.raises(error) as e:
            use(seg, videos[0][0])
        text = str(e.value)
        assert "\n" not in text and all(n in text for n in needles), text
        assert "IndexError" not in text and "cv2" not in type(e.value).__module__
    finally:
        seg.close()
        seg.close()  # idempotent


def _in_turns(steps):
    """Run each thread's steps in the global order given: steps is [(thread, fn), ...]; every
    fn runs in its own thread, one after the other. Returns each thread's results and error."""
    names = sorted({t for t, _ in steps})
    turns = {t: [threading.Event() for _ in steps] for t in names}
    results = {t: [] for t in names}
    errors = {t: None for t in names}
    done = [threading.Event() for _ in steps]

    def worker(name):
        for i, (t, fn) in enumerate(steps):
            if t != name:
                continue
            turns[name][i].wait()
            try:
                if errors[name] is None:
                    results[name].append(fn())
            except Exception as e:  # noqa: BLE001 -- what the thread saw
                errors[name] = e
            done[i].set()
        # stay alive to the end: a live thread still owns its stream
        done[-1].wait()

    threads = {t: threading.Thread(target=worker, args=(t,), name=t) for t in names}
    for t in threads.values():
        t.start()
    for i, (t, _) in enumerate(steps):
        turns[t][i].set()
        assert done[i].wait(60)
    for t in threads.values():
        t.join(60)
    return results, errors


def test_two_threads_on_their_own_streams_get_their_own_labels(export_dir, videos, alone):
    """streams=2, one per thread, frames interleaved: each thread's labels are its video's
    as run alone."""
    with Segmenter(export_dir, backend="ort", device="cpu", streams=2) as seg:
        steps = [("a", lambda: seg.reset(0)), ("b", lambda: seg.reset(1))]
        for i in range(12):
            steps += [("a", lambda i=i: seg.segment(videos[0][i], 0)),
                      ("b", lambda i=i: seg.segment(videos[1][i], 1))]
        results, errors = _in_turns(steps)
    assert errors == {"a": None, "b": None}
    for k, t in enumerate("ab"):
        got = [r for r in results[t] if r is not None]
        assert len(got) == 12
        assert all(np.array_equal(g, r) for g, r in zip(got, alone[k]))


def test_two_threads_on_one_stream_never_mix_videos(export_dir, videos, alone):
    """One stream, two threads with a video each, frames interleaved: the thread that started
    its video last gets its own labels; the other gets SegmenterError, not a mix."""
    with Segmenter(export_dir, backend="ort", device="cpu") as seg:
        steps = [("a", seg.reset)] + [("a", lambda i=i: seg.segment(videos[0][i]))
                                      for i in range(4)]
        steps += [("b", seg.reset)]
        for i in range(12):
            steps += [("b", lambda i=i: seg.segment(videos[1][i])),
                      ("a", lambda i=i: seg.segment(videos[0][4 + i % 8]))]
        results, errors = _in_turns(steps)
    assert isinstance(errors["a"], SegmenterError), errors["a"]
    assert "'b'" in str(errors["a"]) and "own Segmenter" in str(errors["a"])
    a = [r for r in results["a"] if r is not None]
    assert len(a) == 4 and all(np.array_equal(g, r) for g, r in zip(a, alone[0]))
    assert errors["b"] is None
    b = [r for r in results["b"] if r is not None]
    assert len(b) == 12 and all(np.array_equal(g, r) for g, r in zip(b, alone[1]))


def test_a_thread_cannot_continue_another_live_threads_video(export_dir, videos):
    """No reset(): the second thread's frame would take the first thread's video as its
    past; it is refused instead."""
    with Segmenter(export_dir, backend="ort", device="cpu") as seg:
        steps = [("a", lambda: seg.segment(videos[0][0])),
                 ("b", lambda: seg.segment(videos[1][0]))]
        _, errors = _in_turns(steps)
    assert errors["a"] is None and isinstance(errors["b"], SegmenterError)
    assert "stream 0" in str(errors["b"]) and "reset(stream)" in str(errors["b"])
