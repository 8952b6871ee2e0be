"""The streams, e2e and train parts of benchmarks/gpu_rows.py (see its docstring): frames/s of
1..8 streams batched through one torch backend, the tbn-run stream on the torch backend against
the engine's own frames/s, and one Swin training step as the presets train."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_rows import Part, Stopped, _first_line  # noqa: E402


# -- streams ---------------------------------------------------------------------------------------
def run_streams(part: Part) -> None:
    from tbn_train.torch_backend import TorchBackend
    precision = part.args.precision or ("bf16" if part.cuda else "fp32")
    h, w = part.args.size
    counts = part.args.counts
    steps, warm = part.args.frames, part.args.warmup
    videos = part.frames(warm + steps, seed=1)
    part.report["precision"] = precision
    base = None
    for k in counts:
        if part.left() <= 0:
            part.add({"row": f"{k} streams", "skipped": "the time budget was spent"})
            continue
        part.fresh()
        row: Dict[str, Any] = {"row": f"{k} stream{'s' * (k > 1)}", "streams": k}
        try:
            b = TorchBackend.from_model(part.model(), h, w, part.args.device, streams=k,
                                        precision=precision)
            try:
                for s in range(k):
                    b.reset(s)
                times = []
                for t in range(warm + steps):
                    frame = videos[t]
                    t0 = time.perf_counter()
                    b.step([frame] * k, list(range(k)), [True] * k)
                    if t >= warm:
                        times.append(time.perf_counter() - t0)
                    if part.left() <= 0:
                        raise Stopped("the time budget")
                step = float(np.median(times))
                row.update({"median_step_ms": 1e3 * step, "frames_per_s": k / step,
                            "graphs": sorted(b._graphs), "describe": b.describe()})
                if b.capture_failures:
                    row["row"] += " (CUDA GRAPH CAPTURE FAILED: eager)"
                row.update(part.memory())
            finally:
                b.close()
            base = base or row["frames_per_s"]
            row["speedup_vs_1"] = row["frames_per_s"] / base
        except Stopped:
            raise
        except Exception as e:
            row["failed"] = _first_line(e)
        part.add(row)


# -- e2e -------------------------------------------------------------------------------------------
def run_e2e(part: Part) -> None:
    import cv2

    from tbn_runtime.segmenter import Segmenter
    from tbn_runtime.stream import run_stream
    from tbn_train.torch_backend import TorchBackend

    precision = part.args.precision or ("bf16" if part.cuda else "fp32")
    h, w = part.args.size
    frames = part.frames(part.args.warmup + part.args.frames, seed=2)
    tmp = tempfile.mkdtemp(prefix="tbn-gpu-e2e-")

    def video(path: str, fs: List[np.ndarray]) -> str:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 25, (w, h))
        for f in fs:
            writer.write(f)
        writer.release()
        return path

    row: Dict[str, Any] = {"row": f"tbn-run stream, torch {precision}"}
    warm = video(os.path.join(tmp, "warm.mp4"), frames[:max(part.args.warmup, 1)])
    timed = video(os.path.join(tmp, "timed.mp4"), frames[part.args.warmup:])
    part.fresh()
    b = TorchBackend.from_model(part.model(), h, w, part.args.device, precision=precision)
    try:
        seg = Segmenter(backend=b)
        run_stream(seg, warm, os.path.join(tmp, "masks-warm"), progress=False)
        b.timings = dict.fromkeys(b.timings, 0.0)
        b.frames = 0
        t0 = time.perf_counter()
        stats = run_stream(seg, timed, os.path.join(tmp, "masks"), progress=False)
        wall = time.perf_counter() - t0
        engine_s = b.timings["feature"] + b.timings["temporal"]
        row.update({"frames": stats.get("frames"), "wall_s": wall,
                    "frames_per_s": stats.get("frames", 0) / wall,
                    "engine_frames_per_s": b.frames / engine_s if engine_s else None,
                    "describe": b.describe(), "stream_stats": stats})
        if row["engine_frames_per_s"]:
            row["share_of_engine"] = row["frames_per_s"] / row["engine_frames_per_s"]
        row.update(part.memory())
    finally:
        b.close()
        shutil.rmtree(tmp, ignore_errors=True)
    part.add(row)


# -- train -----------------------------------------------------------------------------------------
def run_train(part: Part) -> None:
    torch = part.torch
    h, w = part.args.train_size
    row: Dict[str, Any] = {"row": f"train step {part.args.model} bf16 grad-checkpointing "
                                  f"{h}x{w} batch 2"}
    part.fresh()
    model = part.model(train=True)
    model.set_grad_checkpointing(True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator(device=part.args.device).manual_seed(0)
    clip = torch.randn(2, 4, 3, h, w, device=part.args.device, generator=g)
    target = torch.randint(0, 124, (2, h, w), device=part.args.device, generator=g)
    times = []
    for i in range(1 + part.args.train_steps):
        t0 = time.perf_counter()
        with torch.autocast(part.args.device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(clip), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if part.cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        if part.left() <= 0:
            break
    row.update({"step_s": float(np.median(times)) if times else None,
                "steps_timed": len(times), "loss": float(loss.detach())})
    row.update(part.memory())
    part.add(row)
