"""tbn-run: stream a video, a folder, a camera or a URL through an exported TBN-ViT.

    tbn-run SOURCE --out DIR [--model EXPORT] [--backend auto|trt|ort|torch] [--device cpu|cuda]
            [--format png|npy|coco-rle] [--overlay F.mp4] [--stats F.json]
            [--overwrite | --resume] [--max-frames N] [-v | -q] [--no-progress]
            [--ray [ADDRESS] [--chunk-frames F] [--workers N] [--cpus-per-worker C]]

Also `python -m tbn_runtime ...`. The command is tbn_runtime.Segmenter plus
tbn_runtime.stream.run_stream; what it adds is the care a command owes its user: a lock on
--out (a second run into it is refused, naming the holder), every destination checked before
the first frame, temporaries of killed runs swept, SIGTERM and Ctrl-C stopping cleanly with
every written mask complete, and each mistake reported as one `tbn-run: error: ...` line with a
non-zero exit code, never a traceback (tbn_runtime.console.run_command: 2 a mistake found before
any work, 1 a video that failed while the others went on, 130/143 Ctrl-C/SIGTERM). Only
argparse is imported before --help is answered.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from typing import List, Optional

from .console import (DefaultsFormatter, OneLineParser, add_verbosity_flags, run_command,
                      setup_logging)

PROG = "tbn-run"
log = logging.getLogger("tbn_runtime")


def build_parser() -> argparse.ArgumentParser:
    """tbn-run's flags (long: one declaration after another, in --help's order)."""
    p = OneLineParser(
        prog=PROG, formatter_class=DefaultsFormatter,
        description="Video scene parsing with an exported TBN-ViT: one label (VSPW train id) per "
                    "pixel of every frame, written to OUT/<video>/<frame>.png (or .npy, or "
                    "OUT/<video>.json).",
        epilog="SOURCE: a video file; a folder of videos, of VSPW <video>/origin/*.jpg frame "
               "folders, or of images; a VSPW split list (ROOT/val.txt); a camera index (0); "
               "an rtsp:// or http:// URL. Frames of video files are named 00000000, 00000001, "
               "... as VSPW's, so `tbn-eval --pred OUT --data ROOT` scores the masks of a "
               "dataset's videos.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="video, folder, split list, camera or URL (several: one after the "
                        "other, or --streams at once)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the labels")
    p.add_argument("--model", metavar="EXPORT", default=None,
                   help="export folder made by tbn-export (default: the one of "
                        "runs/tbn/export* that tbn-export made or found up to date last)")
    p.add_argument("--backend", default="auto",
                   choices=("auto", "trt", "ort", "openvino", "torch"),
                   help="auto: any GPU backend before any CPU one: TensorRT (the export has "
                        "engines), ONNX Runtime's CUDA provider, PyTorch on CUDA; then "
                        "OpenVINO, ONNX Runtime and PyTorch on the CPU")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="where the backend runs (default: the best one present)")
    p.add_argument("--format", default="png", choices=("png", "npy", "coco-rle"),
                   help="png: palette PNG per frame; npy: uint8 array per frame; coco-rle: one "
                        "COCO JSON per video (RLE masks, category id = train id + 1)")
    p.add_argument("--overlay", metavar="FILE.mp4",
                   help="also write the frames blended with their labels and a legend")
    p.add_argument("--stats", metavar="FILE.json",
                   help="write per-stage timings, frames/s and peak memory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true",
                      help="write into an output folder that already holds labels")
    mode.add_argument("--resume", action="store_true",
                      help="keep the complete labels in --out and do the rest (the feature "
                           "engine still runs on kept frames: the frames after need them)")
    p.add_argument("--streams", type=int, default=1, metavar="N",
                   help="run N videos at once, their frames batched through the engines; a "
                        "video that ends is replaced by the next")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames in all")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("a corpus across a Ray cluster (pip install 'tbn-vit[cluster]'; "
                               "docs/cluster.md)")
    ray.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="share the videos out to Ray workers, one per GPU (or per "
                          "--cpus-per-worker cores), writing to an --out every node sees. "
                          "ADDRESS: HOST:PORT of the head, or 'local' (a Ray started here for "
                          "this run); none: $RAY_ADDRESS, else the cluster `ray start` began "
                          "on this machine, else a Ray started here")
    # the defaults are tbn_runtime.cluster's (not imported before --help is answered)
    ray.add_argument("--chunk-frames", type=int, metavar="F", default=1000,
                     help="cut videos longer than F frames into chunks that workers run side "
                          "by side, masks identical to one run's (0: whole videos only)")
    ray.add_argument("--workers", type=int, metavar="N", default=0,
                     help="at most N workers (0: as many as the cluster holds)")
    ray.add_argument("--cpus-per-worker", type=int, metavar="C", default=0,
                     help="CPU cores per worker where a node has no GPU (0: 4, or all the "
                          "cores of the largest node if it has fewer)")
    add_verbosity_flags(p)
    return p


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags that cannot go together or out of range: UsageError before anything is loaded."""
    from .errors import UsageError

    problems = []
    if args.max_frames is not None and args.max_frames < 1:
        problems.append("--max-frames must be at least 1")
    if not 1 <= args.streams <= 256:
        problems.append("--streams must be in 1..256")
    problems += [f"--{dest.replace('_', '-')} goes with --ray"
                 for dest in ("chunk_frames", "workers", "cpus_per_worker")
                 if args.ray is None and getattr(args, dest) != parser.get_default(dest)]
    if args.ray is not None and (args.overlay or args.max_frames):
        problems.append(f"{'--overlay' if args.overlay else '--max-frames'} is for one "
                        f"stream; not with --ray")
    if args.overlay and args.streams > 1:
        problems.append("--overlay draws one video: run with --streams 1")
    if args.ray is not None and args.streams > 1:
        problems.append("--streams batches videos inside one process; with --ray each worker "
                        "streams one video (or chunk) at a time: ask for more --workers instead")
    problems += [f"{flag} must be at least 0" for flag, value in (
        ("--chunk-frames", args.chunk_frames), ("--workers", args.workers),
        ("--cpus-per-worker", args.cpus_per_worker)) if value < 0]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        problems.append(f"--out {args.out} exists and is not a folder")
    if problems:
        raise UsageError(problems[0])


