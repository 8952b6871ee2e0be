"""Per-frame latency of every inference path, side by side, in one process, on the same frames.

    python benchmarks/latency.py                                   # tbn_swin_t 480x480, random weights
    python benchmarks/latency.py --model tbn_swin_l --size 480x864 --device cuda
    python benchmarks/latency.py --export runs/tbn/export,runs/tbn/export-fp16 --frames 20
    python benchmarks/latency.py --only naive,ring,ort --json out.json --plot out.png

Rows (choose with --only; default: every row that can run here):
  naive       PyTorch, model(clip) per frame: the backbone over all 4 frames of [t-9, t-6, t-3, t]
  naive-fp16  the same under CUDA fp16 autocast (--device cuda)
  ring        PyTorch with the feature ring (the runtime's torch backend: features once per frame;
              CUDA graphs on CUDA)
  ring-fp16   the same with fp16 autocast (--device cuda)
  ort         ONNX Runtime, fp32 export, through the runtime's ort backend (IOBinding ring)
  ort-fp16    ONNX Runtime, fp16 export
  ort-int8    ONNX Runtime, INT8 export (Q/DQ feature graph, fp32 temporal graph); made on the
              fly: calibrated on --calib (default: synthetic frames of another seed)
  trt         TensorRT, fp16 engines (the runtime's trt backend), where TensorRT is installed
  trt-fp32    TensorRT, fp32 engines
  tbn-run     the runtime's whole stream (decode a video written with cv2, infer, write PNG masks)
              with the fastest of the ort/trt rows

Every row is fed the same frames (a synthetic video from tbn_train.data.synth), frame by frame
and interleaved: frame t goes through every row before frame t+1, so slow drifts of the machine
(other processes, clocks, temperature) hit every row alike. The first --warmup frames are run
but not timed; the per-frame latency of the remaining --frames frames is reported as median,
p90 and p99 (quote medians). Speed-up is the first row's median over the row's median.

Memory per row: host RSS it adds when it is built and warmed up, plus the largest transient
rise during one of its frames (sampled every 5 ms, heap trimmed before each frame); on CUDA the
torch rows report torch.cuda.max_memory_allocated, the others the device memory they hold.

Model: --export DIR[,DIR...] (tbn-export outputs; the torch rows load the checkpoint named in
the manifest), or --model NAME --size HxW with random weights (BatchNorm statistics randomised
so the outputs are not degenerate); ONNX exports for the ort rows are then made on the fly in a
temporary folder (so are missing precisions of --export, from its checkpoint).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from paths import (  # noqa: E402
    BenchError, Skip, Source, make_source, BackendPath, cuda_sync, build_path, engine_export,
    row_precision)

ROWS = ("naive", "naive-fp16", "ring", "ring-fp16", "ort", "ort-fp16", "ort-int8", "trt",
        "trt-fp32", "tbn-run")
LABELS = {
    "naive": "PyTorch naive (backbone x4)",
    "naive-fp16": "PyTorch naive fp16 (backbone x4)",
    "ring": "PyTorch ring",
    "ring-fp16": "PyTorch ring fp16",
    "ort": "ONNX Runtime fp32",
    "ort-fp16": "ONNX Runtime fp16",
    "ort-int8": "ONNX Runtime int8",
    "trt": "TensorRT fp16",
    "trt-fp32": "TensorRT fp32",
    "tbn-run": "tbn-run end to end",
}


# -- measuring -----------------------------------------------------------------------------------
class Meter:
    """Memory bookkeeping of one row (see the module docstring)."""

    def __init__(self, device: str):
        self.device = device
        self.torch = None
        if device == "cuda":
            import torch
            self.torch = torch

    def device_used(self) -> int:
        if self.torch is None:
            return 0
        free, total = self.torch.cuda.mem_get_info()
        return total - free


def synth_frames(height: int, width: int, n: int, seed: int) -> List[np.ndarray]:
    """n frames of a synthetic video (moving textured objects on a panning background)."""
    from tbn_train.data.synth import make_video
    h2, w2 = height + height % 2, width + width % 2  # make_video wants even sizes
    imgs, _ = make_video(np.random.default_rng(seed), h2, w2, n, classes=5)
    return [np.ascontiguousarray(f[:height, :width]) for f in imgs]


def calibration(args: argparse.Namespace, src: Source) -> Any:
    """Calibration frames for the ort-int8 row: --calib, else a synthetic video of another
    seed than the timed frames."""
    from tbn_export.int8 import CalibrationFrames, read_calibration
    if args.calib:
        return read_calibration(args.calib, args.calib_frames, src.height, src.width)
    frames = synth_frames(src.height, src.width, args.calib_frames, args.seed + 1)
    return CalibrationFrames(frames, f"tbn_train.data.synth video (seed {args.seed + 1})",
                             ["synthetic"])


def run_rows(rows: Sequence[str], src: Source, device: str, frames: List[np.ndarray],
             warmup: int, time_budget: Optional[float]) -> List[Dict[str, Any]]:
    """Build every row, then stream the frames through them interleaved; results per row."""
    results: List[Dict[str, Any]] = []
    live: List[Tuple[Dict[str, Any], Any]] = []
    sampler = common.RssSampler()
    torch = None
    if device == "cuda":
        import torch
        torch.zeros(1, device="cuda")  # the CUDA context, so no row is charged for it
    try:
        for row in rows:
            res: Dict[str, Any] = {"row": row, "label": LABELS[row], "device": device}
            results.append(res)
            if row == "tbn-run":
                continue
            common.trim_heap()
            rss0 = common.rss_bytes()
            dev0 = Meter(device).device_used()
            t0 = time.perf_counter()
            try:
                path = build_path(row, src, device)
                path.reset()
                for f in frames[:warmup]:
                    path.infer(f)
                cuda_sync(device)
            except Skip as e:
                res["skipped"] = str(e)
                print(f"latency: {row}: skipped ({e})", file=sys.stderr, flush=True)
                continue
            common.trim_heap()
            res["setup_s"] = time.perf_counter() - t0
            res["describe"] = path.describe()
            res["resident_host_bytes"] = max(common.rss_bytes() - rss0, 0)
            res["resident_device_bytes"] = max(Meter(device).device_used() - dev0, 0)
            res["_times"], res["_transient"], res["_dev_peak"] = [], 0, 0
            backend = getattr(path, "backend", None)
            res["_stage0"] = dict(backend.timings) if backend is not None else None
            live.append((res, path))
            print(f"latency: {row}: ready ({res['describe']}, {res['setup_s']:.1f} s)",
                  file=sys.stderr, flush=True)

        start = time.perf_counter()
        for i, f in enumerate(frames[warmup:]):
            if time_budget is not None and i > 0 and time.perf_counter() - start > time_budget:
                print(f"latency: time budget of {time_budget:.0f} s spent after {i} frames",
                      file=sys.stderr, flush=True)
                break
            for res, path in live:
                common.trim_heap()
                if torch is not None:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    alloc0 = torch.cuda.memory_allocated()
                before = common.rss_bytes()
                sampler.start()
                t0 = time.perf_counter()
                path.infer(f)
                cuda_sync(device)
                dt = time.perf_counter() - t0
                peak = sampler.stop()
                res["_times"].append(dt)
                res["_transient"] = max(res["_transient"], peak - before)
                if torch is not None:
                    res["_dev_peak"] = max(res["_dev_peak"],
                                           torch.cuda.max_memory_allocated() - alloc0)
    finally:
        sampler.close()
        for res, path in live:
            backend = getattr(path, "backend", None)
            s0, n = res.pop("_stage0", None), len(res["_times"])
            if backend is not None and s0 is not None and n:
                # the runtime backend's own split: feature engine vs temporal engine, per frame
                res["stage_ms"] = {k: 1000 * (backend.timings[k] - s0[k]) / n for k in s0}
            try:
                path.close()
            except Exception:
                pass

    for res in results:
        if "_times" not in res:
            continue
        times = res.pop("_times")
        transient, dev_peak = res.pop("_transient"), res.pop("_dev_peak")
        if times:
            res.update(common.timing_stats(times))
            res["times_ms"] = [round(t * 1000, 3) for t in times]
        res["peak_host_mb"] = (res["resident_host_bytes"] + transient) / 2 ** 20
        if device == "cuda":
            res["peak_device_mb"] = (res["resident_device_bytes"] + dev_peak) / 2 ** 20
    return results


class _Stamped:
    """A backend proxy that records when each frame's labels are ready (for run_stream)."""

    def __init__(self, backend: Any):
        self._backend = backend
        self.stamps: List[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def infer(self, frame: np.ndarray) -> np.ndarray:
        labels = self._backend.infer(frame)
        self.stamps.append(time.perf_counter())
        return labels


def run_tbn_run(res: Dict[str, Any], results: List[Dict[str, Any]], src: Source, device: str,
                frames: List[np.ndarray], warmup: int, tmp: str) -> None:
    """The runtime's stream (tbn-run) on an mp4 written with cv2: decode + infer + PNG write.

    Uses the fastest ort/trt row's backend and export. A warm-up video of `warmup` frames is
    streamed first; then the timed video. Per-frame time = the interval between consecutive
    frames' labels (the stream overlaps decode and writes with inference, so this is what
    one frame costs in the steady state); fps = frames / wall time of the whole stream.
    """
    import cv2
    from tbn_runtime.sources import open_source
    from tbn_runtime.stream import run_stream
    cands = [r for r in results if r["row"] in ("ort", "ort-fp16", "ort-int8", "trt", "trt-fp32")
             and r.get("median_ms")]
    if not cands:
        res["skipped"] = "no ort/trt row ran, so there is no backend to stream with"
        return
    best = min(cands, key=lambda r: r["median_ms"])
    backend = "trt" if best["row"].startswith("trt") else "ort"
    precision = row_precision(best["row"])
    export = (engine_export(src, precision) if backend == "trt"
              else src.export_dir(precision, device))
    from tbn_runtime.manifest import load_manifest

    def write_video(path: str, fs: List[np.ndarray]) -> None:
        h, w = fs[0].shape[:2]
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 15, (w, h))
        if not writer.isOpened():
            raise Skip("OpenCV cannot write an mp4v video here")
        for f in fs:
            writer.write(f)
        writer.release()

    try:
        warm_video, video = os.path.join(tmp, "warmup.mp4"), os.path.join(tmp, "bench.mp4")
        write_video(warm_video, frames[:max(warmup, 1)])
        write_video(video, frames[warmup:])
        path = BackendPath(backend, export, load_manifest(export), device)
    except Skip as e:
        res["skipped"] = str(e)
        return
    try:
        stamped = _Stamped(path.backend)
        run_stream(open_source(warm_video), stamped, os.path.join(tmp, "masks-warmup"),
                   progress=False)
        stamped.stamps.clear()
        common.trim_heap()
        rss0 = common.rss_bytes()
        sampler = common.RssSampler()
        sampler.start()
        t0 = time.perf_counter()
        stats = run_stream(open_source(video), stamped, os.path.join(tmp, "masks"),
                           progress=False)
        peak = sampler.stop()
        sampler.close()
    finally:
        path.close()
    stamps = [t0] + stamped.stamps
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    res.update(common.timing_stats(intervals))
    res["fps"] = stats["frames"] / stats["wall_s"] if stats.get("wall_s") else res["fps"]
    res["stream_stats"] = stats
    res["backend"] = f"{backend} {precision}"
    res["describe"] = (f"tbn_runtime.stream.run_stream, {backend} {precision}: mp4 decode "
                       f"thread + infer + PNG writer pool")
    res["note"] = ("per-frame = interval between consecutive frames' labels; frames/s = "
                   "frames / stream wall time")
    res["peak_host_mb"] = max(peak - rss0, 0) / 2 ** 20 + next(
        (r.get("resident_host_bytes", 0) for r in results if r is best), 0) / 2 ** 20


