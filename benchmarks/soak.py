"""Soak: a long stream through tbn-run's code path, sampling the process's resident memory.

    python benchmarks/soak.py                          # 10,000 frames, tbn_tiny 64x96, ort CPU
    python benchmarks/soak.py --frames 2000 --export runs/tbn/export --json soak.json

An endless synthetic source (a Video whose frames come from a generator: 50 distinct frames in
a loop) runs through `tbn_runtime.stream.run_stream` with a Segmenter on the ONNX Runtime
backend, exactly what `tbn-run` does, writing a PNG mask per frame into a temporary folder
(removed at the end). The decoder thread records the resident set size (RSS) every
--every frames. Reported: RSS after the warm-up (--warmup frames: allocators, ONNX Runtime's
arenas and the writer pool reach their steady state), the largest RSS after it, and the growth
between the two, against the goal of < 5%. A leak of one frame's buffers per frame would grow
without bound here; a bounded queue that is not bounded would too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GOAL = 0.05


def endless_video(n: int, height: int, width: int, every: int,
                  samples: List[Tuple[int, int]]) -> Any:
    """A Video of n synthetic frames (50 distinct ones, looped) that records (frame, RSS)."""
    from tbn_runtime.sources import Video
    from tbn_train.data.synth import synthetic_frames

    loop = synthetic_frames(50, height, width, seed=0)

    def frames() -> Iterator[Tuple[str, Any]]:
        for i in range(n):
            if i % every == 0:
                samples.append((i, common.rss_bytes()))
            yield f"{i:08d}", loop[i % len(loop)]
        samples.append((n, common.rss_bytes()))
    return Video("soak", "camera", "synthetic", 25.0, None, frames)


def make_export(tmp: str, height: int, width: int) -> str:
    """A random-init tbn_tiny export (BatchNorm statistics randomised), made in a child process
    so that this one never imports torch: its RSS is the runtime's, as in a deployment."""
    out = os.path.join(tmp, "export")
    code = ("import torch\n"
            "from tbn_export.onnx_export import export_onnx\n"
            "from tbn_train.models import build_model, randomize_batchnorm\n"
            "torch.manual_seed(0)\n"
            "model = randomize_batchnorm(build_model('tbn_tiny').eval())\n"
            f"export_onnx(model, {out!r}, {height}, {width})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=common.REPO)
    return out


def summarize(samples: List[Tuple[int, int]], warmup: int) -> Dict[str, Any]:
    after = [(i, r) for i, r in samples if i >= warmup]
    base = after[0][1]
    peak = max(r for _, r in after)
    return {"rss_after_warmup_mb": base / 2 ** 20, "rss_peak_after_warmup_mb": peak / 2 ** 20,
            "rss_end_mb": samples[-1][1] / 2 ** 20, "growth": (peak - base) / base,
            "goal": GOAL, "met": (peak - base) / base < GOAL}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--frames", type=int, default=10000, help="frames in all (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1000,
                   help="frames before the baseline RSS (default %(default)s)")
    p.add_argument("--every", type=int, default=100, help="frames between RSS samples")
    p.add_argument("--export", help="an export dir (default: a random tbn_tiny at --size)")
    p.add_argument("--size", default="64x96", help="HEIGHTxWIDTH of the frames and the "
                                                   "random export (default %(default)s)")
    p.add_argument("--json", help="write the samples and the summary here")
    a = p.parse_args(argv)
    a.size = common.parse_size(a.size)
    if not 0 < a.warmup < a.frames:
        p.error("--warmup must be between 0 and --frames")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from tbn_runtime.segmenter import Segmenter
    from tbn_runtime.stream import run_stream

    tmp = tempfile.mkdtemp(prefix="tbn-soak-")
    try:
        export = args.export or make_export(tmp, *args.size)
        samples: List[Tuple[int, int]] = []
        video = endless_video(args.frames, args.size[0], args.size[1], args.every, samples)
        t0 = time.perf_counter()
        with Segmenter(export, backend="ort", device="cpu") as seg:
            stats = run_stream(seg, [video], os.path.join(tmp, "masks"), progress=False)
        seconds = time.perf_counter() - t0
        summary = summarize(samples, args.warmup)
        report = {"benchmark": "soak", "frames": stats["frames"], "seconds": seconds,
                  "torch_imported": "torch" in sys.modules,
                  "fps": stats["fps"], "backend": stats["backend"], "summary": summary,
                  "samples": [{"frame": i, "rss_mb": r / 2 ** 20} for i, r in samples],
                  "max_decode_queue": stats["max_decode_queue"],
                  "max_pending_writes": stats["max_pending_writes"],
                  "machine": common.machine_info(),
                  "command": " ".join(["python", "benchmarks/soak.py"] + list(
                      argv if argv is not None else sys.argv[1:]))}
        rows = [["frames", f"{stats['frames']} in {seconds:.0f} s ({stats['fps']:.1f} fps)"],
                ["RSS after warm-up", f"{summary['rss_after_warmup_mb']:.1f} MB "
                                      f"(frame {args.warmup})"],
                ["largest RSS after warm-up", f"{summary['rss_peak_after_warmup_mb']:.1f} MB"],
                ["RSS at the end", f"{summary['rss_end_mb']:.1f} MB"],
                ["growth after warm-up",
                 f"{100 * summary['growth']:+.2f}% (goal < {100 * GOAL:.0f}%: "
                 f"{'met' if summary['met'] else 'NOT met'})"]]
        print(f"Soak: {stats['backend']}\nMachine: {common.machine_line(report['machine'])}\n")
        print(common.markdown_table(["", "value"], rows))
        if args.json:
            common.write_json(args.json, report)
        return 0 if summary["met"] else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
