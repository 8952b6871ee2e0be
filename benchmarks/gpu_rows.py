"""The measurements of the GPU check, one part per process, the JSON rewritten after every row.

    python benchmarks/gpu_rows.py --part rows --json rows.json          # tbn_swin_l 480x864, CUDA
    python benchmarks/gpu_rows.py --part rows --device cpu --model tbn_tiny --size 64x96 \\
        --frames 3 --warmup 1 --json /tmp/rows.json                    # the same code on a CPU

Parts (benchmarks/gpu_check.py runs each as a step with its own time limit; streams, e2e and
train are in gpu_parts.py):
  rows     the torch paths one after another on the same frames: naive fp32 (TF32 off) / fp16 /
           bf16 (model(clip) per frame, autocast: what a PyTorch user runs); the runtime's torch
           backend (feature ring) fp32 with TF32 off and on, fp16 and bf16 with CUDA graphs and
           eager, bf16 with timm's unfused attention. Per row: median and p90 per frame, the
           feature / temporal split (CUDA events), peak and reserved GPU memory, labels equal
           to naive fp32. A row whose graph capture failed says so in its name.
  compile  the ring bf16 row with torch.compile (opt-in; kept only if it beats graphs)
  streams  1, 2, 4, 8 streams batched through one torch backend (graphs per batch size):
           frames/s of all streams together
  e2e      tbn_runtime.stream.run_stream (what tbn-run runs) with the torch backend on an mp4
           at the export size: decode thread, engines, PNG writer pool; frames/s against the
           engine's own frames/s in the same run
  train    one Swin training step as the presets train (bf16 autocast, gradient checkpointing)
           at 480x480, batch 2 clips of 4 frames: seconds and peak memory
Random weights (BatchNorm statistics randomised), seeded: every part builds the same model.
--budget bounds the part (it stops between rows or steps and writes what it has); SIGTERM
stops it the same way.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.modules.setdefault("gpu_rows", sys.modules[__name__])  # gpu_parts shares this Part class
import common  # noqa: E402
from paths import NaivePath  # noqa: E402

from tbn_runtime.errors import Stopped  # noqa: E402  (SIGTERM or the budget: keep what ran)

PARTS = ("rows", "compile", "streams", "e2e", "train")


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Stopped("SIGTERM")


class Part:
    """What every part shares: the arguments, the report and its JSON, the clock, the model."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        self.torch, self.args = torch, args
        self.cuda = args.device == "cuda"
        self.start = time.perf_counter()
        self.report: Dict[str, Any] = {
            "part": args.part, "model": args.model, "height": args.size[0],
            "width": args.size[1], "device": args.device, "frames": args.frames,
            "warmup": args.warmup, "machine": common.machine_info(), "rows": []}
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            self.report["gpu"] = {"name": p.name, "memory_gb": round(p.total_memory / 2 ** 30, 1)}
        self.save()

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.report["seconds"] = round(time.perf_counter() - self.start, 2)
        common.write_json(self.args.json, self.report)

    def add(self, row: Dict[str, Any]) -> Dict[str, Any]:
        self.report["rows"].append(row)
        self.save()
        print(f"gpu_rows: {row.get('row')}: " + (
            f"{row['median_ms']:.2f} ms" if row.get("median_ms") is not None else
            str(row.get("skipped") or row.get("failed") or row.get("seconds"))),
            file=sys.stderr, flush=True)
        return row

    def model(self, name: Optional[str] = None, train: bool = False) -> Any:
        """The seeded random model, built on the device (fast init), eval mode."""
        torch = self.torch
        from tbn_train.models import build_model, randomize_batchnorm
        torch.manual_seed(self.args.seed)
        with torch.device(self.args.device):
            m = build_model(name or self.args.model)
        randomize_batchnorm(m, self.args.seed)
        return m.train() if train else m.eval()

    def frames(self, n: int, seed: int = 0) -> List[np.ndarray]:
        from tbn_train.data.synth import synthetic_frames
        return synthetic_frames(n, self.args.size[0], self.args.size[1], seed=seed)

    def memory(self) -> Dict[str, float]:
        if not self.cuda:
            return {}
        c = self.torch.cuda
        return {"peak_mb": round(c.max_memory_allocated() / 2 ** 20, 1),
                "reserved_mb": round(c.max_memory_reserved() / 2 ** 20, 1)}

    def fresh(self) -> None:
        """Between rows: free the previous row's memory and restart the peaks."""
        import gc
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def tf32(self, on: bool) -> None:
        if self.cuda:
            self.torch.set_float32_matmul_precision("high" if on else "highest")
            self.torch.backends.cudnn.allow_tf32 = on


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


# -- rows ------------------------------------------------------------------------------------------
def row_specs(device: str, compile_rows: bool = False) -> List[Dict[str, Any]]:
    """The rows of the rows part (or of the compile part) for a device."""
    cuda = device == "cuda"
    naive = [{"row": "naive fp32", "naive": True, "precision": "fp32"},
             {"row": "naive fp16", "naive": True, "precision": "fp16", "cuda_only": True},
             {"row": "naive bf16", "naive": True, "precision": "bf16"}]
    ring = [{"row": "ring fp32", "precision": "fp32", "tf32": False},
            {"row": "ring fp32 TF32", "precision": "fp32", "tf32": True, "cuda_only": True},
            {"row": "ring fp16", "precision": "fp16", "cuda_only": True},
            {"row": "ring fp16 eager", "precision": "fp16", "graphs": False, "cuda_only": True},
            {"row": "ring bf16", "precision": "bf16"},
            {"row": "ring bf16 eager", "precision": "bf16", "graphs": False, "cuda_only": True},
            {"row": "ring bf16 timm attention", "precision": "bf16", "fused": False}]
    if compile_rows:
        return [{"row": "ring bf16 compile", "precision": "bf16", "compile": True}]
    return [r for r in naive + ring if cuda or not r.get("cuda_only")]


