"""One prepared, time-boxed GPU check: the CUDA tests, then the latency table of the paper's model.

    python benchmarks/gpu_check.py --out $OUT --wheels .whl      # on the GPU machine (<= 8 min)
    python benchmarks/gpu_check.py --device cpu --frames 2 --model tbn_tiny --size 128x160 \\
        --out /tmp/gpu-check                                     # the same steps, checked on a CPU

Steps, each a subprocess with its own timeout so that a hang costs one step, not the run:
  0. wheels    (--wheels DIR) pure-Python wheels the GPU image lacks (pytest, onnxslim,
               onnxconverter-common; scripts/gpu_wheels.sh downloads them), installed offline
               into a temporary folder put on PYTHONPATH for the steps
  1. env       machine, GPU, library versions, ONNX Runtime providers, TensorRT presence
  2. pytest    the tests that need a GPU (`pytest -k cuda`: every GPU test has "cuda" in its
               id; each skips with a reason where CUDA, TensorRT or onnxruntime-gpu is absent)
  3. latency   benchmarks/latency.py for --model (default tbn_swin_l) at --size (480x864):
               PyTorch naive fp32 and fp16, PyTorch ring fp32 and fp16 (the runtime's torch
               backend with CUDA graphs), ONNX Runtime if its CUDA provider loads, TensorRT if
               installed, tbn-run end to end when an ort/trt row ran; every row's labels compared
               with naive fp32 (the "labels =" column)
  4. streams   benchmarks/streams.py: frames/s of 1, 2, 4, 8 streams batched on the GPU (PyTorch
               fp16, and ONNX Runtime / TensorRT where present)
The markdown tables go to stdout; everything lands in --out: gpu_check.json (rewritten after
every step, so a run cut short still returns what it finished), pytest.txt, latency.json,
latency.md, latency.png, streams.json, streams.md. The exit code is 0 when every step finished
with exit code 0 (pytest's 5, "no tests selected", counts as 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_TESTS = "cuda"
#: what the GPU image lacks of the test and export dependencies (pure Python wheels)
WHEELS = ("pytest", "pytest-timeout", "pluggy", "iniconfig", "pygments", "onnxslim", "colorama",
          "onnxconverter-common")
GPU_ROWS = "naive,ring,ring-fp16,ort,ort-fp16,trt,trt-fp32,tbn-run"
CPU_ROWS = "naive,ring,ort,tbn-run"


def run_step(name: str, cmd: List[str], timeout: float, log: Optional[str],
             env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run one step; its record: command, exit code, seconds, timed_out, tail of the output."""
    print(f"gpu_check: [{name}] {' '.join(cmd)} (timeout {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    timed_out = False
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1),
                           cwd=common.REPO, env=env)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        timed_out = True
        rc = None
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = time.perf_counter() - t0
    text = out + ("\n--- stderr ---\n" + err if err else "")
    if log:
        with open(log, "w") as f:
            f.write(text)
    status = "timed out" if timed_out else f"exit {rc}"
    print(f"gpu_check: [{name}] {status} after {seconds:.0f} s", flush=True)
    return {"step": name, "command": " ".join(cmd), "rc": rc, "timed_out": timed_out,
            "seconds": round(seconds, 2), "tail": text[-3000:],
            "log": log and os.path.basename(log)}


def env_info(device: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {"machine": common.machine_info()}
    try:
        import torch
        info["torch_cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": p.name, "memory_gb": round(p.total_memory / 2 ** 30, 1),
                           "capability": f"{p.major}.{p.minor}"}
    except Exception as e:
        info["torch_error"] = str(e)
    try:
        from tbn_runtime.backends import backend_class
        info["backends"] = {f"{b} {d}": backend_class(b).available(d)
                            for b in ("ort", "trt", "torch") for d in ("cpu", "cuda")}
    except Exception as e:
        info["backends_error"] = str(e)
    return info


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--out", required=True, help="folder for the results")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model", default="tbn_swin_l")
    p.add_argument("--size", default="480x864")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--warmup", type=int, help="untimed frames (default: 10 on cuda, 1 on cpu)")
    p.add_argument("--rows", help=f"latency rows (default on cuda: {GPU_ROWS}; cpu: {CPU_ROWS})")
    p.add_argument("--budget", type=float, default=470, help="seconds for the whole check "
                                                             "(default: %(default)s)")
    p.add_argument("--pytest-timeout", type=float, default=150)
    p.add_argument("--streams-seconds", type=float, default=90,
                   help="seconds kept for the streams step (default: %(default)s)")
    p.add_argument("--no-pytest", action="store_true")
    p.add_argument("--wheels", metavar="DIR",
                   help="install these wheels offline first (scripts/gpu_wheels.sh makes DIR)")
    return p.parse_args(argv)


