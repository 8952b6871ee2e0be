"""COCO run-length encoding of label maps (numpy only), as pycocotools writes it.

A binary mask is flattened in column-major (Fortran) order and stored as the lengths of its
alternating runs, starting with a run of zeros (possibly empty). The compressed form is
pycocotools' string: each count (from the fourth on, as the difference to the count two before)
in 5-bit groups, least significant first, 0x20 marking "more groups follow", offset by 48 into
printable ASCII. Annotation tools (pycocotools, CVAT, FiftyOne, Label Studio's COCO import)
read it as {"size": [height, width], "counts": "<string>"}.

    rle = encode(labels == k)          # {"size": [h, w], "counts": "..."}
    mask = decode(rle)                 # bool h x w, equal to labels == k
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def run_lengths(mask: np.ndarray) -> List[int]:
    """Lengths of the alternating 0/1 runs of a 2-D mask in column-major order, zeros first."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return counts


def counts_to_string(counts: Sequence[int]) -> str:
    """pycocotools' compressed string of a count list (rleToString)."""
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences keep their sign
            more = x != -1 if ch & 0x10 else x != 0
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def string_to_counts(s: str) -> List[int]:
    """The count list of a pycocotools compressed string (rleFrString)."""
    counts: List[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("truncated RLE string")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> Dict[str, object]:
    """{"size": [h, w], "counts": str} of a 2-D boolean mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be H x W, got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])],
            "counts": counts_to_string(run_lengths(mask))}


def decode(rle: Dict[str, object]) -> np.ndarray:
    """The boolean H x W mask of an RLE dict (compressed string or a list of counts)."""
    h, w = (int(v) for v in rle["size"])  # type: ignore[union-attr]
    counts = rle["counts"]
    counts = string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if sum(counts) != h * w or any(c < 0 for c in counts):
        raise ValueError(f"RLE counts cover {sum(counts)} pixels, the size {h}x{w} has {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((h, w), order="F")


def bbox(mask: np.ndarray) -> List[int]:
    """[x, y, width, height] of a non-empty mask's bounding box (COCO's bbox)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]
