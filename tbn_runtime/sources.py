"""Frame sources: a video file, a folder (of videos, VSPW frame folders or images), a VSPW
split list (ROOT/val.txt), a camera index, or a stream URL. Each source yields videos; each
video yields (frame_name, frame_bgr).

    for video in open_source("clip.mp4"):
        for name, frame in video.frames(): ...

Frames of a video file or stream are named by their index with 8 digits (00000000, 00000001,
...), as VSPW and tbn-synth name theirs, so masks written for a dataset's videos line up with
its frames; image folders keep their files' names.

`Video.frames()` raises SourceError if the video turns out to be empty, or breaks off before
the frame count its container announces (truncated); frames already yielded stay valid.
`tbn_runtime.decoder.ReadAhead` decodes videos ahead in a thread.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .errors import TbnError
from .files import UnsafePathError, inside

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".ts")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class SourceError(TbnError, RuntimeError):
    """A source that cannot be read; the message names it and says what went wrong."""


@dataclass
class Video:
    """One video of a source: a name (its output folder), how frames are named, the frames."""
    name: str
    kind: str                      # "file", "frames", "camera", "url"
    origin: str                    # path, camera index or URL
    fps: float = 25.0
    count: Optional[int] = None    # frames announced by the container (None: unknown/endless)
    _frames: Callable[[], Iterator[Tuple[str, np.ndarray]]] = field(repr=False, default=None)

    def frames(self) -> Iterator[Tuple[str, np.ndarray]]:
        return self._frames()


def _natural_key(s: str) -> List[object]:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", s)]


def _capture(origin, what: str) -> "cv2.VideoCapture":
    cap = cv2.VideoCapture(origin)
    if not cap.isOpened():
        cap.release()
        raise SourceError(what)
    return cap


def frame_name(index: int) -> str:
    """The name of frame `index` of a video file or stream: 8 digits, as VSPW's frames."""
    return f"{index:08d}"


def _capture_frames(cap: "cv2.VideoCapture", origin: str, count: Optional[int],
                    first: int = 0) -> Iterator[Tuple[str, np.ndarray]]:
    """Frames of an open capture positioned at frame `first`, named by frame_name; checks
    emptiness and truncation."""
    n = first
    try:
        while True:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            yield frame_name(n), frame
            n += 1
    finally:
        cap.release()
    if n == first:
        raise SourceError(f"{origin}: the video has no frames" +
                          (f" from frame {first} on" if first else " (empty)"))
    if count is not None and n < count:
        raise SourceError(f"{origin}: the video breaks off at frame {n} of {count} (truncated); "
                          f"the masks of frames {first}..{n - 1} were written")


def _open_file(path: str) -> "cv2.VideoCapture":
    return _capture(path, f"{path}: cannot open as a video (not a video, or damaged/truncated)")


def _video_file(path: str, name: Optional[str] = None) -> Video:
    if os.path.getsize(path) == 0:
        raise SourceError(f"{path}: the file is empty (0 bytes)")
    cap = _open_file(path)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    return Video(name or os.path.splitext(os.path.basename(path))[0], "file", path, float(fps),
                 count if count > 0 else None,
                 lambda: _capture_frames(cap, path, count if count > 0 else None))


def _image_frames(files: List[str]) -> Iterator[Tuple[str, np.ndarray]]:
    for path in files:
        frame = cv2.imread(path, cv2.IMREAD_COLOR)
        if frame is None:
            raise SourceError(f"{path}: cannot read the image (not an image, or damaged)")
        yield os.path.splitext(os.path.basename(path))[0], frame


def _entry(folder: str, name: str) -> str:
    """folder/name for an entry of a folder the user gave, refused (SourceError) where a
    symbolic link leads outside the folder (files.inside)."""
    try:
        return inside(folder, name, f"{folder}: entry")
    except UnsafePathError as e:
        raise SourceError(str(e)) from None


