"""One prepared, time-boxed GPU check for the machine as it is: PyTorch on CUDA, no TensorRT.

    python benchmarks/gpu_check.py --out $OUT --wheels .whl      # on the GPU machine (~8 min)
    python benchmarks/gpu_check.py --device cpu --model tbn_tiny --size 64x96 --frames 2 \\
        --warmup 1 --train-size 64x64 --budget 240 --no-pytest --out /tmp/gc   # the CPU dry run

The GPU image this project is lent has torch (CUDA), timm, onnx, onnxruntime (CPU),
cuda-bindings and triton, and no network: TensorRT and onnxruntime-gpu cannot be there, so the
check measures what a GPU user without them gets, the torch paths. Steps, each a subprocess
with its own time limit inside one --budget (default 470 s), stopped with SIGTERM and, if still
running after --grace seconds, SIGKILL (its whole process group):
  wheels   (--wheels DIR) of the wheels in DIR only those whose package the image lacks,
           installed offline into a temporary folder on PYTHONPATH (the image's own pytest and
           plugins are never shadowed)
  env      machine, GPU, library versions, what each backend says about this machine
  pytest   the GPU tests (`pytest -k cuda`: each skips with its reason where a library is absent)
  rows     benchmarks/gpu_rows.py --part rows: naive fp32 / fp16 / bf16, the torch backend's
           ring fp32 (TF32 off and on), fp16 and bf16 with graphs and eager, timm's attention
  streams  1, 2, 4, 8 streams batched (CUDA graphs per batch size)
  e2e      the tbn-run stream with the torch backend on a video at the export size
  train    one bf16 training step with gradient checkpointing at 480x480, batch 2
  compile  the ring bf16 row with torch.compile, if the budget leaves --compile-seconds
Every part rewrites its JSON after every row (what ran survives a kill); gpu_check.json in --out
is rewritten after every step with the steps, the rows so far and the goals of issue 17
(best ring row <= 6 ms engine time and >= 15x naive fp32 with >= 99.5% equal labels; 8 streams
>= 1.5x one; the stream >= 80% of the engine's frames/s). gpu_check.md holds the tables (also on
stdout). Exit code 0 when every step that ran exited 0 (pytest's 5, "no tests", counts as 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_TESTS = "cuda"
#: what the tests and exports need beyond torch, timm, onnx and onnxruntime (pure Python
#: wheels; scripts/gpu_wheels.sh downloads them); only those missing on the machine are installed
WHEELS = ("pytest", "pluggy", "iniconfig", "pygments", "onnxslim", "colorama",
          "onnxconverter-common")
#: seconds each step may take at most (the budget may leave less)
PLAN = {"wheels": 30, "env": 30, "pytest": 150, "rows": 150, "streams": 45, "e2e": 35,
        "train": 35}
PARTS = ("rows", "streams", "e2e", "train", "compile")


def run_step(name: str, cmd: List[str], timeout: float, log: Optional[str],
             env: Optional[Dict[str, str]] = None, grace: float = 15.0) -> Dict[str, Any]:
    """Run one step in its own process group; at `timeout` SIGTERM (the step writes what it
    has), after `grace` more seconds SIGKILL. Its record: command, exit code, seconds,
    timed_out, killed, the tail of its output."""
    print(f"gpu_check: [{name}] {' '.join(cmd)} (timeout {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    timed_out = killed = False
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, text=True,
                                cwd=common.REPO, env=env, start_new_session=True)
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                killed = True
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        output.seek(0)
        text = output.read()
    seconds = time.perf_counter() - t0
    if log:
        with open(log, "w") as f:
            f.write(text)
    status = ("killed (SIGKILL)" if killed else "timed out (SIGTERM)" if timed_out
              else f"exit {proc.returncode}")
    print(f"gpu_check: [{name}] {status} after {seconds:.0f} s", flush=True)
    return {"step": name, "command": " ".join(cmd), "rc": proc.returncode,
            "timed_out": timed_out, "killed": killed, "seconds": round(seconds, 2),
            "tail": text[-3000:], "log": log and os.path.basename(log)}


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the step and what it started (pytest's workers)
    except (ProcessLookupError, PermissionError):
        pass


def _dist_name(wheel: str) -> str:
    return re.sub(r"[-_.]+", "-", os.path.basename(wheel).split("-")[0]).lower()


def missing_wheels(folder: str) -> List[str]:
    """The wheels in folder whose distribution is not installed here."""
    import importlib.metadata as md
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".whl"):
            continue
        try:
            md.version(_dist_name(name))
        except md.PackageNotFoundError:
            out.append(os.path.join(folder, name))
    return out


def install_wheels(folder: str, target: str) -> Dict[str, Any]:
    """pip install --no-index the wheels of `folder` the machine lacks, into `target`."""
    if not os.path.isdir(folder) or not any(n.endswith(".whl") for n in os.listdir(folder)):
        return {"step": "wheels", "rc": 1, "timed_out": False, "seconds": 0.0,
                "tail": f"no wheels in {folder} (run scripts/gpu_wheels.sh)", "log": None}
    files = missing_wheels(folder)
    if not files:
        return {"step": "wheels", "rc": 0, "timed_out": False, "seconds": 0.0,
                "tail": "every wheel's package is installed here already", "log": None,
                "installed": []}
    step = run_step("wheels", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                               "--quiet", "--target", target] + files, PLAN["wheels"], None)
    step["installed"] = [os.path.basename(f) for f in files]
    return step


ENV_CODE = """
import json, sys
sys.path.insert(0, {here!r})
import common
info = {{"machine": common.machine_info()}}
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {{"name": p.name, "memory_gb": round(p.total_memory / 2 ** 30, 1),
                       "capability": f"{{p.major}}.{{p.minor}}",
                       "bf16": torch.cuda.is_bf16_supported()}}
