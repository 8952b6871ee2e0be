"""tbn-export: checkpoint -> export directory (feature.onnx, temporal.onnx, manifest.json, and
feature.engine / temporal.engine where TensorRT is present).

    tbn-export [--checkpoint runs/tbn/best.safetensors] [--fp16 | --bf16] [--out DIR]
               [--height H --width W] [--logits] [--verify [--video FILE]] [--overwrite]
    tbn-export --int8 --calib SOURCE [--calib-frames 64] [--verify] ...   # Q/DQ feature graph
    tbn-export --engine-only --out DIR      # engines for an existing export, on the target GPU

Each precision has its own default folder (runs/tbn/export, runs/tbn/export-fp16), so exporting
one never replaces another; an export of another model or precision in --out is refused without
--overwrite, and one of the same checkpoint, precision and size is left as it is (up to date).
The export is made in a temporary directory beside --out and renamed into place: the directory
holds a whole export or the previous one, never half of each (temporaries of killed runs are
removed at the next start). A user's mistake gets one line on stderr and exit code 2; a failed
--verify exit code 1 (and nothing is written). Only argparse is imported before --help.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from typing import List, Optional, Tuple

from tbn_runtime.console import (DEFAULT_RUN, OneLineParser, add_verbosity_flags, run_command,
                                 setup_logging)

from .errors import UsageError

DEFAULT_CHECKPOINT = "runs/tbn/best.safetensors"
#: VSPW's 480p frames (480 x 853) with the width rounded up to a multiple of 32.
DEFAULT_SIZE = (480, 864)
ENGINE_HINT = ("to build TensorRT engines later, on the target machine: pip install "
               "'tbn-vit[gpu-cu12]' (or gpu-cu13) && tbn-export --engine-only --out {out}")


log = logging.getLogger("tbn_export")


def default_out(precision: str) -> str:
    """Where an export of `precision` goes by default: runs/tbn/export for fp32,
    runs/tbn/export-<precision> for the others."""
    return os.path.join(DEFAULT_RUN, "export" if precision == "fp32" else f"export-{precision}")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tbn-export", description="Export a TBN-ViT checkpoint as two ONNX graphs "
                "(+ TensorRT engines where TensorRT is installed) and a manifest.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"checkpoint written by tbn-train (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--out", default=None,
                   help=f"export directory (default {default_out('fp32')}; "
                        f"{default_out('fp16')} with --fp16, {default_out('bf16')} with --bf16, "
                        f"{default_out('int8')} with --int8)")
    p.add_argument("--fp16", action="store_true",
                   help="fp16 graphs (LayerNorm, Softmax, reductions stay fp32); fp16 features")
    p.add_argument("--bf16", action="store_true",
                   help="bf16: fp32 graphs whose feature engine computes in bf16 (OpenVINO on "
                        "CPUs with AMX / AVX512-BF16, PyTorch); the temporal graph stays fp32; "
                        "ONNX Runtime refuses it")
    p.add_argument("--int8", action="store_true",
                   help="INT8 feature graph (explicit Q/DQ, calibrated on --calib); the "
                        "temporal graph stays fp32")
    p.add_argument("--calib", default=None, metavar="SOURCE",
                   help="frames to calibrate --int8 on: a video, a folder of videos, frame "
                        "folders or images, a VSPW root or split list (ROOT/train.txt)")
    p.add_argument("--calib-frames", type=int, default=None,
                   help="calibration frames (default 64, every 5th frame of up to that many "
                        "videos)")
    p.add_argument("--calib-method", default=None, choices=("minmax", "entropy", "percentile"),
                   help="how activation ranges are set from the calibration (default minmax)")
    p.add_argument("--height", type=int, default=None,
                   help="export height (default: the checkpoint config's eval_size, else its "
                        f"crop_size, else {DEFAULT_SIZE[0]})")
    p.add_argument("--width", type=int, default=None,
                   help=f"export width (default: as --height, else {DEFAULT_SIZE[1]})")
    p.add_argument("--logits", action="store_true", help="temporal graph also outputs logits")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="most streams batched in one engine call (tbn-run --streams): the "
                        "TensorRT engines take 1..N frames (default 8)")
    p.add_argument("--verify", action="store_true",
                   help="compare the ONNX graphs with PyTorch before writing the export")
    p.add_argument("--video", default=None, help="frames for --verify (default: synthetic)")
    p.add_argument("--verify-frames", type=int, default=14,
                   help="frames --verify runs (default 14: covers the first 9, where the past "
                        "indices clamp to frame 0)")
    p.add_argument("--engine-only", action="store_true",
                   help="build TensorRT engines for the export in --out (no checkpoint needed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds another model's export or other files")
    p.add_argument("--workspace-gb", type=float, default=4.0,
                   help="TensorRT builder workspace limit in GiB (default 4)")
    p.add_argument("--trt-log-level", default="warning",
                   choices=("verbose", "info", "warning", "error", "internal_error"),
                   help="TensorRT logger severity (default warning)")
    add_verbosity_flags(p)
    return p


def precision_of(args) -> str:
    return "int8" if args.int8 else "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"


def _export_size(args, meta) -> Tuple[int, int, str]:
    """(height, width, where it came from)."""
    config = meta.get("config") or {}
    for key in ("eval_size", "crop_size"):
        size = config.get(key)
        if isinstance(size, (list, tuple)) and len(size) == 2:
            source = f"the checkpoint config's {key}"
            break
    else:
        size, source = DEFAULT_SIZE, "the default (the checkpoint config has no eval/crop size)"
    if args.height is not None and args.width is not None:
        return args.height, args.width, "--height/--width"
    if args.height is not None or args.width is not None:
        h = args.height if args.height is not None else int(size[0])
        w = args.width if args.width is not None else int(size[1])
        return h, w, f"--height/--width, the other from {source}"
    return int(size[0]), int(size[1]), source


def _size_mb(path: str) -> str:
    return f"{os.path.getsize(path) / 1e6:.2f} MB"


def _engine_only(args) -> int:
    from tbn_runtime.manifest import load_manifest

    from .bf16 import autocast_available
    from .tensorrt_build import EngineBuildError, build_engines, tensorrt_available

    manifest = load_manifest(args.out)
    ok, why = tensorrt_available()
    if ok and manifest.precision == "bf16":
        ok, why = autocast_available()
    if not ok:
        raise UsageError(f"TensorRT engines cannot be built here ({why}); "
                         + ENGINE_HINT.format(out=args.out))
    t0 = time.perf_counter()
    try:
        manifest = build_engines(args.out, args.workspace_gb, args.trt_log_level, manifest)
    except EngineBuildError as e:
        raise UsageError(f"{e}; the ONNX export in {args.out} is unchanged") from None
    log.info(f"built TensorRT {manifest.tensorrt['version']} engines in {args.out} for "
             f"{manifest.tensorrt['gpu']} (sm {manifest.tensorrt['compute_capability']}) in "
             f"{time.perf_counter() - t0:.1f} s")
    return 0


def _check_int8_args(args) -> None:
    """--int8 needs --calib; the calibration flags need --int8; INT8 is made from fp32."""
    calib_flags = [f for f, v in (("--calib", args.calib), ("--calib-frames", args.calib_frames),
                                  ("--calib-method", args.calib_method)) if v is not None]
    if args.bf16 and (args.fp16 or args.int8):
        raise UsageError(f"--bf16 and --{'fp16' if args.fp16 else 'int8'} exclude each other; "
                         f"choose one precision")
    if not args.int8:
        if calib_flags:
            raise UsageError(f"{', '.join(calib_flags)} only apply to --int8")
        return
    if args.fp16:
        raise UsageError("--int8 and --fp16 exclude each other: the INT8 feature graph is "
                         "quantized from fp32 (its temporal graph stays fp32); choose one")
    if args.calib is None:
        raise UsageError("--int8 needs --calib SOURCE: frames to calibrate on (a video, a "
                         "folder of videos or images, or a VSPW root, e.g. --calib data/synth)")
    if not os.path.exists(args.calib):
        raise UsageError(f"calibration source not found: {args.calib}")
    if args.calib_frames is None:
        from .int8 import DEFAULT_CALIB_FRAMES
        args.calib_frames = DEFAULT_CALIB_FRAMES
    if args.calib_frames < 1:
        raise UsageError(f"--calib-frames must be >= 1, got {args.calib_frames}")
    if args.calib_method is None:
        args.calib_method = "minmax"


def _check_export_args(args) -> None:
    """The export's flags, checked before the checkpoint is loaded (UsageError)."""
    from .onnx_export import check_export_size

    if args.height is not None or args.width is not None:  # fail fast, before loading weights
        check_export_size(args.height if args.height is not None else 32,
                          args.width if args.width is not None else 32)
    if args.verify_frames < 1:
        raise UsageError(f"--verify-frames must be >= 1, got {args.verify_frames}")
    if args.video is not None and not args.verify:
        raise UsageError("--video is only used with --verify")
    if args.video is not None and not os.path.isfile(args.video):
        raise UsageError(f"video not found: {args.video}")
    if args.workspace_gb <= 0:
        raise UsageError(f"--workspace-gb must be positive, got {args.workspace_gb}")
    if not 1 <= args.max_batch <= 256:
        raise UsageError(f"--max-batch must be in 1..256, got {args.max_batch}")
    _check_int8_args(args)


