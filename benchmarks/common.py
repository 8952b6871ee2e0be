"""Helpers shared by the benchmark scripts: machine and library info, timing statistics,
memory sampling, and the three outputs (markdown table, JSON, bar chart).

Only the standard library and numpy at import time; torch, onnxruntime, tensorrt and matplotlib
are imported where they are used, so a missing one costs a row or a plot, never the script.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python benchmarks/x.py` from a checkout without an editable install
    sys.path.insert(0, REPO)


# -- machine and versions ----------------------------------------------------------------------
def usable_cores() -> int:
    """CPU cores this process may run on (affinity), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpu_names() -> List[str]:
    """Names of the visible CUDA GPUs (torch first, nvidia-smi as a fallback); [] if none."""
    try:
        import torch
        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            return [n.strip() for n in out.stdout.splitlines() if n.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    return []


def library_versions() -> Dict[str, Optional[str]]:
    """Versions of the libraries a result depends on (None where not installed)."""
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "timm", "onnx", "onnxruntime", "openvino", "tensorrt", "numpy", "cv2"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "unknown")).split("-")[0]
        except Exception:  # absent, or broken (tensorrt without its shared libraries)
            versions[name] = None
    try:
        import torch
        versions["torch_cuda"] = torch.version.cuda
        versions["torch_threads"] = str(torch.get_num_threads())
    except Exception:
        pass
    try:
        import onnxruntime as ort
        versions["onnxruntime_providers"] = ",".join(ort.get_available_providers())
    except Exception:
        pass
    return versions


def machine_info() -> Dict[str, Any]:
    """Where a result was measured: host, CPU, cores, memory, GPUs and library versions."""
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    from tbn_runtime.cpu import extensions, model_name
    return {
        "cpu": model_name(),
        # the CPU engines' ratios depend on these (AVX2, AVX-512, VNNI, AMX)
        "cpu_extensions": extensions(),
        "cores": usable_cores(),
        "memory_gb": mem_gb,
        "gpus": gpu_names(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": library_versions(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def machine_line(info: Dict[str, Any]) -> str:
    """One line naming the machine and library versions, for tables and plot titles."""
    v = info.get("versions", {})
    gpu = ", ".join(info.get("gpus") or []) or "no GPU"
    libs = " ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "openvino", "onnx",
                                            "tensorrt") if k in v and v[k] is not None)
    trt = "" if v.get("tensorrt") else " (tensorrt not installed)"
    return (f"{info.get('cpu')} ({cpu_extensions_text(info.get('cpu_extensions'))}), "
            f"{info.get('cores')} cores, {gpu}; {libs}{trt}")


def cpu_extensions_text(ext: Optional[Sequence[str]]) -> str:
    """'AVX2; no AVX-512, VNNI, AMX' from machine_info's cpu_extensions."""
    if ext is None:
        return "extensions not recorded"
    have = ", ".join(ext) if ext else "no AVX2"
    missing = [n for n in ("AVX-512", "VNNI", "AMX") if not any(n in e for e in ext)]
    return have + (f"; no {', '.join(missing)}" if missing else "")


# -- timing --------------------------------------------------------------------------------------
def timing_stats(seconds: Sequence[float]) -> Dict[str, float]:
    """Median, p90, p99, mean, min, max in milliseconds and frames/s (from the median)."""
    t = np.asarray(seconds, dtype=np.float64) * 1000.0
    if t.size == 0:
        raise ValueError("no timings")
    median = float(np.median(t))
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "fps": 1000.0 / median if median > 0 else float("inf"),
        "frames": int(t.size),
    }


# -- memory --------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS deltas show what a step allocates."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """A background thread that records the peak RSS between `start()` and `stop()`.

    `interval` seconds between samples (torch and onnxruntime release the GIL in their kernels,
    so the thread keeps sampling while they run). Peaks shorter than the interval can be missed.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self._peak = 0
        self._running = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._running.wait(0.05):
                r = rss_bytes()
                if r > self._peak:
                    self._peak = r
                time.sleep(self.interval)

    def start(self) -> None:
        self._peak = rss_bytes()
        self._running.set()

    def stop(self) -> int:
        """Stop sampling; the peak RSS (bytes) seen since start()."""
        self._running.clear()
        return max(self._peak, rss_bytes())

    def close(self) -> None:
        self._stop.set()
        self._running.clear()
        self._thread.join(timeout=1)


# -- outputs ---------------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def percent(v: float, digits: int = 2) -> str:
    """A share (0..1) as a percentage that is never rounded up to 100% when it is not 100%
    (0.99996 -> '99.996%', not '100.00%')."""
    if v >= 1:
        return "100%"
    p, d = 100.0 * v, digits
    while d < 6 and f"{p:.{d}f}".startswith("100"):
        d += 1
    text = f"{p:.{d}f}"
    if text.startswith("100"):
        text = f"{int(p * 10 ** d) / 10 ** d:.{d}f}"
    return text + "%"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def numeric(i: int) -> bool:
        col = [r[i] for r in cells if r[i] not in ("-", "")]
        try:
            [float(c.rstrip("x%")) for c in col]
            return bool(col)
        except ValueError:
            return False

    right = [numeric(i) for i in range(len(headers))]
    line = lambda vals: "| " + " | ".join(  # noqa: E731
        v.rjust(w) if r else v.ljust(w) for v, w, r in zip(vals, widths, right)) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2))
                         for w, r in zip(widths, right)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def write_json(path: str, data: Dict[str, Any]) -> None:
    """Write JSON atomically (a temporary file beside it, then rename)."""
    from tbn_runtime.files import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
    atomic_write(path, write)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def bar_plot(path: str, labels: Sequence[str], values: Sequence[Optional[float]], ylabel: str,
             title: str, subtitle: str, errors: Optional[Sequence[Optional[float]]] = None,
             annotate: Optional[Sequence[str]] = None, hline: Optional[float] = None) -> None:
    """A bar chart (matplotlib, Agg) saved atomically to `path`; None values are left out.

    errors: optional upper whisker per bar (e.g. p90 - median). Raises RuntimeError if
    matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib, or the dev extra)") \
            from e
    from tbn_runtime.files import atomic_write

    keep = [i for i, v in enumerate(values) if v is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(keep) + 2), 4.5))
    xs = np.arange(len(keep))
    ys = [values[i] for i in keep]
    yerr = None
    if errors is not None:
        yerr = [[0.0] * len(keep), [errors[i] or 0.0 for i in keep]]
    bars = ax.bar(xs, ys, yerr=yerr, capsize=4, color="#4c72b0")
    if annotate is not None:
        for b, i in zip(bars, keep):
            ax.annotate(annotate[i], (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
    if annotate is not None and ys:
        # room above the tallest bar (and its whisker) for its two-line note, under the title
        top = max(y + (yerr[1][i] if yerr else 0.0) for i, y in enumerate(ys))
        ax.set_ylim(0, top * 1.3)
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    ax.set_xticks(xs)
    ax.set_xticklabels([labels[i] for i in keep], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize=6.5, wrap=True)
    fig.tight_layout(rect=(0, 0.03 + 0.025 * subtitle.count("\n") + 0.02, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def parse_size(text: str) -> tuple:
    """'480x864' -> (480, 864) (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must be HEIGHTxWIDTH, e.g. 480x864, got '{text}'") from None
    if h < 32 or w < 32:
        raise ValueError(f"size {text} is too small: height and width must be at least 32")
    return h, w


