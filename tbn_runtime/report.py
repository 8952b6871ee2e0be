"""What a tbn-run costs and did: the stats a run returns (`--stats FILE.json`) and the one
line it prints at the end. The counts come from the driver's DriveResult; the engines' stages
from the Segmenter's and its backend's public counters, read before and after the run."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any, Dict, List, Optional

from .driver import DriveResult
from .segmenter import Segmenter

#: the stages of a frame, in order, and the thread each runs on
STAGE_THREADS = {"decode": "decoder threads (overlap)", "preprocess": "main", "feature": "main",
                 "temporal": "main", "postprocess": "main", "write": "writer pool (overlaps)"}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Linux: VmHWM of /proc/self/status (getrusage's ru_maxrss would include a parent's peak
    inherited across fork + exec); elsewhere getrusage (macOS reports bytes, others KiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


class EngineClock:
    """The Segmenter's stage counters at a start, to report a run's share of them."""

    def __init__(self, seg: Segmenter) -> None:
        self.seg = seg
        self.host0 = dict(seg.timings)
        self.engine0 = dict(seg.backend.timings)

    def seconds(self) -> Dict[str, float]:
        seg = self.seg
        times = {k: seg.timings[k] - self.host0[k] for k in ("preprocess", "postprocess")}
        times.update({k: seg.backend.timings[k] - self.engine0[k]
                      for k in ("feature", "temporal", "push")})
        return times


def stream_report(clock: EngineClock, result: DriveResult, fmt: str,
                  skipped_videos: List[str], overlay: Optional[str] = None) -> Dict[str, Any]:
    """The stats of a run of the driver (the keys of `--stats`)."""
    seg, r = clock.seg, result
    engine = clock.seconds()
    times = {"decode": r.decode_s, "preprocess": engine["preprocess"],
             "feature": engine["feature"], "temporal": engine["temporal"],
             "postprocess": engine["postprocess"], "write": r.write_s}
    engines = times["feature"] + times["temporal"]
    wall = r.wall_s
    stats: Dict[str, Any] = {
        "backend": seg.describe(),
        "export": os.path.abspath(seg.export) if seg.export else None,
        "export_size": [seg.height, seg.width],
        "format": fmt,
        "streams": seg.backend.streams,
        "videos": sum(1 for n in r.per_video.values() if n),   # with a frame done
        "videos_resumed": len(skipped_videos),
        "frames": r.frames,
        "frames_inferred": r.inferred,
        "frames_resumed": r.pushed,
        "wall_s": round(wall, 4),
        "fps": round(r.frames / wall, 3) if wall > 0 and r.frames else None,
        # the engines' own rate: segmented frames over the time of their engine calls
        # (the feature engine's time on resumed frames is reported apart)
        "engines_s": round(engines, 4),
        "engines_fps": round(r.inferred / engines, 3) if engines > 0 and r.inferred else None,
        "resumed_feature_s": round(engine["push"], 4),
        "stages": {k: {"total_s": round(v, 4),
                       "ms_per_frame": round(1e3 * v / r.frames, 3) if r.frames else None}
                   for k, v in times.items()},
        "stage_threads": dict(STAGE_THREADS),
        "max_decode_queue": r.max_decode_queue,
        "max_pending_writes": r.max_pending_writes,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "overlay": overlay,
        "frames_per_video": dict(r.per_video),
        "failed_videos": dict(r.failed),
    }
    if engines > 0 and r.pushed == 0:
        stats["pipeline_overhead"] = round(wall / engines - 1.0, 4)
    return stats


def summary_line(stats: Dict[str, Any], out_dir: str) -> str:
    """The one line printed at the end of a run (one process or --ray)."""
    n, v = stats["frames"], stats["videos"]
    text = f"{n} frame{'s' * (n != 1)} of {v} video{'s' * (v != 1)}"
    if stats.get("fps"):
        text += f" at {stats['fps']:.1f} fps"
        if stats.get("engines_fps"):
            text += f" (engines alone {stats['engines_fps']:.1f} fps)"
    resumed = [f"{stats[k]} {what}" for k, what in (("frames_resumed", "frames"),
                                                       ("videos_resumed", "videos"))
               if stats.get(k)]
    if resumed:
        text += f", {' and '.join(resumed)} already done"
    if stats.get("failed_videos"):
        text += f", {len(stats['failed_videos'])} failed (see above)"
    text += f"; labels in {out_dir}"
    if stats.get("overlay"):
        text += f", overlay {stats['overlay']}"
    return f"{text} [{stats['backend']}]"
