"""The past-frame rule, in one place for the whole project (no torch).

Frame t is classified together with the features of frames t - k for k in `offsets` (the paper
uses (3, 6, 9)). Before the start of a video the index clamps to the first frame:
max(t - k, 0). Training clips, evaluation, the PyTorch reference, the exported engines and the
runtime all use these functions, so their outputs can be compared pixel for pixel.
"""

from __future__ import annotations

from typing import Generic, List, Sequence, Tuple, TypeVar

DEFAULT_OFFSETS: Tuple[int, ...] = (3, 6, 9)

T = TypeVar("T")


def _check_offsets(offsets: Sequence[int]) -> Tuple[int, ...]:
    offsets = tuple(int(k) for k in offsets)
    if not offsets:
        raise ValueError("offsets must not be empty")
    if any(k < 0 for k in offsets):
        raise ValueError(f"offsets must be >= 0, got {offsets}")
    return offsets


def past_indices(t: int, offsets: Sequence[int] = DEFAULT_OFFSETS) -> List[int]:
    """Indices of the past frames of frame t: [max(t - k, 0) for k in offsets], offsets order."""
    return [max(t - k, 0) for k in _check_offsets(offsets)]


def clip_indices(t: int, offsets: Sequence[int] = DEFAULT_OFFSETS) -> List[int]:
    """The frames of the clip ending at t, oldest first, t last.

    For offsets (3, 6, 9): t=20 -> [11, 14, 17, 20]; t=4 -> [0, 0, 1, 4].
    """
    ks = sorted(_check_offsets(offsets), reverse=True)
    return [max(t - k, 0) for k in ks] + [t]


class RingIndex:
    """Index logic of a ring of feature slots, independent of the storage.

    Frame t is written to slot t % capacity, with capacity = max(offsets) + 1, so the slots of
    the frames past_indices(t, offsets) are still intact when frame t is processed (for t below
    max(offsets) the clamped index 0 points at frame 0, which has not been overwritten yet).

    Per frame: call `next_frame()` (the slot to write the current frame's feature into), write,
    then read `past_slots()`. Call `reset()` at the start of each new video.
    """

    def __init__(self, offsets: Sequence[int] = DEFAULT_OFFSETS) -> None:
        self.offsets: Tuple[int, ...] = _check_offsets(offsets)
        self.capacity: int = max(self.offsets) + 1
        self._frame = -1

    @property
    def frame(self) -> int:
        """Index of the current frame within the video; -1 before the first `next_frame()`."""
        return self._frame

    def reset(self) -> None:
        """Start a new video: the next `next_frame()` is frame 0."""
        self._frame = -1

    def slot_of(self, t: int) -> int:
        """The slot that holds (or will hold) frame t's feature."""
        return t % self.capacity

    def next_frame(self) -> int:
        """Advance to the next frame and return the slot its feature is written to."""
        self._frame += 1
        return self.slot_of(self._frame)

    def past_slots(self) -> List[int]:
        """Slots of frames past_indices(frame, offsets), in offsets order."""
        if self._frame < 0:
            raise RuntimeError("past_slots() called before next_frame()")
        return [self.slot_of(i) for i in past_indices(self._frame, self.offsets)]


class FeatureRing(Generic[T]):
    """A ring of per-slot buffers supplied by a backend (numpy arrays, tensors, device pointers).

    `storage` must hold exactly `max(offsets) + 1` buffers. The ring never copies: it hands out
    the buffer to write the current frame into and the buffers of the past frames.
    """

    def __init__(self, storage: Sequence[T], offsets: Sequence[int] = DEFAULT_OFFSETS) -> None:
        self.index = RingIndex(offsets)
        if len(storage) != self.index.capacity:
            raise ValueError(
                f"storage has {len(storage)} slots, offsets {self.index.offsets} "
                f"need {self.index.capacity}")
        self.storage = storage

    @property
    def capacity(self) -> int:
        """Number of slots: max(offsets) + 1."""
        return self.index.capacity

    @property
    def frame(self) -> int:
        """Index of the current frame within the video; -1 before the first write_target()."""
        return self.index.frame

    def reset(self) -> None:
        """Start a new video."""
        self.index.reset()

    def write_target(self) -> T:
        """Advance to the next frame and return the buffer its feature must be written into."""
        return self.storage[self.index.next_frame()]

    def past(self) -> List[T]:
        """Buffers holding the features of past_indices(frame, offsets), in offsets order."""
        return [self.storage[s] for s in self.index.past_slots()]