# -- outputs -------------------------------------------------------------------------------------
def add_speedups(results: List[Dict[str, Any]]) -> None:
    base = next((r for r in results if r.get("median_ms")), None)
    for r in results:
        if base is not None and r.get("median_ms"):
            r["speedup"] = base["median_ms"] / r["median_ms"]
            r["speedup_vs"] = base["row"]


def table(report: Dict[str, Any]) -> str:
    gpu = report["device"] == "cuda"
    headers = ["path", "median ms", "p90 ms", "p99 ms", "frames/s", "peak host MB"]
    headers += ["peak GPU MB"] if gpu else []
    headers += ["speed-up", "frames"]
    rows = []
    for r in report["rows"]:
        if "skipped" in r:
            rows.append([r["label"], "-", "-", "-", "-", "-"] + (["-"] if gpu else [])
                        + ["-", f"not run: {r['skipped']}"])
            continue
        rows.append([r["label"], common.fmt(r.get("median_ms")), common.fmt(r.get("p90_ms")),
                     common.fmt(r.get("p99_ms")), common.fmt(r.get("fps"), 2),
                     common.fmt(r.get("peak_host_mb"), 0)]
                    + ([common.fmt(r.get("peak_device_mb"), 0)] if gpu else [])
                    + [f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
                       str(r.get("frames", "-"))])
    stages = [f"{r['label']}: feature {r['stage_ms']['feature']:.1f} ms + temporal "
              f"{r['stage_ms']['temporal']:.1f} ms" for r in report["rows"] if r.get("stage_ms")]
    cfg = report["config"]
    head = (f"Per-frame latency, {cfg['model']} at {cfg['height']}x{cfg['width']} on "
            f"{report['device']}, {cfg['frames']} frames after {cfg['warmup']} warm-up, "
            f"interleaved ({'random weights' if cfg['random_weights'] else 'trained weights'})\n"
            f"Machine: {common.machine_line(report['machine'])}")
    tail = ("\n\nMean engine time per frame (the backend's own split):\n" +
            "\n".join(f"- {x}" for x in stages)) if stages else ""
    return head + "\n\n" + common.markdown_table(headers, rows) + tail


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