except Exception as e:
    info["torch_error"] = str(e)
from tbn_runtime.backends import backend_class
info["backends"] = {{}}
for b in ("ort", "trt", "torch"):
    for d in ("cpu", "cuda"):
        try:
            info["backends"][f"{{b}} {{d}}"] = backend_class(b).available(d)
        except Exception as e:
            info["backends"][f"{{b}} {{d}}"] = [False, str(e)]
print(json.dumps(info))
"""


def goals(parts: Dict[str, Any]) -> Dict[str, Any]:
    """Issue 17's goals, judged on the rows of this run (None where a row is missing)."""
    rows = {r["row"]: r for r in (parts.get("rows") or {}).get("rows", [])}
    naive = rows.get("naive fp32", {}).get("median_ms")
    ring = [r for n, r in rows.items() if n.startswith("ring") and r.get("engine_ms")
            and r.get("labels_equal", 0) >= 0.995]
    out: Dict[str, Any] = {}
    if ring:
        best = min(ring, key=lambda r: r["engine_ms"])
        out["best_ring_row"] = best["row"]
        out["best_engine_ms"] = best["engine_ms"]
        out["engine_ms_le_6"] = best["engine_ms"] <= 6.0
        out["labels_equal"] = best["labels_equal"]
        if naive:
            out["speedup_vs_naive_fp32"] = naive / best["median_ms"]
            out["speedup_ge_15"] = out["speedup_vs_naive_fp32"] >= 15
    streams = {r.get("streams"): r for r in (parts.get("streams") or {}).get("rows", [])}
    if streams.get(1, {}).get("frames_per_s") and streams.get(8, {}).get("frames_per_s"):
        out["streams_8_over_1"] = streams[8]["frames_per_s"] / streams[1]["frames_per_s"]
        out["streams_ge_1.5"] = out["streams_8_over_1"] >= 1.5
    e2e = ((parts.get("e2e") or {}).get("rows") or [{}])[0]
    if e2e.get("share_of_engine"):
        out["e2e_share_of_engine"] = e2e["share_of_engine"]
        out["e2e_ge_0.8"] = e2e["share_of_engine"] >= 0.8
    return out