def _calibration(args, height: int, width: int):
    """--int8: the calibration frames (and those held out for --verify); None otherwise."""
    if not args.int8:
        return None
    from .int8 import read_calibration

    held_out = args.verify_frames if args.verify and not args.video else 0
    calib = read_calibration(args.calib, args.calib_frames, height, width, held_out)
    if held_out and not calib.held_out:
        raise UsageError(f"--calib {args.calib} leaves no frames that calibration did not "
                         f"see for --verify; pass --video FILE (frames to verify on)")
    return calib


def _verified(args, tmp: str, model, calib, height: int, width: int) -> bool:
    """--verify: the export in tmp against PyTorch; prints the table, False when it fails."""
    from tbn_runtime.manifest import load_manifest

    from .verify import synthetic_frames, verify_export, video_frames

    if args.video:
        frames = video_frames(args.video, args.verify_frames, height, width)
        what = f"{len(frames)} frames of {args.video}"
    elif calib is not None:
        frames = calib.held_out
        what = f"{len(frames)} held-out frames of {calib.held_out_from}"
    else:
        frames = synthetic_frames(args.verify_frames, height, width)
        what = f"{len(frames)} synthetic frames"
    result = verify_export(tmp, model, frames)
    print(f"verify: the export vs PyTorch fp32 on {what}")
    print(result.table())
    if not result.ok:
        return False
    # each backend's check goes into the manifest: one that failed refuses the export
    manifest = load_manifest(tmp)
    manifest.verified = result.records()
    manifest.save(tmp)
    for name, check in manifest.verified.items():
        if not check["passed"]:
            log.warning(f"the {name} backend computes this export wrongly here (labels "
                        f"{100 * check['labels_agree']:.1f}% equal to PyTorch's); recorded "
                        f"in the manifest: {name} refuses it, the other backends run it")
    return True


