"""What a corpus run does without Ray: the plan of chunks, one chunk's work (run_chunk, the
ChunkWorker actor's body), the markers that say a chunk is complete, the check that a chunk's
seek landed where it should, and the join of coco-rle parts. See tbn_runtime.cluster."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..driver import Job, drive
from ..files import atomic_write_text
from ..outputs import MaskOutput
from ..segmenter import Segmenter
from ..sources import SourceError, Video, frames_from, open_source

#: frames per chunk: a chunk costs max(offsets) extra feature passes and one seek (decoding
#: from the keyframe before it), about 1% here; smaller chunks share a long video out wider
DEFAULT_CHUNK_FRAMES = 1000
STATE_DIR = ".tbn-cluster"


@dataclass(frozen=True)
class Chunk:
    """Frames start .. end - 1 of one video (end None: to the end of the video)."""
    video: str                # output name
    kind: str                 # "file" or "frames" (a Video's kind)
    origin: str               # the video file or frame folder, absolute
    start: int
    end: Optional[int]
    lead: int = 0             # frames before start pushed through the feature engine only
    tail: int = 0             # last frames whose digests the next chunk's lead must match
    # how, not which: left out of equality, so a chunk read again exactly is the same chunk
    exact: bool = field(default=False, compare=False)   # decode from frame 0, not seek
    size: int = field(default=0, compare=False)         # expected frames (order, progress)

    @property
    def key(self) -> str:
        return f"{self.start:08d}"


def plan_video(video: Video, chunk_frames: int, history: int) -> List[Chunk]:
    """The chunks of one video (chunk_frames 0: the whole video as one). history:
    max(temporal offsets), at least 1 (so that an image-only model's chunks still overlap by a
    frame for the seek check). Raises SourceError for live streams and unreadable files."""
    if video.kind not in ("file", "frames"):
        raise SourceError(f"{video.origin}: a live {video.kind} is one sequence that cannot be "
                          f"shared out; run tbn-run on it without --ray")
    origin = os.path.abspath(video.origin)
    count = video.count or (open_source(origin)[0].count if video.kind == "file" else 0)
    if not chunk_frames or not count or count <= chunk_frames:
        return [Chunk(video.name, video.kind, origin, 0, None, size=count or 0)]
    starts = list(range(0, count, chunk_frames))
    ends: List[Optional[int]] = [*starts[1:], None]
    return [Chunk(video.name, video.kind, origin, s, e, lead=min(s, history),
                  tail=history if e is not None else 0, size=(e or count) - s)
            for s, e in zip(starts, ends)]


# -- on disk -------------------------------------------------------------------------------------
def state_dir(out_dir: str, video: str) -> str:
    """The hidden folder of a video's chunk markers (and coco-rle parts)."""
    return os.path.join(out_dir, STATE_DIR, video)


def marker_path(out_dir: str, chunk: Chunk) -> str:
    return os.path.join(state_dir(out_dir, chunk.video), chunk.key + ".json")


def part_output(out_dir: str, chunk: Chunk, classes: Sequence[str] = ()) -> MaskOutput:
    """Where a chunk's coco-rle part goes: <state>/<start>.coco/<video>.json."""
    return MaskOutput(os.path.join(state_dir(out_dir, chunk.video), chunk.key + ".coco"),
                      "coco-rle", classes)


def read_marker(out_dir: str, chunk: Chunk, fmt: str, model: str) -> Optional[Dict[str, Any]]:
    """The marker of a complete chunk, or None (absent, damaged, from another plan, model or
    format, or its coco-rle part gone)."""
    try:
        with open(marker_path(out_dir, chunk)) as f:
            m = json.load(f)
        ok = (m["start"] == chunk.start and m["model"] == model and m["format"] == fmt
              and (chunk.end is None or m["end"] == chunk.end))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if ok and fmt == "coco-rle":
        ok = part_output(out_dir, chunk).video_complete(chunk.video)
    return m if ok else None


def join_coco(out_dir: str, chunks: Sequence[Chunk]) -> None:
    """Join the coco-rle parts of a video's chunks into OUT/<video>.json (the document a single
    run writes: image and annotation ids renumbered in frame order), then drop the parts."""
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    doc: Dict[str, Any] = {}
    for c in sorted(chunks, key=lambda c: c.start):
        with open(part_output(out_dir, c).path(c.video)) as f:
            doc = json.load(f)
        ids = {}
        for img in doc["images"]:
            ids[img["id"]] = len(images) + 1
            images.append({**img, "id": len(images) + 1})
        for ann in doc["annotations"]:
            annotations.append({**ann, "id": len(annotations) + 1,
                                "image_id": ids[ann["image_id"]]})
    doc.update(images=images, annotations=annotations)
    atomic_write_text(MaskOutput(out_dir, "coco-rle").path(chunks[0].video),
                      json.dumps(doc, separators=(",", ":")) + "\n")
    for c in chunks:
        shutil.rmtree(os.path.dirname(part_output(out_dir, c).path(c.video)), ignore_errors=True)