def _check_writable(path: str, flag: str) -> None:
    """Create and remove a temporary beside `path`: an unwritable destination fails now."""
    from .files import temporary_name
    from .stream import StreamError

    tmp = temporary_name(path)
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, "w"):
            pass
        os.remove(tmp)
    except OSError as e:
        raise StreamError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def _prepare_out(args: argparse.Namespace) -> None:
    """--out (locked by the caller): temporaries of killed runs swept, labels already there
    refused without --overwrite/--resume, --out and --stats writable."""
    from .files import sweep_stale
    from .outputs import has_outputs
    from .stream import StreamError

    for folder in [args.out] + [e.path for e in os.scandir(args.out) if e.is_dir()]:
        for path in sweep_stale(folder):
            log.info("removed %s, left by a run that was killed", path)
    if has_outputs(args.out) and not (args.overwrite or args.resume):
        raise StreamError(f"{args.out} already holds labels; pass --overwrite to replace "
                          f"them or --resume to finish an interrupted run")
    _check_writable(os.path.join(args.out, "x"), "--out")
    if args.stats:
        _check_writable(args.stats, "--stats")


def _corpus(args: argparse.Namespace, videos: list) -> dict:
    """--ray: the videos across a Ray cluster (tbn_runtime.cluster); the stats of one stream's
    report, per video."""
    from .cluster import run_corpus

    return run_corpus(videos, args.out, export=args.model, backend=args.backend,
                      device=args.device, fmt=args.format, address=args.ray or None,
                      chunk_frames=args.chunk_frames, workers=args.workers or None,
                      cpus_per_worker=args.cpus_per_worker or None, resume=args.resume,
                      progress=not (args.no_progress or args.quiet), verbose=args.verbose)