def install_wheels(folder: str, target: str) -> Dict[str, Any]:
    """pip install --no-index the WHEELS found in `folder` into `target` (offline)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    files = [os.path.join(folder, n) for n in names if n.endswith(".whl")]
    if not files:
        return {"step": "wheels", "rc": 1, "timed_out": False, "seconds": 0.0,
                "tail": f"no wheels in {folder} (run scripts/gpu_wheels.sh)", "log": None}
    return run_step("wheels", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                               "--quiet", "--target", target] + files, 120, None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.warmup is None:
        args.warmup = 10 if args.device == "cuda" else 1
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    report: Dict[str, Any] = {"check": "gpu_check", "device": args.device,
                              "config": {k: v for k, v in vars(args).items()}, "steps": []}
    out_json = os.path.join(args.out, "gpu_check.json")

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - start, 1)
        common.write_json(out_json, report)

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    env = dict(os.environ)
    site = None
    if args.wheels:
        site = tempfile.mkdtemp(prefix="tbn-gpu-check-site-")
        report["steps"].append(install_wheels(args.wheels, site))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, common.REPO,
                                                         env.get("PYTHONPATH")) if p)
        save()
    report["env"] = env_info(args.device)
    save()
    py = sys.executable
    try:
        if not args.no_pytest:
            step = run_step("pytest", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                       "-k", CUDA_TESTS, "tests"],
                            min(args.pytest_timeout, max(left() - 60, 10)),
                            os.path.join(args.out, "pytest.txt"), env)
            report["steps"].append(step)
            save()

        rows = args.rows or (GPU_ROWS if args.device == "cuda" else CPU_ROWS)
        lat_json = os.path.join(args.out, "latency.json")
        timeout = max(left() - 5 - args.streams_seconds, 10)
        # latency.py's budget covers its exports, engine builds and timing; the margin lets it
        # write its report before this step's own timeout would kill it.
        cmd = [py, os.path.join(HERE, "latency.py"), "--model", args.model, "--size", args.size,
               "--device", args.device, "--frames", str(args.frames), "--warmup",
               str(args.warmup), "--only", rows, "--json", lat_json, "--plot",
               os.path.join(args.out, "latency.png"),
               "--time-budget", f"{max(timeout - 30, 5):.0f}"]
        step = run_step("latency", cmd, timeout, os.path.join(args.out, "latency.log"), env)
        report["steps"].append(step)
        save()
        streams_json = os.path.join(args.out, "streams.json")
        cmd = [py, os.path.join(HERE, "streams.py"), "--model", args.model, "--size", args.size,
               "--device", args.device, "--steps", "5", "--warmup", "2", "--json", streams_json]
        streams = run_step("streams", cmd, max(left() - 5, 10),
                           os.path.join(args.out, "streams.md"), env)
        report["steps"].append(streams)
    finally:
        if site:
            shutil.rmtree(site, ignore_errors=True)
    if os.path.isfile(streams_json):
        with open(streams_json) as f:
            report["streams"] = json.load(f)
    if os.path.isfile(lat_json):
        with open(lat_json) as f:
            report["latency"] = json.load(f)
        with open(os.path.join(args.out, "latency.log")) as f:
            table = f.read().split("--- stderr ---")[0].strip()
        with open(os.path.join(args.out, "latency.md"), "w") as f:
            f.write(table + "\n")
        print(table, flush=True)
    if os.path.isfile(os.path.join(args.out, "streams.md")):
        with open(os.path.join(args.out, "streams.md")) as f:
            print(f.read().split("--- stderr ---")[0].strip(), flush=True)
    save()
    ok = all(s["rc"] in (0, 5) if s["step"] == "pytest" else s["rc"] == 0
             for s in report["steps"])
    report["passed"] = ok
    save()
    print(f"gpu_check: {'all steps finished' if ok else 'some steps failed'}; results in "
          f"{out_json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
