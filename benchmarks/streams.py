"""Frames per second with 1, 2, 4, 8 streams on one device: where batching pays.

    python benchmarks/streams.py                                    # tbn_tiny 160x224, CPU
    python benchmarks/streams.py --model tbn_swin_t --size 480x480 --steps 4
    python benchmarks/streams.py --model tbn_swin_l --size 480x864 --device cuda   # GPU rows

N synthetic videos run at once through one Segmenter with N streams (what `tbn-run A B ...
--streams N` does): every step takes the current frame of each stream, the feature engine runs
them as one batch, the temporal engine too, each stream keeping its own ring. Measured: the
frames of all streams per second of engine steps (decode and writes excluded: they run in other
threads in tbn-run), the median step time, and the speed-up over one stream. Rows: ONNX Runtime
(the export's precision), OpenVINO (openvino: its default, one async request per stream on
OpenVINO's throughput streams; openvino-batch: one batched request per engine call), PyTorch
(fp16 weights and CUDA graphs per batch size on CUDA), TensorRT where it is installed. Steps are
interleaved across the stream counts of a row, so a machine's drift hits them alike; quote
ratios within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from paths import BenchError, Skip, engine_export, make_source  # noqa: E402

COUNTS = (1, 2, 4, 8)


#: the rows: a runtime backend, or openvino-batch (the openvino backend with one batched request
#: per engine call, against its default: one async request per stream)
ROWS = ("ort", "openvino", "openvino-batch", "torch", "trt")


def backends_for(device: str) -> List[str]:
    return ["ort", "torch", "trt"] if device == "cuda" else ["ort", "openvino", "openvino-batch",
                                                            "torch"]


def make_segmenter(backend: str, src: Any, device: str, streams: int, tmp: str) -> Any:
    """A Segmenter of `streams` streams on `backend`; Skip when it cannot run here."""
    from tbn_runtime.backends import BackendError, backend_class
    from tbn_runtime.manifest import load_manifest
    from tbn_runtime.segmenter import Segmenter

    options: Dict[str, Any] = {}
    if backend == "openvino-batch":
        backend, options = "openvino", {"mode": "batch"}
    cls = backend_class(backend)
    ok, why = cls.available(device)
    if not ok:
        raise Skip(why)
    if backend == "torch":
        precision = "fp16" if device == "cuda" else "fp32"
        manifest = dataclasses.replace(src.manifest, precision=precision)
        export = tmp
    else:
        precision = "fp16" if backend == "trt" else "fp32"
        export = (engine_export(src, precision) if backend == "trt"
                  else src.export_dir(precision, device))
        manifest = load_manifest(export)
    # the segmenters of a row take turns on the same cores: ONNX Runtime's threads must not
    # spin-wait between runs (see paths.BackendPath.ort_no_spin)
    if backend == "ort":
        options["spinning"] = False
    try:
        return Segmenter(backend=cls(export, manifest, device, streams=streams, **options))
    except BackendError as e:
        raise Skip(str(e)) from None


def measure_row(backend: str, src: Any, device: str, counts: Sequence[int], steps: int,
                warmup: int, tmp: str) -> Dict[str, Any]:
    """Frames/s of one backend at every stream count (steps interleaved across counts)."""
    import cv2  # noqa: F401  (the Segmenter's resize)
    from tbn_train.data.synth import synthetic_frames

    row: Dict[str, Any] = {"backend": backend, "device": device, "counts": {}}
    n = max(counts)
    videos = [synthetic_frames(steps + warmup, src.height, src.width, seed=s) for s in range(n)]
    segs = {}
    try:
        for k in counts:
            segs[k] = make_segmenter(backend, src, device, k, tmp)
        row["describe"] = segs[max(counts)].describe()
        times: Dict[int, List[float]] = {k: [] for k in counts}
        for t in range(warmup + steps):
            for k in counts:
                frames = [videos[s][t] for s in range(k)]
                t0 = time.perf_counter()
                segs[k].segment_many(frames, list(range(k)))
                if t >= warmup:
                    times[k].append(time.perf_counter() - t0)
        base = None
        for k in counts:
            step = float(np.median(times[k]))
            fps = k / step
            base = base or fps
            row["counts"][k] = {"median_step_ms": 1e3 * step, "frames_per_s": fps,
                                "per_stream_fps": fps / k, "speedup": fps / base,
                                "batch_limit": segs[k].backend.batch_limit}
    finally:
        for seg in segs.values():
            seg.close()
    return row


def table(report: Dict[str, Any]) -> str:
    counts = report["config"]["counts"]
    headers = ["backend"] + [f"{k} stream{'s' * (k > 1)}" for k in counts] + ["note"]
    rows = []
    for r in report["rows"]:
        if "skipped" in r or "failed" in r:
            rows.append([r["backend"]] + ["-"] * len(counts) +
                        [r.get("skipped") or f"FAILED {r['failed']}"])
            continue
        cells = [f"{c['frames_per_s']:.1f} fps ({c['speedup']:.2f}x)"
                 for c in (r["counts"][k] for k in counts)]
        rows.append([r["backend"]] + cells + [r.get("describe", "")])
    cfg = report["config"]
    head = (f"Frames/s of all streams together, {cfg['model']} at {cfg['height']}x{cfg['width']} "
            f"on {report['device']} ({cfg['steps']} steps after {cfg['warmup']} warm-up; "
            f"speed-up over one stream)\nMachine: {common.machine_line(report['machine'])}")
    return head + "\n\n" + common.markdown_table(headers, rows)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="streams.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--export", help="tbn-export output dir (default: random --model weights)")
    p.add_argument("--model", default="tbn_tiny", help="registry name (default %(default)s)")
    p.add_argument("--size", default="160x224", help="HEIGHTxWIDTH (default %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--counts", default=",".join(map(str, COUNTS)),
                   help="stream counts (default %(default)s)")
    p.add_argument("--backends", help=f"comma-separated among {', '.join(ROWS)} (default: all "
                                      f"that run on --device)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    a.size = common.parse_size(a.size)
    a.counts = sorted({int(c) for c in a.counts.split(",")})
    a.backends = a.backends.split(",") if a.backends else backends_for(a.device)
    a.only = None
    if a.steps < 1 or a.warmup < 0 or a.counts[0] < 1:
        p.error("--steps >= 1, --warmup >= 0 and counts >= 1")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="tbn-streams-")
    try:
        src = make_source(args, tmp)
        rows = []
        for backend in args.backends:
            try:
                rows.append(measure_row(backend, src, args.device, args.counts, args.steps,
                                        args.warmup, tmp))
            except Skip as e:
                rows.append({"backend": backend, "skipped": str(e)})
            except Exception as e:  # a failing row is reported, the others go on
                rows.append({"backend": backend, "failed": f"{type(e).__name__}: {e}"})
            print(f"streams: {backend} done", file=sys.stderr, flush=True)
        report = {"benchmark": "streams", "device": args.device,
                  "config": {"model": src.model_name, "height": src.height, "width": src.width,
                             "counts": args.counts, "steps": args.steps, "warmup": args.warmup,
                             "random_weights": src.random_weights},
                  "machine": common.machine_info(),
                  "command": " ".join(["python", "benchmarks/streams.py"] + list(
                      argv if argv is not None else sys.argv[1:])),
                  "rows": rows}
        print(table(report))
        if args.json:
            common.write_json(args.json, report)
        return 0
    except BenchError as e:
        print(f"streams.py: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