def tables(parts: Dict[str, Any]) -> str:
    f = common.fmt
    out = []
    rows = (parts.get("rows") or {}).get("rows", []) + \
        (parts.get("compile") or {}).get("rows", [])
    if rows:
        r0 = parts.get("rows") or parts.get("compile")
        head = ["row", "median ms", "p90 ms", "feature ms", "temporal ms", "peak MB",
                "reserved MB", "labels =", "x naive fp32", "note"]
        body = [[r["row"], f(r.get("median_ms"), 2), f(r.get("p90_ms"), 2),
                 f(r.get("feature_ms"), 2), f(r.get("temporal_ms"), 2), f(r.get("peak_mb"), 0),
                 f(r.get("reserved_mb"), 0),
                 common.percent(r["labels_equal"]) if "labels_equal" in r else "-",
                 f(r.get("speedup_vs_naive_fp32"), 1),
                 r.get("skipped") or r.get("failed") or r.get("describe", "")] for r in rows]
        out.append(f"{r0['model']} {r0['height']}x{r0['width']} on {r0['device']} "
                   f"({(r0.get('gpu') or {}).get('name', 'CPU')}), {r0['frames']} timed frames "
                   f"per row\n\n" + common.markdown_table(head, body))
    for key in ("streams", "e2e", "train"):
        part = parts.get(key)
        if not part or not part.get("rows"):
            continue
        keys = [k for k in part["rows"][0] if k not in ("describe", "stream_stats", "graphs")]
        body = [[f(r.get(k), 2) if isinstance(r.get(k), float) else r.get(k, "-") for k in keys]
                for r in part["rows"]]
        out.append(common.markdown_table(keys, body))
    return "\n\n".join(out)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--out", required=True, help="folder for the results")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model", default="tbn_swin_l")
    p.add_argument("--size", default="480x864")
    p.add_argument("--train-size", default="480x480")
    p.add_argument("--frames", type=int, default=50, help="timed frames per row")
    p.add_argument("--warmup", type=int, help="untimed frames (default: 10 on cuda, 1 on cpu)")
    p.add_argument("--budget", type=float, default=470,
                   help="seconds for the whole check (default: %(default)s)")
    p.add_argument("--grace", type=float, default=15,
                   help="seconds between a step's SIGTERM and its SIGKILL (default %(default)s)")
    p.add_argument("--compile-seconds", type=float, default=None,
                   help="the compile row runs only if this much budget is left (default 90 on "
                        "cuda, 0 on cpu: never; inductor on a CPU takes minutes)")
    p.add_argument("--no-pytest", action="store_true")
    p.add_argument("--wheels", metavar="DIR",
                   help="install those of these wheels the machine lacks, offline, first "
                        "(scripts/gpu_wheels.sh makes DIR)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.warmup is None:
        args.warmup = 10 if args.device == "cuda" else 1
    if args.compile_seconds is None:
        args.compile_seconds = 90 if args.device == "cuda" else 0
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    report: Dict[str, Any] = {"check": "gpu_check", "device": args.device,
                              "config": dict(vars(args)), "steps": [], "parts": {}}
    out_json = os.path.join(args.out, "gpu_check.json")

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    def save() -> None:
        for part in PARTS:  # the rows each part has written so far
            path = os.path.join(args.out, f"{part}.json")
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        report["parts"][part] = json.load(f)
                except (OSError, ValueError):
                    pass
        report["goals"] = goals(report["parts"])
        report["seconds"] = round(time.perf_counter() - start, 1)
        common.write_json(out_json, report)

    def step(name: str, cmd: List[str], plan: float, log: Optional[str] = None,
             **kw: Any) -> Optional[Dict[str, Any]]:
        timeout = min(plan, left() - 2)
        if timeout < 5:
            report["steps"].append({"step": name, "rc": None, "skipped": "the budget was spent"})
            save()
            return None
        rec = run_step(name, cmd, timeout, log and os.path.join(args.out, log), env,
                       grace=min(args.grace, max(left() - timeout, 1)), **kw)
        report["steps"].append(rec)
        save()
        return rec

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (common.REPO, env.get("PYTHONPATH")) if p)
    site = None
    py = sys.executable
    try:
        if args.wheels:
            site = tempfile.mkdtemp(prefix="tbn-gpu-check-site-")
            report["steps"].append(install_wheels(args.wheels, site))
            env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], site])  # after the image's
            save()
        rec = step("env", [py, "-c", ENV_CODE.format(here=HERE)], PLAN["env"], "env.txt")
        if rec and rec["rc"] == 0:
            try:
                report["env"] = json.loads(rec["tail"].strip().splitlines()[-1])
            except (ValueError, IndexError):
                pass
        if not args.no_pytest:
            step("pytest", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k",
                            CUDA_TESTS, "tests"], PLAN["pytest"], "pytest.txt")
        common_args = ["--device", args.device, "--model", args.model, "--size", args.size,
                       "--frames", str(args.frames), "--warmup", str(args.warmup)]
        for part in ("rows", "streams", "e2e", "train", "compile"):
            if part == "compile":
                if args.compile_seconds <= 0 or left() < args.compile_seconds:
                    report["steps"].append({"step": "compile", "rc": None, "skipped":
                                            f"{left():.0f} s left, the compile row needs "
                                            f"{args.compile_seconds:.0f}"})
                    save()
                    continue
                plan = left() - 2
            else:
                plan = PLAN[part]
            timeout = min(plan, left() - 2)
            extra = ["--train-size", args.train_size] if part == "train" else []
            if part == "train" and args.device == "cpu":
                extra += ["--train-steps", "1"]  # the dry run: the code path, not a timing
            if part == "streams":  # steps of all streams at once: fewer suffice
                extra += ["--frames", str(max(2, args.frames // 2))]
            step(part, [py, os.path.join(HERE, "gpu_rows.py"), "--part", part, "--json",
                        os.path.join(args.out, f"{part}.json"), *common_args, *extra,
                        "--budget", f"{max(timeout - 10, 3):.0f}"], plan, f"{part}.log")
    finally:
        if site:
            shutil.rmtree(site, ignore_errors=True)
        ok = all((s["rc"] in (0, 5) if s["step"] == "pytest" else s["rc"] == 0)
                 for s in report["steps"] if not s.get("skipped"))
        report["passed"] = ok
        save()
    text = tables(report["parts"])
    goal_lines = "\n".join(f"- {k}: {v}" for k, v in report["goals"].items())
    text += f"\n\nGoals (issue 17):\n{goal_lines or '- no rows to judge'}\n"
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    print(f"gpu_check: {'all steps finished' if ok else 'some steps failed'} in "
          f"{report['seconds']:.0f} s of {args.budget:.0f}; results in {out_json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