# -- one chunk -----------------------------------------------------------------------------------
def _digest(frame: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(frame).data, digest_size=16).hexdigest()


def run_chunk(seg: Segmenter, chunk: Chunk, out_dir: str, fmt: str, model: str) -> Dict[str, Any]:
    """Segment one chunk into out_dir through the stream driver (its lead frames to the
    feature engine only), then write its marker; returns the marker.
    Raises SourceError when the video cannot be read (no marker then)."""
    first = chunk.start - chunk.lead
    video = Video(chunk.video, chunk.kind, chunk.origin,
                  _frames=lambda: frames_from(chunk.kind, chunk.origin, first, chunk.exact))
    out = (part_output(out_dir, chunk, seg.classes) if fmt == "coco-rle"
           else MaskOutput(out_dir, fmt, seg.classes))
    lead: Dict[int, str] = {}
    tail: Dict[int, str] = {}

    def digest(job: Job, i: int, frame: np.ndarray, labels: Optional[np.ndarray]) -> None:
        if labels is None:
            lead[i] = _digest(frame)
        elif chunk.end is not None and i >= chunk.end - chunk.tail:
            tail[i] = _digest(frame)

    job = Job(video, first=first, lead=chunk.lead,
              frames=None if chunk.end is None else chunk.end - first)
    result = drive(seg, [job], out, on_frame=digest)
    if result.failed:
        raise SourceError(result.failed[chunk.video])
    frames = result.inferred
    if frames == 0:
        raise SourceError(f"{chunk.origin}: no frames from frame {chunk.start} on")
    marker = {"video": chunk.video, "start": chunk.start, "end": chunk.start + frames,
              "frames": frames, "seconds": round(result.wall_s, 4),
              "fps": round(frames / result.wall_s, 3) if result.wall_s > 0 else None,
              "node": socket.gethostname(), "pid": os.getpid(), "backend": seg.describe(),
              "read": "decoded from frame 0" if chunk.exact else "seek", "format": fmt,
              "model": model, "lead": sorted(lead.items()), "tail": sorted(tail.items())}
    atomic_write_text(marker_path(out_dir, chunk), json.dumps(marker) + "\n")
    return marker


def seek_mismatches(markers: Sequence[Dict[str, Any]]) -> bool:
    """True if a chunk's lead frames differ from its predecessor's last frames (its seek landed
    elsewhere) or the chunks leave a gap. markers: every chunk of one video."""
    by_start = sorted(markers, key=lambda m: m["start"])
    for a, b in zip(by_start, by_start[1:]):
        seen, want = dict(map(tuple, a["tail"])), dict(map(tuple, b["lead"]))
        common = set(seen) & set(want)
        if a["end"] != b["start"] or not common or any(seen[i] != want[i] for i in common):
            return True
    return False


class ChunkWorker:
    """The Ray actor's class (run_corpus wraps it with ray.remote): a Segmenter loaded once,
    then chunk after chunk."""

    def __init__(self, export: str, backend: str, device: Optional[str], out_dir: str,
                 fmt: str, model: str, threads: Optional[int] = None) -> None:
        from ..backends import BackendError
        from ..manifest import ManifestError

        self.out_dir, self.fmt, self.model = out_dir, fmt, model
        self.seg: Optional[Segmenter] = None
        self.error: Optional[str] = None
        try:
            # a CPU worker's engines use its own cores, not the whole node's
            self.seg = Segmenter(export, backend=backend, device=device, threads=threads)
        except (ManifestError, BackendError) as e:  # said by ready(): no restart loop
            self.error = str(e)

    def ready(self) -> Dict[str, Any]:
        return {"node": socket.gethostname(), "pid": os.getpid(), "error": self.error,
                "backend": self.seg.describe() if self.seg else None}

    def run(self, chunk: Chunk) -> Dict[str, Any]:
        args = (self.seg, chunk, self.out_dir, self.fmt, self.model)
        try:
            try:
                return run_chunk(*args)
            except SourceError:
                if not chunk.start or chunk.exact:
                    raise
                # a seek that lands late runs out of frames before the end: decode from frame 0
                return run_chunk(self.seg, replace(chunk, exact=True), *args[2:])
        except (SourceError, OSError) as e:  # the video's or the output's fault: not retried
            return {"video": chunk.video, "start": chunk.start, "error": str(e)}