def _say_backend(why: str) -> None:
    """The backend and why, at info; the backends auto passed over (with their install hints)
    only at debug level."""
    chosen, _, passed_over = why.partition("; not chosen: ")
    log.info("backend %s", chosen + (")" if passed_over else ""))
    if passed_over:
        log.debug("not chosen: %s", passed_over[:-1])


def _take_over(args: argparse.Namespace, videos: list) -> None:
    """What the run replaces, once the model has loaded: with --overwrite, every earlier label
    of these videos that tbn-run wrote here (no stale frame survives); the videos recorded."""
    from .outputs import clear_outputs, mark_outputs

    names = [v.name for v in videos]
    if args.overwrite:
        removed = clear_outputs(args.out, names)
        if removed:
            log.info("removed %d label files of these videos' earlier run in %s (--overwrite)",
                     removed, args.out)
    mark_outputs(args.out, names)


def _one_process(args: argparse.Namespace, videos: list) -> dict:
    """The videos through one Segmenter in this process (one stream or --streams N)."""
    from .files import sweep_stale
    from .overlay import OverlayVideo
    from .segmenter import Segmenter
    from .stream import run_stream

    with Segmenter(args.model, backend=args.backend, device=args.device,
                   streams=args.streams) as seg:
        _say_backend(seg.why)
        overlay = None
        if args.overlay:
            sweep_stale(os.path.dirname(os.path.abspath(args.overlay)))
            overlay = OverlayVideo(args.overlay, seg.classes, seg.palette_bgr)
            overlay.check()
        _take_over(args, videos)
        return run_stream(seg, videos, args.out, fmt=args.format, overlay=overlay,
                          resume=args.resume, max_frames=args.max_frames,
                          progress=not (args.no_progress or args.quiet))


def _run(args: argparse.Namespace, command: str) -> int:
    """The run, with --out locked; the exit code (1 if a video failed)."""
    from .files import FolderLock, atomic_write_text
    from .outputs import RUN_MARKER
    from .report import summary_line
    from .segmenter import choose_export
    from .sources import open_source

    created = not os.path.exists(args.out)
    lock = FolderLock(args.out, command)
    try:
        if args.model is None:  # said first: which export runs, and why that one
            args.model, why = choose_export()
            log.info("model %s: %s (--model EXPORT chooses another)", args.model, why)
        lock.acquire()
        _prepare_out(args)
        videos = [v for source in args.sources for v in open_source(source)]
        if args.ray is not None:
            _take_over(args, videos)
            stats = _corpus(args, videos)
        else:
            stats = _one_process(args, videos)
        stats["sources"] = args.sources
        if args.stats:
            import json
            atomic_write_text(args.stats, json.dumps(stats, indent=2) + "\n")
        print(f"{PROG}: {summary_line(stats, args.out)}")
        return 1 if stats.get("failed_videos") else 0  # each said as it failed; --resume retries
    finally:
        lock.release()
        if created and os.path.isdir(args.out) and set(os.listdir(args.out)) <= {RUN_MARKER}:
            shutil.rmtree(args.out)  # nothing was written: leave no empty folder behind


def main(argv: Optional[List[str]] = None) -> int:
    def body() -> int:
        parser = build_parser()
        args = parser.parse_args(argv)
        setup_logging(PROG, args.verbose, args.quiet)
        _check_args(args, parser)
        # OpenCV and FFmpeg print their own warnings for a missing camera or a broken file;
        # tbn-run says it in one line instead (set these variables yourself to see them).
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        return _run(args, " ".join([PROG] + list(argv if argv is not None else sys.argv[1:])))

    return run_command(PROG, body, interrupted="interrupted; the labels written so far are "
                       "complete (--resume continues)", stopped="stopped (SIGTERM); the labels "
                       "written so far are complete (--resume continues)")


if __name__ == "__main__":
    sys.exit(main())
