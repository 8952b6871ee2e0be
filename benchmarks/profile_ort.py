"""Where the time goes: ONNX Runtime's own profile of both engines, summed per op type.

    python benchmarks/profile_ort.py                                 # tbn_swin_t 480x480, fp32 + int8
    python benchmarks/profile_ort.py --export runs/tbn/export,runs/tbn/export-int8 --frames 10

Each export's feature and temporal graphs run in ONNX Runtime on the CPU (the one session
factory, with profiling on) over a synthetic video, chained through a feature ring as the
runtime chains them, the exports interleaved frame by frame; the first --warmup frames are run
but not counted. From the JSON profile
ONNX Runtime writes, the kernel time of every node is summed per op type (after ONNX Runtime's
fusions, so the names are the kernels that ran: MatMulIntegerToFloat, QLinearConv, Gelu, ...).
Reported per graph: wall-clock median per frame, and the op types with their ms per frame and
share of the graph's kernel time. Model: --export DIR[,DIR] or --model/--size with random
weights (exports made on the fly, as latency.py makes them; int8 calibrated on synthetic frames
of another seed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from latency import (  # noqa: E402
    calibration, check_arguments, model_arguments, synth_frames)
from paths import BenchError, Skip, make_source  # noqa: E402

GRAPHS = ("feature", "temporal")


def op_times(profile_path: str, skip_runs: int) -> Dict[str, Dict[str, float]]:
    """{op type: {"us": kernel microseconds, "nodes": kernel calls}} of a profile, without the
    nodes of its first `skip_runs` runs (model_run events mark each run)."""
    with open(profile_path) as f:
        events = json.load(f)
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    start = runs[skip_runs] if len(runs) > skip_runs else float("inf")
    out: Dict[str, Dict[str, float]] = defaultdict(lambda: {"us": 0.0, "nodes": 0})
    for e in events:
        if (e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                and e["ts"] >= start):
            op = e.get("args", {}).get("op_name", "?")
            out[op]["us"] += float(e["dur"])
            out[op]["nodes"] += 1
    return dict(out)


class Profiled:
    """Both graphs of one export in profiling sessions, chained through a feature ring."""

    def __init__(self, export_dir: str, tmp: str, index: int, threads: Optional[int] = None):
        from tbn_runtime.backends.ort import create_session
        from tbn_runtime.manifest import load_manifest
        from tbn_runtime.temporal import FeatureRing

        self.export_dir = export_dir
        self.m = m = load_manifest(export_dir)
        prefix = os.path.join(tmp, f"{index}-{m.precision}-")
        # no spinning: the exports take turns on the same cores (as in latency.py)
        self.sess = {g: create_session(m.verify_file(export_dir, f"{g}.onnx"), spinning=False,
                                       threads=threads, profile_prefix=prefix + g)
                     for g in GRAPHS}
        self.ring = None
        if m.temporal_offsets:
            self.ring = FeatureRing([np.zeros(m.feature_shape, np.dtype(m.feature_dtype))
                                     for _ in range(m.ring_size)], m.temporal_offsets)
        self.wall: Dict[str, List[float]] = {g: [] for g in GRAPHS}

    def step(self, frame: np.ndarray, timed: bool) -> None:
        m = self.m
        t0 = time.perf_counter()
        (feat,) = self.sess["feature"].run([m.feature_output], {m.frame_input: frame[None]})
        t1 = time.perf_counter()
        feed = {m.current_input: feat}
        if self.ring is not None:
            self.ring.write_target()[...] = feat
            feed.update(zip(m.past_inputs, self.ring.past()))
        self.sess["temporal"].run([m.labels_output], feed)
        if timed:
            self.wall["feature"].append(t1 - t0)
            self.wall["temporal"].append(time.perf_counter() - t1)

    def result(self, warmup: int) -> Dict[str, Any]:
        m, n = self.m, len(self.wall["feature"])
        out: Dict[str, Any] = {"export": self.export_dir, "precision": m.precision,
                               "model": m.model, "height": m.height, "width": m.width,
                               "frames": n, "graphs": {}}
        for g in GRAPHS:
            ops = op_times(self.sess[g].end_profiling(), warmup)
            total = sum(v["us"] for v in ops.values()) or 1.0
            out["graphs"][g] = {
                "median_ms": 1000 * float(np.median(self.wall[g])),
                "ops": {op: {"ms_per_frame": v["us"] / 1000 / n, "share": v["us"] / total,
                             "nodes_per_frame": v["nodes"] / n}
                        for op, v in sorted(ops.items(), key=lambda kv: -kv[1]["us"])}}
        return out


def profile_exports(dirs: Sequence[str], frames: Sequence[np.ndarray], warmup: int, tmp: str,
                    threads: Optional[int] = None) -> List[Dict[str, Any]]:
    """Every export over the same frames, interleaved frame by frame (so a change in the
    machine's load hits all alike); per export and graph: wall median and time per op type."""
    runs = [Profiled(d, tmp, i, threads) for i, d in enumerate(dirs)]
    for i, frame in enumerate(frames):
        for r in runs:
            r.step(frame, timed=i >= warmup)
    return [r.result(warmup) for r in runs]


def table(results: Sequence[Dict[str, Any]], top: int) -> str:
    """One markdown table per graph: op types (rows) by export (columns: ms and share)."""
    out = []
    for g in GRAPHS:
        first = results[0]["graphs"][g]["ops"]
        ops = list(first)[:top]
        for r in results[1:]:
            ops += [op for op in list(r["graphs"][g]["ops"])[:top] if op not in ops]
        headers = ["op type"] + [f"{os.path.basename(os.path.normpath(r['export']))} "
                                 f"({r['precision']}) ms (share)" for r in results]
        rows = []
        for op in ops:
            cells = []
            for r in results:
                v = r["graphs"][g]["ops"].get(op)
                cells.append("-" if v is None else
                             f"{v['ms_per_frame']:.1f} ({100 * v['share']:.0f}%)")
            rows.append([op] + cells)
        rest = []
        for r in results:
            shown = sum(v["ms_per_frame"] for op, v in r["graphs"][g]["ops"].items()
                        if op in ops)
            total = sum(v["ms_per_frame"] for v in r["graphs"][g]["ops"].values())
            rest.append(f"{total - shown:.1f}")
        rows.append(["(other op types)"] + rest)
        rows.append(["kernel time, sum"] + [
            f"{sum(v['ms_per_frame'] for v in r['graphs'][g]['ops'].values()):.1f}"
            for r in results])
        rows.append(["wall clock, median"] + [f"{r['graphs'][g]['median_ms']:.1f}"
                                              for r in results])
        out.append(f"{g} graph (ms per frame)\n\n" + common.markdown_table(headers, rows))
    return "\n\n".join(out)


def _manifest(export_dir: str) -> Any:
    from tbn_runtime.manifest import ManifestError, load_manifest
    try:
        return load_manifest(export_dir)
    except ManifestError as e:
        raise BenchError(str(e)) from None


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="profile_ort.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    model_arguments(p, "export dirs, comma-separated (any precisions, two of one allowed)",
                    model_default="tbn_swin_t")
    p.add_argument("--precisions", default="fp32,int8",
                   help="exports to make with --model (default: %(default)s)")
    p.add_argument("--frames", type=int, default=5, help="profiled frames (default: "
                                                         "%(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="frames run first, not counted")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--top", type=int, default=12, help="op types listed per graph")
    p.add_argument("--json", help="write the results (with machine and load) here")
    a = p.parse_args(argv)
    check_arguments(p, a)
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="tbn-profile-")
    try:
        load0 = os.getloadavg()
        if args.export:  # any exports of one model and size, two of a precision allowed
            dirs = [d for d in args.export.split(",") if d]
            first = _manifest(dirs[0])
            name, height, width = first.model, first.height, first.width
            for d in dirs[1:]:
                m = _manifest(d)
                if (m.model, m.height, m.width) != (name, height, width):
                    raise BenchError(f"exports differ: {dirs[0]} is {name} {height}x{width}, "
                                     f"{d} is {m.model} {m.height}x{m.width}")
        else:
            src = make_source(args, tmp)
            src.calibration = lambda: calibration(args, src)
            dirs = [src.export_dir(p.strip(), "cpu") for p in args.precisions.split(",")
                    if p.strip()]
            name, height, width = src.model_name, src.height, src.width
        frames = synth_frames(height, width, args.warmup + args.frames, args.seed)
        results = profile_exports(dirs, frames, args.warmup, tmp, args.threads)
        report = {"benchmark": "profile_ort", "config": vars(args) | {"size": list(args.size)},
                  "machine": common.machine_info(),
                  "load_average": {"start": load0, "end": os.getloadavg()},
                  "command": " ".join(["python", "benchmarks/profile_ort.py"] + list(
                      argv if argv is not None else sys.argv[1:])),
                  "results": results}
        print(f"ONNX Runtime profile per op type, {name} at {height}x{width}, "
              f"{args.frames} frames after {args.warmup} warm-up; load average "
              f"{load0[0]:.1f} -> {report['load_average']['end'][0]:.1f}\n"
              f"Machine: {common.machine_line(report['machine'])}\n")
        print(table(results, args.top))
        if args.json:
            common.write_json(args.json, report)
        return 0
    except (BenchError, Skip) as e:
        print(f"profile_ort.py: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
