"""Accuracy of every deployable backend and precision against the PyTorch reference; a release gate.

    python benchmarks/accuracy.py                       # data/synth val, runs/tbn/export (+ fp16)
    python benchmarks/accuracy.py --data /data/VSPW --exports runs/tbn/export,runs/tbn/export-fp16
    python benchmarks/accuracy.py --json acc.json --plot acc.png --tol-fp32 0.01 --tol-fp16 0.1

On a VSPW-layout split, every video is run through the PyTorch reference
(`tbn_train.evaluate.predict_video`: the checkpoint, features once per frame in a ring) and
through each backend of each export (ONNX Runtime and OpenVINO on every export they run;
TensorRT where the export has engines and TensorRT is installed; `--backends` chooses). Frames
are resized to the export size and the labels resized back exactly as tbn-run does (the
reference sees the same resized frames), so the outputs compare pixel for pixel. Reported per
row: mIoU, mVC8, mVC16 (VSPW's definitions), their difference to PyTorch, and the share of
labelled pixels whose label agrees with PyTorch's.

Release gate: the exit code is 1 when a backend's |mIoU - mIoU(PyTorch)| exceeds the tolerance
of its precision (default 0.01 points for fp32, 0.1 for fp16 and bf16, 0.5 for int8; --tol-fp32,
--tol-fp16, --tol-bf16, --tol-int8), or its pixel agreement is below --min-agree (off by
default). 2 for a usage error, 0 when every row passes. Rows that cannot run here (TensorRT not
installed, no calibration frames for int8) are reported and do not fail the gate.

Without an fp16 export among --export/--exports, one is made on the fly from the checkpoint into
a temporary folder (--no-fp16 to skip); likewise a bf16 export (--no-bf16) and an int8 export,
calibrated on --calib (default: the data's train split, DATA/train.txt, so calibration never
sees the scored split; --no-int8 to skip).

Test hook: `evaluate_backend(backend, videos, reference)` scores any object with the Backend
interface (height, width, reset(), infer(frame) -> labels); `--fault wrong-past` (a debugging
flag for tests of this gate) feeds every backend's temporal engine the feature of frame t-1 in
place of t-3, t-6, t-9, which the gate must catch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from scoring import (FAULTS, Score, evaluate_backend, gate, inject_fault,  # noqa: E402,F401
                     load_video, reference_predictions, run_backend, run_reference)

DEFAULT_DATA = os.path.join("data", "synth")
DEFAULT_CHECKPOINT = os.path.join("runs", "tbn", "best.safetensors")
DEFAULT_EXPORT = os.path.join("runs", "tbn", "export")


class AccuracyError(RuntimeError):
    """A run that cannot be made as asked; one line for the user."""


# -- rows -------------------------------------------------------------------------------------------
def open_backend(name: str, export_dir: str, device: str) -> Tuple[Optional[Any], str]:
    """(backend, describe) or (None, why it cannot run here)."""
    from tbn_runtime.backends import BackendError, select_backend
    from tbn_runtime.manifest import load_manifest
    manifest = load_manifest(export_dir)
    try:
        cls, dev, _ = select_backend(name, manifest, device, export_dir)
        backend = cls(export_dir, manifest, dev)
    except BackendError as e:
        return None, str(e)
    return backend, backend.describe()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="accuracy.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--data", default=DEFAULT_DATA, help="VSPW-layout root (default: %(default)s)")
    p.add_argument("--split", default="val")
    p.add_argument("--checkpoint", help=f"the PyTorch reference (default: the checkpoint named "
                                        f"in the export's manifest, else {DEFAULT_CHECKPOINT})")
    p.add_argument("--export", default=DEFAULT_EXPORT, help="export dir (default: %(default)s)")
    p.add_argument("--exports", help="comma-separated export dirs (replaces --export)")
    p.add_argument("--no-fp16", action="store_true", help="do not make an fp16 export on the fly")
    p.add_argument("--no-bf16", action="store_true", help="do not make a bf16 export on the fly")
    p.add_argument("--backends", default="ort,openvino,trt",
                   help="backends to score on each export (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tol-fp32", type=float, default=0.01, help="max |dmIoU| in points for fp32 "
                                                                "(default: %(default)s)")
    p.add_argument("--tol-fp16", type=float, default=0.1, help="max |dmIoU| in points for fp16 "
                                                               "(default: %(default)s)")
    p.add_argument("--tol-bf16", type=float, default=0.1, help="max |dmIoU| in points for bf16 "
                                                               "(default: %(default)s)")
    p.add_argument("--tol-int8", type=float, default=0.5, help="max |dmIoU| in points for int8 "
                                                               "(default: %(default)s)")
    p.add_argument("--no-int8", action="store_true", help="do not make an int8 export on the fly")
    p.add_argument("--calib", help="calibration source of the int8 export made on the fly "
                                   "(default: DATA/train.txt)")
    p.add_argument("--calib-frames", type=int, default=64,
                   help="calibration frames of that export (default: %(default)s)")
    p.add_argument("--min-agree", type=float, help="also fail below this pixel agreement (0..1)")
    p.add_argument("--max-videos", type=int, help="only the first N videos of the split")
    p.add_argument("--max-frames", type=int, help="only the first N frames of each video")
    p.add_argument("--fault", choices=FAULTS, help="TEST HOOK: corrupt every backend on purpose "
                                                   "(wrong-past: the temporal engine reads frame "
                                                   "t-1 for every past offset)")
    p.add_argument("--json", help="write the results (with machine and versions) here")
    p.add_argument("--plot", help="write a bar chart (PNG) here")
    return p.parse_args(argv)


def int8_export(args: argparse.Namespace, model: Any, ckpt: str, height: int, width: int,
                tmp: str) -> Tuple[Optional[str], str]:
    """(an int8 export made from the checkpoint, "") or (None, why it cannot be made)."""
    from tbn_export.int8 import Int8Error, quantize_export, read_calibration
    from tbn_export.onnx_export import export_onnx
    source = args.calib or os.path.join(args.data, "train.txt")
    try:
        calib = read_calibration(source, args.calib_frames, height, width)
    except Int8Error as e:
        return None, f"no calibration frames ({e}); pass --calib"
    out = os.path.join(tmp, "export-int8")
    print(f"accuracy.py: no int8 export given; exporting one into {out}, calibrated on "
          f"{len(calib.frames)} frames of {source} ...", file=sys.stderr, flush=True)
    export_onnx(model, out, height, width, checkpoint_path=ckpt)
    try:
        quantize_export(out, calib)
    except Int8Error as e:
        return None, str(e)
    return out, ""


def resolve(args: argparse.Namespace, tmp: str) -> Tuple[Any, Dict[str, Any], List[str], int,
                                                         int]:
    """(model, checkpoint meta, export dirs, height, width) after checking every input; the
    reason an int8 export could not be made on the fly goes to args.int8_skipped."""
    from tbn_runtime.manifest import ManifestError, load_manifest
    from tbn_train.checkpoint import CheckpointError, load_model
    dirs = [d for d in (args.exports or args.export).split(",") if d]
    manifests = []
    for d in dirs:
        try:
            manifests.append(load_manifest(d))
        except ManifestError as e:
            raise AccuracyError(str(e)) from None
    first = manifests[0]
    for m, d in zip(manifests, dirs):
        if (m.model, m.height, m.width, m.num_classes) != (first.model, first.height,
                                                           first.width, first.num_classes):
            raise AccuracyError(f"exports differ: {dirs[0]} is {first.model} {first.height}x"
                                f"{first.width}, {d} is {m.model} {m.height}x{m.width}")
    ckpt = args.checkpoint
    if ckpt is None:
        named = (first.checkpoint or {}).get("path")
        ckpt = named if named and os.path.isfile(named) else DEFAULT_CHECKPOINT
    try:
        model, meta = load_model(ckpt)
    except CheckpointError as e:
        raise AccuracyError(str(e)) from None
    if meta["model"] != first.model:
        raise AccuracyError(f"checkpoint {ckpt} is {meta['model']} but export {dirs[0]} is "
                            f"{first.model}; pass the checkpoint the export was made from")
    from tbn_runtime.files import sha256_file
    want = (first.checkpoint or {}).get("sha256")
    if want and sha256_file(ckpt) != want:
        print(f"accuracy.py: warning: {ckpt} is not the checkpoint {dirs[0]} was exported from "
              f"(sha256 differs); the comparison measures that difference too", file=sys.stderr)
    for precision, skip in (("fp16", args.no_fp16), ("bf16", args.no_bf16)):
        if not skip and not any(m.precision == precision for m in manifests):
            from tbn_export.onnx_export import export_onnx
            out = os.path.join(tmp, f"export-{precision}")
            print(f"accuracy.py: no {precision} export given; exporting one into {out} ...",
                  file=sys.stderr, flush=True)
            export_onnx(model, out, first.height, first.width, fp16=precision == "fp16",
                        bf16=precision == "bf16", checkpoint_path=ckpt)
            dirs.append(out)
    args.int8_skipped = None
    if not args.no_int8 and not any(m.precision == "int8" for m in manifests):
        out, args.int8_skipped = int8_export(args, model, ckpt, first.height, first.width, tmp)
        if out is not None:
            dirs.append(out)
    model.to(args.device)
    meta["path"] = ckpt
    return model, meta, dirs, first.height, first.width


def run(args: argparse.Namespace, tmp: str) -> Dict[str, Any]:
    from tbn_runtime.manifest import load_manifest
    from tbn_train.data.vspw import DatasetError, index_split
    try:
        videos = index_split(args.data, args.split, with_masks=True)
    except DatasetError as e:
        raise AccuracyError(str(e)) from None
    if args.max_videos:
        videos = videos[:args.max_videos]
    model, meta, dirs, height, width = resolve(args, tmp)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    ref = Score(int(model.num_classes))
    rows: List[Dict[str, Any]] = []
    live = []
    for d in dirs:
        m = load_manifest(d)
        for name in backends:
            row = {"row": f"{name} {m.precision}", "backend": name, "precision": m.precision,
                   "export": None if d.startswith(tmp) else d}
            backend, why = open_backend(name, d, args.device)
            if backend is None:
                row["skipped"] = why
            else:
                row["describe"] = why
                if args.fault:
                    inject_fault(backend, args.fault)
                    row["fault"] = args.fault
                live.append((row, backend, Score(int(model.num_classes))))
            rows.append(row)
    if args.int8_skipped:
        rows.append({"row": "ort int8", "backend": "ort", "precision": "int8", "export": None,
                     "skipped": args.int8_skipped})

    for video in videos:
        frames, labels = load_video(video, args.max_frames)
        t0 = time.perf_counter()
        reference = run_reference(model, frames, height, width, args.device)
        ref.seconds += time.perf_counter() - t0
        ref.add_video(video.name, reference, labels, reference)
        for row, backend, score in live:
            t0 = time.perf_counter()
            preds = run_backend(backend, frames)
            score.seconds += time.perf_counter() - t0
            score.add_video(video.name, preds, labels, reference)
    for row, backend, score in live:
        backend.close()
        row.update(score.summary())

    ref_row = {"row": "PyTorch reference", "backend": "torch", "precision": "fp32",
               "describe": f"tbn_train.evaluate.predict_video on {args.device}", **ref.summary()}
    tolerances = {"fp32": args.tol_fp32, "fp16": args.tol_fp16, "bf16": args.tol_bf16,
                  "int8": args.tol_int8}
    for row in rows:
        if "skipped" in row:
            continue
        for k in ("mIoU", "mVC8", "mVC16"):
            a, b = row.get(k), ref_row.get(k)
            row[f"d_{k}"] = None if a is None or b is None else a - b
        row["passed"], row["gate"] = gate(row, ref_row, tolerances, args.min_agree)
    return {
        "benchmark": "accuracy",
        "device": args.device,
        "config": {"data": args.data, "split": args.split, "checkpoint": meta["path"],
                   "model": meta["model"], "height": height, "width": width,
                   "exports": [None if d.startswith(tmp) else d for d in dirs],
                   "backends": backends, "max_videos": args.max_videos,
                   "max_frames": args.max_frames, "fault": args.fault,
                   "int8_calibration": {"source": args.calib or os.path.join(args.data,
                                                                             "train.txt"),
                                        "frames": args.calib_frames}},
        "tolerances": {"fp32": args.tol_fp32, "fp16": args.tol_fp16, "bf16": args.tol_bf16,
                       "int8": args.tol_int8,
                       "min_agree": args.min_agree, "unit": "mIoU points"},
        "machine": common.machine_info(),
        "reference": ref_row,
        "rows": rows,
        "passed": all(r["passed"] for r in rows if "skipped" not in r),
    }


def table(report: Dict[str, Any]) -> str:
    headers = ["path", "mIoU", "mVC8", "mVC16", "dmIoU", "dmVC8", "dmVC16", "labels agree",
               "gate"]
    f2 = lambda v: common.fmt(v, 2)  # noqa: E731
    fd = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
    ref = report["reference"]
    rows = [[ref["row"], f2(ref["mIoU"]), f2(ref["mVC8"]), f2(ref["mVC16"]), "-", "-", "-",
             "-", "reference"]]
    for r in report["rows"]:
        if "skipped" in r:
            rows.append([r["row"], "-", "-", "-", "-", "-", "-", "-", f"not run: {r['skipped']}"])
            continue
        agree = "-" if r.get("agreement") is None else common.percent(r["agreement"], 3)
        rows.append([r["row"] + (f" [fault {r['fault']}]" if r.get("fault") else ""),
                     f2(r["mIoU"]), f2(r["mVC8"]), f2(r["mVC16"]), fd(r["d_mIoU"]),
                     fd(r["d_mVC8"]), fd(r["d_mVC16"]), agree,
                     ("pass" if r["passed"] else "FAIL") + f" ({r['gate']})"])
    cfg, tol = report["config"], report["tolerances"]
    head = (f"Accuracy vs PyTorch, {cfg['model']} at {cfg['height']}x{cfg['width']}, "
            f"{cfg['data']} {cfg['split']} ({ref['videos']} videos, {ref['frames']} frames) on "
            f"{report['device']}; gate |dmIoU| <= {tol['fp32']} (fp32) / {tol['fp16']} (fp16) / "
            f"{tol.get('bf16', '-')} (bf16) / {tol['int8']} (int8) points\n"
            f"Machine: {common.machine_line(report['machine'])}")
    verdict = "gate: PASS" if report["passed"] else "gate: FAIL"
    return head + "\n\n" + common.markdown_table(headers, rows) + "\n\n" + verdict


def plot(path: str, report: Dict[str, Any]) -> None:
    ref = report["reference"]
    rows = [ref] + [r for r in report["rows"] if "skipped" not in r]
    notes = ["reference"] + [
        f"dmIoU {r['d_mIoU']:+.3f}\n{common.percent(r.get('agreement') or 0)} agree"
        for r in rows[1:]]
    cfg = report["config"]
    common.bar_plot(path, [r["row"] for r in rows], [r["mIoU"] for r in rows], ylabel="mIoU (%)",
                    title=f"{cfg['model']} {cfg['height']}x{cfg['width']}: mIoU per backend "
                          f"(dashed: PyTorch's)",
                    subtitle="above each bar: its mIoU minus PyTorch's, and the share of labels "
                             "equal to PyTorch's\n" + common.machine_line(report["machine"]),
                    annotate=notes,
                    hline=ref["mIoU"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="tbn-accuracy-")
    try:
        t0 = time.time()
        report = run(args, tmp)
        report["seconds"] = time.time() - t0
        report["command"] = " ".join(["python", "benchmarks/accuracy.py"] + list(
            argv if argv is not None else sys.argv[1:]))
    except AccuracyError as e:
        print(f"accuracy.py: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(report))
    if args.json:
        common.write_json(args.json, report)
    if args.plot:
        plot(args.plot, report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
