"""tbn-run: stream a video, a folder, a camera or a URL through an exported TBN-ViT.

    tbn-run SOURCE --out masks/ [--model runs/tbn/export] [--backend auto|trt|ort|torch]
            [--device cpu|cuda] [--overlay F.mp4] [--stats F.json] [--overwrite] [--resume]
            [--max-frames N]

Also `python -m tbn_runtime ...`. Every user mistake ends with one `tbn-run: error: ...` line
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

# OpenCV and FFmpeg print their own warnings for a missing camera or a broken file; tbn-run
# says it in one line instead (set these variables yourself to see them).
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

from .backends import BACKENDS, BackendError, select_backend
from .files import atomic_write
from .manifest import ManifestError, load_manifest
from .sources import SourceError, open_source
from .stream import StreamError, has_masks, run_stream, summary_line

PROG = "tbn-run"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Video scene parsing with an exported TBN-ViT: writes one palette PNG of "
                    "VSPW train ids per frame to OUT/<video>/<frame>.png.",
        epilog="SOURCE: a video file; a folder of videos, of VSPW <video>/origin/*.jpg frame "
               "folders, or of images; a camera index (0); an rtsp:// or http:// URL. "
               "--resume skips frames whose mask is already complete; the feature engine still "
               "runs on them, because the frames after need their features.")
    p.add_argument("source", metavar="SOURCE", help="video, folder, camera index or URL")
    p.add_argument("--out", required=True, help="output folder for the masks")
    p.add_argument("--model", default=os.path.join("runs", "tbn", "export"),
                   help="export directory made by tbn-export (default: runs/tbn/export)")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS,
                   help="auto: trt if engines + TensorRT + GPU, else ort (CUDA, then CPU), "
                        "else torch")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="default: the best the backend finds")
    p.add_argument("--overlay", metavar="FILE.mp4", help="also write a colour-blended video")
    p.add_argument("--stats", metavar="FILE.json", help="write per-stage timings, fps, peak RSS")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an output folder that already holds masks")
    p.add_argument("--resume", action="store_true",
                   help="keep complete masks already in --out and do the rest")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames in all")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_frames is not None and args.max_frames < 1:
        return _fail("--max-frames must be at least 1")
    if args.overwrite and args.resume:
        return _fail("--overwrite and --resume exclude each other")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return _fail(f"--out {args.out} exists and is not a folder")
    if has_masks(args.out) and not (args.overwrite or args.resume):
        return _fail(f"{args.out} already holds masks; pass --overwrite to replace them or "
                     f"--resume to finish an interrupted run")
    backend = None
    try:
        videos = open_source(args.source)
        manifest = load_manifest(args.model)
        cls, device, why = select_backend(args.backend, manifest, args.device, args.model)
        print(f"{PROG}: backend {why}", file=sys.stderr)
        backend = cls(args.model, manifest, device)
        stats = run_stream(videos, backend, args.out, overlay_path=args.overlay,
                           resume=args.resume, max_frames=args.max_frames,
                           progress=not args.no_progress)
        stats["source"] = args.source
        stats["model"] = os.path.abspath(args.model)
        if args.stats:
            text = json.dumps(stats, indent=2) + "\n"

            def write(tmp: str) -> None:
                with open(tmp, "w") as f:
                    f.write(text)
            atomic_write(args.stats, write)
        print(summary_line(stats, args.out))
        return 0
    except (SourceError, ManifestError, BackendError, StreamError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.filename + ': ' if getattr(e, 'filename', None) else ''}"
                     f"{e.strerror or e}")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; masks written so far are complete (--resume continues)",
              file=sys.stderr)
        return 130
    finally:
        if backend is not None:
            backend.close()


if __name__ == "__main__":
    sys.exit(main())
