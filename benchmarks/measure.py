"""How latency.py measures: build every row, stream the frames through them interleaved, keep
going when one row fails, and compare every row's labels with the reference row's.

A row that cannot run here is skipped with the reason (paths.Skip); a row that breaks while it
is built or timed (an import error, a bad export, CUDA out of memory) is reported as failed with
its reason and closed, and the other rows go on. Everything measured so far lives in the result
dicts, so a run cut short (the time budget, SIGTERM) still reports it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import common
from paths import BackendPath, Skip, Source, build_path, cuda_sync, engine_export, row_precision


class Budget:
    """A deadline for the whole benchmark (exports and engine builds included); None: none."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.seconds = seconds
        self.deadline = None if seconds is None else time.perf_counter() + seconds

    def left(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - time.perf_counter()

    def spent(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def device_used(device: str) -> int:
    """Bytes in use on the GPU (all processes, as the driver counts them); 0 on the CPU."""
    if device != "cuda":
        return 0
    import torch
    free, total = torch.cuda.mem_get_info()
    return total - free


def _close(path: Any) -> None:
    try:
        path.close()
    except Exception:  # a broken row must not take the others with it
        pass


def _fail(res: Dict[str, Any], e: BaseException, when: str, device: str) -> None:
    res["failed"] = f"{when}: {one_line(e)}"
    print(f"latency: {res['row']}: failed {res['failed']}", file=sys.stderr, flush=True)
    if device == "cuda":
        import torch
        torch.cuda.empty_cache()  # what an out-of-memory row held, for the rows after it


def build_rows(rows: Sequence[str], labels: Dict[str, str], src: Source, device: str,
               frames: List[np.ndarray], warmup: int, budget: Budget
               ) -> Tuple[List[Dict[str, Any]], List[Tuple[Dict[str, Any], Any]]]:
    """(a result dict per row, the (result, path) of every row that is ready to be timed)."""
    results: List[Dict[str, Any]] = []
    live: List[Tuple[Dict[str, Any], Any]] = []
    for row in rows:
        res: Dict[str, Any] = {"row": row, "label": labels[row], "device": device}
        results.append(res)
        if row == "tbn-run":
            continue
        if budget.spent():
            res["skipped"] = "the time budget was spent before this row was built"
            continue
        common.trim_heap()
        rss0, dev0 = common.rss_bytes(), device_used(device)
        t0 = time.perf_counter()
        path = None
        try:
            path = build_path(row, src, device, budget.left())
            path.reset()
            for f in frames[:warmup]:
                path.infer(f)
            cuda_sync(device)
        except Skip as e:
            res["skipped"] = str(e)
            print(f"latency: {row}: skipped ({e})", file=sys.stderr, flush=True)
            continue
        except Exception as e:
            if path is not None:
                _close(path)
            _fail(res, e, "while building", device)
            continue
        common.trim_heap()
        res["setup_s"] = time.perf_counter() - t0
        res["describe"] = path.describe()
        res["resident_host_bytes"] = max(common.rss_bytes() - rss0, 0)
        res["resident_device_bytes"] = max(device_used(device) - dev0, 0)
        res["_times"], res["_transient"], res["_dev_peak"] = [], 0, 0
        res["_equal"], res["_pixels"] = 0, 0
        backend = getattr(path, "backend", None)
        if getattr(backend, "capture_failures", None):  # the torch backend ran eager: say so
            res["label"] += " (CUDA GRAPH CAPTURE FAILED: eager)"
        res["_stage0"] = dict(backend.timings) if backend is not None else None
        live.append((res, path))
        print(f"latency: {row}: ready ({res['describe']}, {res['setup_s']:.1f} s)",
              file=sys.stderr, flush=True)
    return results, live


def time_rows(live: List[Tuple[Dict[str, Any], Any]], frames: List[np.ndarray], device: str,
              budget: Budget, reference: str = "naive") -> None:
    """Stream the frames through the live rows, interleaved frame by frame; per row the time of
    each frame, its memory, and how many pixels' labels equal the reference row's (the
    `reference` row if it runs, else the first row)."""
    if not live:
        return
    torch = None
    if device == "cuda":
        import torch
    sampler = common.RssSampler()
    ref_res = next((res for res, _ in live if res["row"] == reference),
                   live[0][0] if live else None)
    try:
        for i, f in enumerate(frames):
            if budget.spent() and i > 0:
                print(f"latency: time budget of {budget.seconds:.0f} s spent after {i} timed "
                      f"frames", file=sys.stderr, flush=True)
                break
            ref_labels = None
            for res, path in list(live):
                common.trim_heap()
                if torch is not None:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    alloc0 = torch.cuda.memory_allocated()
                before = common.rss_bytes()
                sampler.start()
                try:
                    t0 = time.perf_counter()
                    labels = path.infer(f)
                    cuda_sync(device)
                    dt = time.perf_counter() - t0
                except Exception as e:
                    sampler.stop()
                    live.remove((res, path))
                    _finish_stages(res, path)
                    _close(path)
                    _fail(res, e, f"at timed frame {i}", device)
                    continue
                peak = sampler.stop()
                res["_times"].append(dt)
                res["_transient"] = max(res["_transient"], peak - before)
                if torch is not None:
                    res["_dev_peak"] = max(res["_dev_peak"],
                                           torch.cuda.max_memory_allocated() - alloc0)
                if res is ref_res:
                    ref_labels = labels
                if ref_labels is not None:
                    res["_equal"] += int(np.count_nonzero(labels == ref_labels))
                    res["_pixels"] += labels.size
                    res["agreement_vs"] = ref_res["row"]
    finally:
        sampler.close()
        for res, path in live:
            _finish_stages(res, path)
            _close(path)
        live.clear()


def _finish_stages(res: Dict[str, Any], path: Any) -> None:
    """The runtime backend's own split per frame: feature engine vs temporal engine."""
    backend = getattr(path, "backend", None)
    s0, n = res.pop("_stage0", None), len(res.get("_times", []))
    if backend is not None and s0 is not None and n:
        res["stage_ms"] = {k: 1000 * (backend.timings[k] - s0[k]) / n
                           for k in ("feature", "temporal")}


def finalize(results: List[Dict[str, Any]], device: str) -> None:
    """Turn the raw samples of every row into its statistics (idempotent)."""
    for res in results:
        if "_times" not in res:
            continue
        times = res.pop("_times")
        transient, dev_peak = res.pop("_transient"), res.pop("_dev_peak")
        equal, pixels = res.pop("_equal"), res.pop("_pixels")
        res.pop("_stage0", None)
        if times:
            res.update(common.timing_stats(times))
            res["times_ms"] = [round(t * 1000, 3) for t in times]
        if pixels:
            res["agreement"] = equal / pixels
        res["peak_host_mb"] = (res["resident_host_bytes"] + transient) / 2 ** 20
        if device == "cuda":
            res["peak_device_mb"] = (res["resident_device_bytes"] + dev_peak) / 2 ** 20
    base = next((r for r in results if r.get("median_ms")), None)
    for r in results:
        if base is not None and r.get("median_ms"):
            r["speedup"] = base["median_ms"] / r["median_ms"]
            r["speedup_vs"] = base["row"]


def run_tbn_run(res: Dict[str, Any], results: List[Dict[str, Any]], src: Source, device: str,
                frames: List[np.ndarray], warmup: int, tmp: str, budget: Budget) -> None:
    """The runtime's stream (tbn-run) on an mp4 written with cv2: decode + infer + PNG write.

    Uses the fastest ort/openvino/trt row's backend and export. A warm-up video of `warmup`
    frames is streamed first; then the timed video. Per-frame time = the interval between
    consecutive frames' labels (the stream overlaps decode and writes with inference, so this
    is what one frame costs in the steady state); fps = frames / wall time of the whole stream.
    """
    import cv2
    from tbn_runtime.manifest import load_manifest
    from tbn_runtime.segmenter import Segmenter
    from tbn_runtime.stream import run_stream

    if budget.spent():
        res["skipped"] = "the time budget was spent before this row was built"
        return
    cands = [r for r in results if r["row"].startswith(("ort", "openvino", "trt"))
             and r.get("median_ms")]
    if not cands:
        res["skipped"] = "no ort/openvino/trt row ran, so there is no backend to stream with"
        return
    best = min(cands, key=lambda r: r["median_ms"])
    backend = best["row"].split("-")[0]
    precision = row_precision(best["row"])
    export = (engine_export(src, precision, budget.left()) if backend == "trt"
              else src.export_dir(precision, device))

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
    stamps: List[float] = []
    try:
        seg = Segmenter(backend=path.backend)
        segment_many = seg.segment_many   # what the stream driver calls, one frame per step

        def stamped(frames, streams, want=None):  # when each frame's labels are ready
            labels = segment_many(frames, streams, want)
            stamps.extend([time.perf_counter()] * len(labels))
            return labels
        seg.segment_many = stamped  # type: ignore[method-assign]
        run_stream(seg, warm_video, os.path.join(tmp, "masks-warmup"), progress=False)
        stamps.clear()
        common.trim_heap()
        rss0 = common.rss_bytes()
        sampler = common.RssSampler()
        sampler.start()
        t0 = time.perf_counter()
        stats = run_stream(seg, video, os.path.join(tmp, "masks"), progress=False)
        peak = sampler.stop()
        sampler.close()
    except Exception as e:
        _fail(res, e, "while streaming", device)
        return
    finally:
        path.close()
    intervals = [b - a for a, b in zip([t0] + stamps, stamps)]
    res.update(common.timing_stats(intervals))
    res["times_ms"] = [round(t * 1000, 3) for t in intervals]
    res["fps"] = stats["frames"] / stats["wall_s"] if stats.get("wall_s") else res["fps"]
    res["stream_stats"] = stats
    res["backend"] = f"{backend} {precision}"
    res["describe"] = (f"tbn_runtime.stream.run_stream, {backend} {precision}: mp4 decode "
                       f"thread + infer + PNG writer pool")
    res["note"] = ("per-frame = interval between consecutive frames' labels; frames/s = "
                   "frames / stream wall time")
    res["peak_host_mb"] = max(peak - rss0, 0) / 2 ** 20 + best.get("resident_host_bytes",
                                                                    0) / 2 ** 20