def model_arguments(p: argparse.ArgumentParser, export_help: str) -> None:
    """The flags that choose the model (make_source reads them): --export, or --model and
    --size with random weights (--seed), and the calibration of an int8 export made on the fly."""
    p.add_argument("--export", help=export_help)
    p.add_argument("--model", default="tbn_swin_t", help="registry name for random weights "
                                                         "(default: %(default)s)")
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
    model_arguments(p, "tbn-export output dir(s), comma-separated (one per precision)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--frames", type=int, default=20, help="timed frames (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed frames first (default: "
                                                         "%(default)s)")
    p.add_argument("--only", help=f"comma-separated rows among {', '.join(ROWS)}")
    p.add_argument("--skip", help="comma-separated rows to leave out")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--time-budget", type=float, help="stop timing after this many seconds "
                                                     "(the frames done so far are reported)")
    p.add_argument("--ort-spinning", action="store_true",
                   help="leave ONNX Runtime's spin-waiting threads on (off by default: they "
                        "slow down the rows interleaved with them)")
    p.add_argument("--json", help="write the results (with machine and versions) here")
    p.add_argument("--plot", help="write a bar chart (PNG) here")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary exports")
    a = p.parse_args(argv)
    check_arguments(p, a)
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
    BackendPath.ort_no_spin = not args.ort_spinning
    tmp = tempfile.mkdtemp(prefix="tbn-latency-")
    try:
        t_start = time.time()
        load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
        src = make_source(args, tmp)
        src.calibration = lambda: calibration(args, src)
        frames = synth_frames(src.height, src.width, args.warmup + args.frames, args.seed)
        results = run_rows([r for r in args.rows], src, args.device, frames, args.warmup,
                           args.time_budget)
        for res in results:
            if res["row"] == "tbn-run":
                run_tbn_run(res, results, src, args.device, frames, args.warmup, tmp)
        add_speedups(results)
        report = {
            "benchmark": "latency",
            "device": args.device,
            "config": {"model": src.model_name, "height": src.height, "width": src.width,
                       "frames": args.frames, "warmup": args.warmup, "seed": args.seed,
                       "random_weights": src.random_weights,
                       "exports": {k: (None if v.startswith(tmp) else v)
                                   for k, v in src.exports.items()},
                       "export_seconds": src.export_seconds, "schedule": "interleaved",
                       "ort_spinning": bool(args.ort_spinning),
                       "int8_calibration": {"source": args.calib or "synthetic",
                                            "frames": args.calib_frames},
                       "rows": args.rows},
            "machine": common.machine_info(),
            "load_average": {"start": load0, "end": os.getloadavg() if load0 else None},
            "seconds": time.time() - t_start,
            "command": " ".join(["python", "benchmarks/latency.py"] + list(
                argv if argv is not None else sys.argv[1:])),
            "rows": results,
        }
        print(table(report))
        if args.json:
            common.write_json(args.json, report)
        if args.plot:
            plot(args.plot, report)
        return 0
    except BenchError as e:
        print(f"latency.py: {e}", file=sys.stderr)
        return 2
    finally:
        if args.keep_tmp:
            print(f"latency: temporary files kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