def _write_export(args, tmp: str, model, calib, height: int, width: int, source: str):
    """ONNX graphs (quantized with --int8) and the manifest into tmp; the manifest."""
    from .onnx_export import FEATURE_ONNX, TEMPORAL_ONNX, export_onnx

    t0 = time.perf_counter()
    manifest = export_onnx(model, tmp, height, width, fp16=args.fp16, logits=args.logits,
                           checkpoint_path=args.checkpoint, max_batch=args.max_batch,
                           bf16=args.bf16)
    if calib is not None:
        from .int8 import quantize_export

        manifest = quantize_export(tmp, calib, args.calib_method)
        log.info(f"quantized {FEATURE_ONNX} to INT8 (Q/DQ) on {len(calib.frames)} frames "
                 f"of {len(calib.videos)} video(s) from {args.calib}")
    log.info(f"exported {manifest.model} ({manifest.precision}) at {height}x{width} (size "
             f"from {source}) in {time.perf_counter() - t0:.1f} s: {FEATURE_ONNX} "
             f"{_size_mb(os.path.join(tmp, FEATURE_ONNX))}, {TEMPORAL_ONNX} "
             f"{_size_mb(os.path.join(tmp, TEMPORAL_ONNX))}; feature "
             f"{'x'.join(map(str, manifest.feature_shape))} {manifest.feature_dtype}")
    return manifest