def make_path(part: Part, spec: Dict[str, Any]) -> Any:
    from tbn_train.torch_backend import TorchBackend
    model = part.model()
    part.tf32(bool(spec.get("tf32", False)))
    if spec.get("naive"):
        return NaivePath(None, part.args.device, spec["precision"] == "fp16",
                         spec["precision"] == "bf16", model=model)
    h, w = part.args.size
    return TorchBackend.from_model(model, h, w, part.args.device, precision=spec["precision"],
                                   tf32=bool(spec.get("tf32", True)),
                                   cuda_graphs=spec.get("graphs", True),
                                   fused_attention=spec.get("fused", True),
                                   compile=bool(spec.get("compile", False)))


def time_row(part: Part, spec: Dict[str, Any], frames: List[np.ndarray],
             ref: Optional[List[np.ndarray]]) -> Dict[str, Any]:
    """Build, warm up and time one row on `frames`; labels of every frame kept in spec."""
    row: Dict[str, Any] = {"row": spec["row"]}
    if spec.get("cuda_only") and not part.cuda:
        row["skipped"] = "CUDA only"
        return row
    part.fresh()
    t0 = time.perf_counter()
    path = make_path(part, spec)
    try:
        row["describe"] = path.describe()
        if getattr(path, "capture_failures", None):
            row["row"] += " (CUDA GRAPH CAPTURE FAILED: eager)"
        path.reset()
        times, labels = [], []
        warm = part.args.warmup
        for i, f in enumerate(frames):
            if i == warm:
                row["build_and_warmup_s"] = round(time.perf_counter() - t0, 2)
                if hasattr(path, "timings"):
                    path.timings = dict.fromkeys(path.timings, 0.0)
                    path.frames = 0
            t = time.perf_counter()
            labels.append(path.infer(f))
            if i >= warm:
                times.append(time.perf_counter() - t)
            if part.left() <= 0:
                raise Stopped("the time budget")
        if getattr(path, "capture_failures", None) and "FAILED" not in row["row"]:
            row["row"] += " (CUDA GRAPH CAPTURE FAILED: eager)"  # a batch size captured later
        row.update(common.timing_stats(times))
        if hasattr(path, "timings") and path.frames:
            row["feature_ms"] = 1e3 * path.timings["feature"] / path.frames
            row["temporal_ms"] = 1e3 * path.timings["temporal"] / path.frames
            row["engine_ms"] = row["feature_ms"] + row["temporal_ms"]
        row.update(part.memory())
        if ref is not None:
            row["labels_equal"] = float(np.mean([(a == b).mean() for a, b in zip(labels, ref)]))
        spec["labels"] = labels
    finally:
        path.close()
    return row


def run_rows(part: Part, compile_rows: bool = False) -> None:
    n = part.args.warmup + part.args.frames
    frames = part.frames(n)
    ref = None
    specs = row_specs(part.args.device, compile_rows)
    if compile_rows:  # against naive fp32 here too: computed first, not timed
        specs = [{"row": "naive fp32", "naive": True, "precision": "fp32", "untimed": True}] \
            + specs
    for spec in specs:
        if part.left() <= 0:
            part.add({"row": spec["row"], "skipped": "the time budget was spent"})
            continue
        try:
            row = time_row(part, spec, frames, ref)
        except Stopped:
            raise
        except Exception as e:  # a failing row is reported, the others go on
            row = {"row": spec["row"], "failed": _first_line(e)}
            if "out of memory" in str(e).lower():
                row["failed"] = "out of GPU memory: " + row["failed"]
        if ref is None and spec["row"] == "naive fp32" and "labels" in spec:
            ref = spec["labels"]
            row["labels_equal"] = 1.0
        spec.pop("labels", None)
        if not spec.get("untimed"):
            part.add(row)
    base = next((r for r in part.report["rows"] if r["row"] == "naive fp32"
                 and r.get("median_ms")), None)
    for r in part.report["rows"]:
        if base and r.get("median_ms"):
            r["speedup_vs_naive_fp32"] = base["median_ms"] / r["median_ms"]
    part.save()


def runner(part: str) -> Callable[[Part], None]:
    """The function that measures a part (streams, e2e and train live in gpu_parts.py)."""
    if part == "rows":
        return run_rows
    if part == "compile":
        return lambda p: run_rows(p, compile_rows=True)
    import gpu_parts
    return {"streams": gpu_parts.run_streams, "e2e": gpu_parts.run_e2e,
            "train": gpu_parts.run_train}[part]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_rows.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--part", required=True, choices=PARTS)
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model", default="tbn_swin_l")
    p.add_argument("--size", default="480x864")
    p.add_argument("--train-size", default="480x480")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--frames", type=int, default=50, help="timed frames (steps for streams)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--counts", default="1,2,4,8", help="stream counts (streams part)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                   help="streams/e2e precision (default bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--budget", type=float, default=300, help="seconds for this part")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.size = common.parse_size(a.size)
    a.train_size = common.parse_size(a.train_size)
    a.counts = sorted({int(c) for c in a.counts.split(",")})
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    part = None
    try:
        part = Part(args)
        runner(args.part)(part)
        part.report["finished"] = True
        return 0
    except Stopped as e:
        if part is not None:
            part.report["stopped"] = str(e)
        print(f"gpu_rows: stopped by {e}; what was measured is in {args.json}", file=sys.stderr)
        return 0 if str(e) == "the time budget" else 143
    finally:
        if part is not None:
            part.save()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
