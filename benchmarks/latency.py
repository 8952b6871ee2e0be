"""Per-frame latency of every inference path, side by side, in one process, on the same frames.

    python benchmarks/latency.py                     # the exports under runs/tbn (tbn-export's)
    python benchmarks/latency.py --model tbn_swin_t --size 480x480   # random weights
    python benchmarks/latency.py --model tbn_swin_l --size 480x864 --device cuda
    python benchmarks/latency.py --export runs/tbn/export,runs/tbn/export-fp16 --frames 20
    python benchmarks/latency.py --only naive,ring,ort --json out.json --plot out.png

Rows (choose with --only; default: every row that can run here):
  naive       PyTorch, model(clip) per frame: the backbone over all 4 frames of [t-9, t-6, t-3, t]
  naive-fp16  the same under CUDA fp16 autocast (--device cuda)
  ring        PyTorch with the feature ring (the runtime's torch backend: features once per frame;
              CUDA graphs on CUDA)
  ring-fp16   the same with fp16 weights (--device cuda)
  ring-bf16   the same with bf16 weights, the temporal half fp32 (CUDA, or CPUs with AMX /
              AVX512-BF16: elsewhere the torch backend runs a bf16 export in fp32)
  ort         ONNX Runtime, fp32 export, through the runtime's ort backend (IOBinding ring)
  ort-fp16    ONNX Runtime, fp16 export
  ort-int8    ONNX Runtime, INT8 export (Q/DQ feature graph, fp32 temporal graph); made on the
              fly: calibrated on --calib (default: synthetic frames of another seed)
  openvino    OpenVINO (the runtime's openvino backend, CPU), fp32 export, computed in f32
  openvino-bf16  OpenVINO, bf16 export: bf16 on CPUs with AMX / AVX512-BF16, f32 elsewhere
              (the row's description says which)
  openvino-int8  OpenVINO, the same INT8 export as ort-int8, as exported (refused on CPUs
              without VNNI, where OpenVINO's int8 results are wrong)
  trt         TensorRT, fp16 engines (the runtime's trt backend), where TensorRT is installed
  trt-fp32    TensorRT, fp32 engines
  tbn-run     the runtime's whole stream (decode a video written with cv2, infer, write PNG masks)
              with the fastest of the ort/openvino/trt rows

Every row is fed the same frames (a synthetic video from tbn_train.data.synth), frame by frame
and interleaved: frame t goes through every row before frame t+1, so slow drifts of the machine
(other processes, clocks, temperature) hit every row alike. The first --warmup frames are run
but not timed; the per-frame latency of the remaining --frames frames is reported as median,
p90 and p99 (quote medians). Speed-up is the first row's median over the row's median;
"labels =" is the share of pixels whose label equals the naive row's on the same frame.
A row that cannot run is reported as skipped, one that breaks (import, export, out of memory)
as failed with its reason; the other rows go on. --time-budget bounds the whole run, exports and
engine builds included; SIGTERM stops it like the budget does (what was measured is reported);
its temporary exports are removed on every exit (and those of killed runs at the next start).

Memory per row: host RSS it adds when it is built and warmed up, plus the largest transient
rise during one of its frames (sampled every 5 ms, heap trimmed before each frame); on CUDA the
torch rows report torch.cuda.max_memory_allocated, the others the device memory they hold.

Model: --export DIR[,DIR...] (tbn-export outputs; the torch rows load the checkpoint named in
the manifest); without flags, the exports under runs/tbn (the newest of each precision: what the
README's commands made); or --model NAME --size HxW with random weights (BatchNorm statistics
randomised so the outputs are not degenerate), tbn_swin_t at 480x480 where there is no export.
ONNX exports the rows need are made on the fly in a temporary folder from the checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import measure  # noqa: E402
from paths import BenchError, Source, make_source  # noqa: E402

from tbn_runtime.errors import Stopped  # noqa: E402  (SIGTERM: report what was measured)

ROWS = ("naive", "naive-fp16", "ring", "ring-fp16", "ring-bf16", "ort", "ort-fp16", "ort-int8",
        "openvino", "openvino-bf16", "openvino-int8", "trt", "trt-fp32", "tbn-run")
LABELS = {
    "naive": "PyTorch naive (backbone x4)",
    "naive-fp16": "PyTorch naive fp16 (backbone x4)",
    "ring": "PyTorch ring",
    "ring-fp16": "PyTorch ring fp16",
    "ring-bf16": "PyTorch ring bf16",
    "ort": "ONNX Runtime fp32",
    "ort-fp16": "ONNX Runtime fp16",
    "ort-int8": "ONNX Runtime int8",
    "openvino": "OpenVINO fp32",
    "openvino-bf16": "OpenVINO bf16",
    "openvino-int8": "OpenVINO int8",
    "trt": "TensorRT fp16",
    "trt-fp32": "TensorRT fp32",
    "tbn-run": "tbn-run end to end",
}
TMP_PREFIX = "tbn-latency-"


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Stopped()


def sweep_killed_runs() -> None:
    """Remove the temporary folders of latency runs that were killed (SIGKILL leaves them)."""
    from tbn_runtime.files import process_alive
    for d in glob.glob(os.path.join(tempfile.gettempdir(), f"{TMP_PREFIX}*")):
        pid = os.path.basename(d)[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


#: distinct frames rendered; longer runs loop over them (rendering is slow, and what is timed
#: does not depend on the content)
DISTINCT_FRAMES = 64


def synth_frames(height: int, width: int, n: int, seed: int) -> List[Any]:
    """n frames of a synthetic video: DISTINCT_FRAMES rendered, then repeated."""
    from tbn_train.data.synth import synthetic_frames
    distinct = synthetic_frames(min(n, DISTINCT_FRAMES), height, width, seed)
    return [distinct[i % len(distinct)] for i in range(n)]


def calibration(args: argparse.Namespace, src: Source) -> Any:
    """Calibration frames for the ort-int8 row: --calib, else a synthetic video of another
    seed than the timed frames."""
    from tbn_export.int8 import CalibrationFrames, read_calibration
    if args.calib:
        return read_calibration(args.calib, args.calib_frames, src.height, src.width)
    frames = synth_frames(src.height, src.width, args.calib_frames, args.seed + 1)
    return CalibrationFrames(frames, f"tbn_train.data.synth video (seed {args.seed + 1})",
                             ["synthetic"])


def default_exports() -> Optional[str]:
    """The newest export of each precision under runs/tbn of the newest one's model and size
    (comma-separated), or None."""
    from tbn_runtime.manifest import ManifestError, load_manifest
    from tbn_runtime.segmenter import DEFAULT_RUN, find_exports
    chosen: Dict[str, str] = {}
    first = None
    for d in find_exports(DEFAULT_RUN):
        try:
            m = load_manifest(d)
        except ManifestError:
            continue
        key = (m.model, m.height, m.width)
        first = first or key
        if key == first and m.precision not in chosen:
            chosen[m.precision] = d
    return ",".join(chosen.values()) or None


def run(args: argparse.Namespace, tmp: str, budget: "measure.Budget",
        results: List[Dict[str, Any]], sources: List[Any]) -> None:
    """Build, time and finish every row into `results` (filled as it goes, so a run stopped
    half-way still has what it measured); the model source goes into `sources`."""
    src = make_source(args, tmp)
    src.calibration = lambda: calibration(args, src)
    sources.append(src)
    frames = synth_frames(src.height, src.width, args.warmup + args.frames, args.seed)
    if args.device == "cuda":
        import torch
        torch.zeros(1, device="cuda")  # the CUDA context, so no row is charged for it
    built, live = measure.build_rows(args.rows, LABELS, src, args.device, frames, args.warmup,
                                     budget)
    results.extend(built)
    measure.time_rows(live, frames[args.warmup:], args.device, budget)
    measure.finalize(results, args.device)
    for res in results:
        if res["row"] == "tbn-run":
            measure.run_tbn_run(res, results, src, args.device, frames, args.warmup, tmp,
                                budget)
    measure.finalize(results, args.device)


# -- outputs -------------------------------------------------------------------------------------
def _status(r: Dict[str, Any]) -> Optional[str]:
    if "failed" in r:
        return f"FAILED {r['failed']}"
    if "skipped" in r:
        return f"not run: {r['skipped']}"
    return None


def table(report: Dict[str, Any]) -> str:
    gpu = report["device"] == "cuda"
    headers = ["path", "median ms", "p90 ms", "p99 ms", "frames/s", "peak host MB"]
    headers += ["peak GPU MB"] if gpu else []
    headers += ["speed-up", "labels =", "frames"]
    rows = []
    for r in report["rows"]:
        status = _status(r)
        if status and not r.get("median_ms"):
            rows.append([r["label"]] + ["-"] * (len(headers) - 2) + [status])
            continue
        agree = r.get("agreement")
        rows.append([r["label"], common.fmt(r.get("median_ms")), common.fmt(r.get("p90_ms")),
                     common.fmt(r.get("p99_ms")), common.fmt(r.get("fps"), 2),
                     common.fmt(r.get("peak_host_mb"), 0)]
                    + ([common.fmt(r.get("peak_device_mb"), 0)] if gpu else [])
                    + [f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
                       common.percent(agree) if agree is not None else "-",
                       str(r.get("frames", "-")) + (f" ({status})" if status else "")])
    stages = [f"{r['label']}: feature {r['stage_ms']['feature']:.1f} ms + temporal "
              f"{r['stage_ms']['temporal']:.1f} ms" for r in report["rows"] if r.get("stage_ms")]
    cfg = report["config"]
    base = next((r["label"] for r in report["rows"] if r.get("agreement_vs") == r["row"]), None)
    head = (f"Per-frame latency, {cfg['model']} at {cfg['height']}x{cfg['width']} on "
            f"{report['device']}, {cfg['frames']} frames after {cfg['warmup']} warm-up, "
            f"interleaved ({'random weights' if cfg['random_weights'] else 'trained weights'})\n"
            f"Machine: {common.machine_line(report['machine'])}")
    notes = []
    if base:
        notes.append(f"\"labels =\": share of pixels whose label equals {base}'s on the same "
                     f"frame")
    if stages:
        notes.append("Mean engine time per frame (the backend's own split):\n" +
                     "\n".join(f"- {x}" for x in stages))
    if report.get("stopped"):
        notes.append(f"Stopped early: {report['stopped']}")
    return head + "\n\n" + common.markdown_table(headers, rows) + "".join(
        "\n\n" + n for n in notes)


def plot(path: str, report: Dict[str, Any]) -> None:
    rows = [r for r in report["rows"] if r.get("median_ms")]
    cfg = report["config"]
    common.bar_plot(
        path, [r["label"] for r in rows], [r["median_ms"] for r in rows],
        ylabel="ms per frame (median; whisker p90)",
        title=f"{cfg['model']} {cfg['height']}x{cfg['width']} on {report['device']}: "
              f"per-frame latency",
        subtitle=common.machine_line(report["machine"]),
        errors=[r["p90_ms"] - r["median_ms"] for r in rows],
        annotate=[f"{r['median_ms']:.0f} ms\n{r.get('speedup', 1):.2f}x" for r in rows])


def model_arguments(p: argparse.ArgumentParser, export_help: str,
                    model_default: Optional[str] = None) -> None:
    """The flags that choose the model (make_source reads them): --export, or --model and
    --size with random weights (--seed), and the calibration of an int8 export made on the fly."""
    p.add_argument("--export", help=export_help)
    p.add_argument("--model", default=model_default,
                   help="registry name for random weights (default: " +
                        (model_default or "tbn_swin_t where there is no export") + ")")
    p.add_argument("--size", default="480x480", help="HEIGHTxWIDTH with --model "
                                                     "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", help="calibration source for an int8 export made on the fly (a "
                                   "video, folder or VSPW split list; default: synthetic frames)")
    p.add_argument("--calib-frames", type=int, default=32,
                   help="calibration frames of that export (default: %(default)s)")


def check_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--size parsed to (height, width); --frames >= 1, --warmup >= 0 (else p.error)."""
    try:
        a.size = common.parse_size(a.size)
    except ValueError as e:
        p.error(str(e))
    if a.frames < 1 or a.warmup < 0:
        p.error("--frames must be >= 1 and --warmup >= 0")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latency.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    model_arguments(p, "tbn-export output dir(s), comma-separated, one per precision "
                       "(default: the exports under runs/tbn)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--frames", type=int, default=20, help="timed frames (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed frames first (default: "
                                                         "%(default)s)")
    p.add_argument("--only", help=f"comma-separated rows among {', '.join(ROWS)}")
    p.add_argument("--skip", help="comma-separated rows to leave out")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--time-budget", type=float,
                   help="seconds for the whole run, exports and engine builds included; rows "
                        "not built by then are skipped, timing stops (what was measured is "
                        "reported)")
    p.add_argument("--ort-spinning", action="store_true",
                   help="leave ONNX Runtime's spin-waiting threads on (off by default: they "
                        "slow down the rows interleaved with them)")
    p.add_argument("--json", help="write the results (with machine and versions) here")
    p.add_argument("--plot", help="write a bar chart (PNG) here")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary exports")
    a = p.parse_args(argv)
    check_arguments(p, a)
    if a.export and a.model:
        p.error("--export and --model exclude each other")
    rows = list(ROWS)
    if a.only:
        rows = [r.strip() for r in a.only.split(",") if r.strip()]
    if a.skip:
        drop = {r.strip() for r in a.skip.split(",")}
        rows = [r for r in rows if r not in drop]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {', '.join(ROWS)}")
    a.rows = [r for r in ROWS if r in rows]  # canonical order: naive first
    if not a.rows:
        p.error("no rows selected")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("latency.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    if not args.export and not args.model:
        args.export = default_exports()
        if args.export:
            print(f"latency: the exports under runs/tbn: {args.export} (--export or --model "
                  f"to choose)", file=sys.stderr)
        else:
            args.model = "tbn_swin_t"
            print(f"latency: no export under runs/tbn; timing a random-weight {args.model} at "
                  f"{args.size[0]}x{args.size[1]} (--export or --model to choose)",
                  file=sys.stderr)
    from paths import BackendPath
    BackendPath.ort_no_spin = not args.ort_spinning
    budget = measure.Budget(args.time_budget)
    sweep_killed_runs()
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    t_start = time.time()
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    results: List[Dict[str, Any]] = []
    sources: List[Any] = []
    stopped = None
    try:
        try:
            run(args, tmp, budget, results, sources)
        except (Stopped, KeyboardInterrupt) as e:
            stopped = "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C"
            measure.finalize(results, args.device)
        src = sources[0] if sources else None
        report = {
            "benchmark": "latency",
            "device": args.device,
            "config": {"model": src.model_name if src else args.model,
                       "height": src.height if src else args.size[0],
                       "width": src.width if src else args.size[1],
                       "frames": args.frames, "warmup": args.warmup, "seed": args.seed,
                       "random_weights": src.random_weights if src else args.export is None,
                       "exports": {k: (None if v.startswith(tmp) else v)
                                   for k, v in (src.exports.items() if src else [])},
                       "export_seconds": src.export_seconds if src else {},
                       "schedule": "interleaved", "ort_spinning": bool(args.ort_spinning),
                       "time_budget": args.time_budget, "rows": args.rows,
                       "int8_calibration": {"source": args.calib or "synthetic",
                                            "frames": args.calib_frames}},
            "machine": common.machine_info(),
            "load_average": {"start": load0, "end": os.getloadavg() if load0 else None},
            "seconds": time.time() - t_start,
            "command": " ".join(["python", "benchmarks/latency.py"] + list(
                argv if argv is not None else sys.argv[1:])),
            "stopped": stopped,
            "rows": results,
        }
        print(table(report))
        if args.json:
            common.write_json(args.json, report)
        if args.plot and any(r.get("median_ms") for r in results):
            plot(args.plot, report)
        return 130 if stopped else 0
    except BenchError as e:
        print(f"latency.py: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.keep_tmp:
            print(f"latency: temporary files kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