def _image_files(folder: str) -> List[str]:
    """The images of a folder in natural order (frame_2 before frame_10)."""
    return sorted((_entry(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")),
                  key=lambda p: _natural_key(os.path.basename(p)))


def _image_folder(folder: str, name: str) -> Optional[Video]:
    files = _image_files(folder)
    if not files:
        return None
    by_name: dict = {}
    for path in files:  # f.png and f.jpg would both write the labels of frame f
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in by_name:
            raise SourceError(f"{folder}: {os.path.basename(by_name[stem])} and "
                              f"{os.path.basename(path)} are both frame '{stem}' (one label "
                              f"file per frame name); remove or rename one")
        by_name[stem] = path
    return Video(name, "frames", folder, 25.0, len(files), lambda: _image_frames(files))


def _folder(path: str) -> List[Video]:
    path = os.path.normpath(path)
    base = os.path.basename(os.path.abspath(path))
    if os.path.isdir(os.path.join(path, "origin")):          # one VSPW video folder
        v = _image_folder(os.path.join(path, "origin"), base)
        return [v] if v else []
    root = os.path.join(path, "data") if os.path.isdir(os.path.join(path, "data")) else path
    entries = sorted(os.listdir(root), key=_natural_key)
    vspw = [e for e in entries if os.path.isdir(os.path.join(root, e, "origin"))]
    if vspw:                                                   # VSPW root or its data/ folder
        videos = [_image_folder(os.path.join(_entry(root, e), "origin"), e) for e in vspw]
        return [v for v in videos if v is not None]
    files = [e for e in entries if not e.startswith(".")]
    vids = [e for e in files if e.lower().endswith(VIDEO_EXTS)]
    if vids:                                                   # a folder of video files
        return [_lazy_video(_entry(path, e)) for e in vids]
    v = _image_folder(path, base)                              # a folder of images
    return [v] if v else []


def _lazy_video(path: str) -> Video:
    """A video of a folder, decoded only when its turn comes (one decoder open at a time); its
    frame rate and frame count are read now, the capture closed again. A file that does not
    open now fails when its turn comes, with its reason, and the folder's others go on."""
    name = os.path.splitext(os.path.basename(path))[0]
    fps, count = 25.0, None
    cap = cv2.VideoCapture(path)
    try:
        if cap.isOpened():
            rate, n = cap.get(cv2.CAP_PROP_FPS), int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            fps, count = (float(rate) if 0 < rate < 1000 else 25.0), (n if n > 0 else None)
    finally:
        cap.release()

    def frames() -> Iterator[Tuple[str, np.ndarray]]:
        yield from _video_file(path, name).frames()
    return Video(name, "file", path, fps, count, frames)


def _stream(origin, name: str, kind: str, what: str) -> Video:
    cap = _capture(origin, what)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    return Video(name, kind, str(origin), float(fps) if 0 < fps < 1000 else 25.0, None,
                 lambda: _capture_frames(cap, str(origin), None))


def _split_list(path: str) -> List[Video]:
    """The videos a VSPW split file (ROOT/val.txt: one video folder name per line) lists."""
    root = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read the split list ({e})") from e
    videos = []
    for line, name in enumerate(names, 1):
        if not name:
            continue
        try:  # a downloaded split list must not reach outside ROOT/data (../../x, /abs)
            folder = os.path.join(inside(os.path.join(root, "data"), name,
                                         f"{path} line {line}"), "origin")
        except UnsafePathError as e:
            raise SourceError(f"{e} (a split list names video folders of ROOT/data/, one "
                              f"per line): fix or remove the line") from None
        v = _image_folder(folder, name) if os.path.isdir(folder) else None
        if v is None:
            raise SourceError(f"{path} lists '{name}' but {folder} holds no frames; a split "
                              f"list names video folders of ROOT/data/<video>/origin/")
        videos.append(v)
    if not videos:
        raise SourceError(f"{path}: the split list names no videos")
    return videos


def open_source(source: str) -> List[Video]:
    """The videos of a source; raises SourceError with one line when it cannot be used."""
    source = str(source)
    if source.isdigit():
        index = int(source)
        return [_stream(index, f"camera{index}", "camera",
                        f"camera {index} does not open (no such camera, in use, or no "
                        f"permission)")]
    if _URL.match(source):
        tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.split("://", 1)[1].rstrip("/"))
        name = tail.rsplit("_", 1)[-1] or "stream"
        return [_stream(source, os.path.splitext(name)[0] or "stream", "url",
                        f"{source}: the stream does not open (unreachable, or not a video "
                        f"stream OpenCV's FFmpeg can read)")]
    if not os.path.exists(source):
        if os.path.islink(source):  # a loop, or a link whose target is gone
            try:
                os.stat(source)
                why = "it leads nowhere"
            except OSError as e:
                why = e.strerror or str(e)
            raise SourceError(f"{source}: a symbolic link that does not lead to a file or "
                              f"folder ({why}); point it at a video or a folder")
        raise SourceError(f"{source}: no such file or folder")
    if os.path.isdir(source):
        videos = _folder(source)
        if not videos:
            raise SourceError(f"{source}: the folder holds no videos, VSPW <video>/origin/ "
                              f"frame folders or images")
        return videos
    if source.lower().endswith(".txt"):
        return _split_list(source)
    if source.lower().endswith(IMAGE_EXTS):
        v = Video(os.path.splitext(os.path.basename(source))[0], "frames", source, 25.0, 1,
                  lambda: _image_frames([source]))
        return [v]
    return [_video_file(source)]


def videos_of(source: Union[str, "os.PathLike[str]", Sequence[Video]]) -> List[Video]:
    """The videos of a source (see open_source), or of a list of Video as given."""
    if isinstance(source, (str, os.PathLike)):
        return open_source(os.fspath(source))
    return list(source)


def _seek(cap: "cv2.VideoCapture", index: int) -> None:
    """Position a capture at frame `index`. OpenCV's FFmpeg reader seeks to the keyframe before
    and decodes forward to the frame whose timestamp is index / fps: frame-exact for constant
    frame rate files, not necessarily for variable frame rate ones (tbn_runtime.cluster checks)."""
    cap.set(cv2.CAP_PROP_POS_FRAMES, index)


def frames_from(kind: str, origin: str, start: int,
                exact: bool = False) -> Iterator[Tuple[str, np.ndarray]]:
    """Frames start, start+1, ... to the end of a video file or a frame folder (a Video's kind
    and origin), named as Video.frames() names them: one chunk of a long video, read on its own.

    Video files seek (`_seek`); exact=True decodes from frame 0 instead, skipping the BGR
    conversion of the frames before `start` (grab()): slower, and exact for every file.
    """
    if kind == "frames":
        files = _image_files(origin) if os.path.isdir(origin) else [origin]
        return _image_frames(files[start:])
    if kind != "file":
        raise SourceError(f"{origin}: a live {kind} cannot be read from frame {start}")
    cap = _open_file(origin)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if start and exact:
        for _ in range(start):
            if not cap.grab():
                break
    elif start:
        _seek(cap, start)
    return _capture_frames(cap, origin, count if count > 0 else None, first=start)