def _engines(args, tmp: str) -> Tuple[bool, str, Optional[str]]:
    """TensorRT engines into tmp where TensorRT is present: (available, why not, the build's
    error or None)."""
    from .errors import EngineBuildError
    from .tensorrt_build import build_engines, tensorrt_available

    ok, why = tensorrt_available()
    if ok and args.bf16:
        # a strongly typed build takes its precision from the graph: the bf16 engine is built
        # from a bf16-typed copy of the feature graph, which ModelOpt's AutoCast writes
        from .bf16 import autocast_available

        ok, why = autocast_available()
    if not ok:
        return ok, why, None
    t0 = time.perf_counter()
    try:
        build_engines(tmp, args.workspace_gb, args.trt_log_level)
    except EngineBuildError as e:
        return ok, why, str(e)
    log.info(f"built TensorRT engines in {time.perf_counter() - t0:.1f} s")
    return ok, why, None


def _export(args) -> int:
    """The export: checked, made in a temporary beside --out, verified, then renamed."""
    from tbn_runtime.files import make_temporary_dir, sha256_file, sweep_stale
    from tbn_runtime.manifest import ManifestError, load_manifest
    from tbn_train.checkpoint import load_model

    from .onnx_export import check_export_size
    from .out_dir import check_out_dir, install, stamp_latest

    _check_export_args(args)
    model, meta = load_model(args.checkpoint)
    height, width, source = _export_size(args, meta)
    height, width = check_export_size(height, width)
    calib = _calibration(args, height, width)
    out = os.path.abspath(args.out)
    # an int8 export also depends on its calibration: never "up to date", replaced instead
    same = None if args.int8 else {"sha256": sha256_file(args.checkpoint),
                                    "size": [height, width], "logits": args.logits}
    action, note = check_out_dir(out, model.model_name, precision_of(args), args.overwrite,
                                 same)
    if action == "up to date":
        log.info(note)
        stamp_latest(out)
        return 0
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    for path in sweep_stale(parent):
        log.info("removed %s, left by an export that was killed", path)
    tmp = make_temporary_dir(out)
    try:
        _write_export(args, tmp, model, calib, height, width, source)
        if args.verify and not _verified(args, tmp, model, calib, height, width):
            log.error(f"verification failed; nothing written to {out}")
            return 1
        try:  # what the runtime would refuse is not installed (sizes, batch, fields)
            load_manifest(tmp)
        except ManifestError as e:
            raise UsageError(f"this export would not load in the runtime ({e}); nothing "
                             f"written to {out}") from None
        ok, why, engine_error = _engines(args, tmp)
        install(tmp, out)
        stamp_latest(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if note:
        log.info(note)
    log.info(f"wrote {out}")
    if engine_error is not None:
        raise UsageError(f"{engine_error}; the ONNX export in {out} is complete "
                         f"(retry with tbn-export --engine-only --out {out})")
    if not ok:
        log.info(f"TensorRT not available here ({why}); " + ENGINE_HINT.format(out=out))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        setup_logging("tbn-export", args.verbose, args.quiet)
        if args.out is None:
            args.out = default_out(precision_of(args))
        if args.engine_only:
            if args.calib or args.calib_frames or args.calib_method:
                raise UsageError("--engine-only builds engines for the export in --out; the "
                                 "--calib flags belong to an export (tbn-export --int8)")
            return _engine_only(args)
        return _export(args)

    return run_command("tbn-export", body, interrupted="interrupted; nothing written",
                       stopped="stopped (SIGTERM); nothing written")


if __name__ == "__main__":
    sys.exit(main())
