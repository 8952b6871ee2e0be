"""benchmarks/gpu_check.py and gpu_rows.py: the CPU dry run of the GPU check finishes inside
its budget with every part's rows; a step past its time limit gets SIGTERM, then SIGKILL; a part
stopped by SIGTERM keeps the rows it had. Forms and contents only, never timing values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gpu_check  # noqa: E402

TINY = ["--device", "cpu", "--model", "tbn_tiny", "--size", "64x96", "--warmup", "1"]
BUDGET = 200


def test_gpu_check_dry_run_on_cpu_within_its_budget(tmp_path):
    out = tmp_path / "gc"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), *TINY,
                        "--frames", "2", "--train-size", "64x64", "--budget", str(BUDGET),
                        "--no-pytest", "--out", str(out)],
                       capture_output=True, text=True, timeout=BUDGET + 60, cwd=REPO)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert wall < BUDGET + 30  # the budget bounds the whole check (start-up and tables aside)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] is True and report["device"] == "cpu"
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["env", "rows", "streams", "e2e", "train", "compile"]
    assert steps["compile"].get("skipped")  # never on a CPU by default
    assert all(s["rc"] == 0 and not s["timed_out"] for n, s in steps.items() if n != "compile")
    assert report["env"]["backends"]["torch cpu"][0] is True
    rows = {x["row"]: x for x in report["parts"]["rows"]["rows"]}
    assert list(rows) == ["naive fp32", "naive bf16", "ring fp32", "ring bf16",
                          "ring bf16 timm attention"]
    assert rows["naive fp32"]["labels_equal"] == 1.0
    for name in ("ring fp32", "ring bf16"):
        assert rows[name]["median_ms"] > 0 and rows[name]["feature_ms"] > 0
        assert rows[name]["temporal_ms"] > 0 and rows[name]["labels_equal"] >= 0.99
        assert rows[name]["speedup_vs_naive_fp32"] > 0
    assert "bf16 weights" in rows["ring bf16"]["describe"]
    streams = report["parts"]["streams"]["rows"]
    assert [x["streams"] for x in streams] == [1, 2, 4, 8]
    assert all(x["frames_per_s"] > 0 for x in streams)
    e2e = report["parts"]["e2e"]["rows"][0]
    assert e2e["frames"] == 2 and e2e["share_of_engine"] > 0
    train = report["parts"]["train"]["rows"][0]
    assert train["step_s"] > 0 and train["loss"] == train["loss"]  # finite
    assert {"best_ring_row", "streams_8_over_1", "e2e_share_of_engine"} <= set(report["goals"])
    md = (out / "gpu_check.md").read_text()
    assert "ring bf16 timm attention" in md and "Goals (issue 17)" in md
    assert "naive fp32" in r.stdout


def test_a_step_past_its_limit_gets_sigterm_then_sigkill(tmp_path):
    flag = tmp_path / "terminated"
    polite = (f"import signal, sys, time\n"
              f"def bye(*a):\n    open({str(flag)!r}, 'w').write('SIGTERM')\n    sys.exit(143)\n"
              f"signal.signal(signal.SIGTERM, bye)\nprint('started', flush=True)\n"
              f"time.sleep(60)\n")
    rec = gpu_check.run_step("polite", [sys.executable, "-c", polite], 3, None, grace=20)
    assert rec["timed_out"] and not rec["killed"] and rec["rc"] == 143
    assert flag.read_text() == "SIGTERM" and "started" in rec["tail"]
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "time.sleep(60)\n")
    t0 = time.perf_counter()
    rec = gpu_check.run_step("stubborn", [sys.executable, "-c", stubborn], 2, None, grace=1)
    assert rec["timed_out"] and rec["killed"] and rec["rc"] == -9
    assert time.perf_counter() - t0 < 30


def test_a_part_stopped_by_sigterm_keeps_its_rows(tmp_path):
    out = tmp_path / "rows.json"
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "benchmarks", "gpu_rows.py"),
                          "--part", "rows", "--json", str(out), *TINY, "--frames", "60",
                          "--budget", "300"], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # until the first row is on disk
            if out.is_file() and json.loads(out.read_text())["rows"]:
                break
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.5)
        p.terminate()  # SIGTERM
        rc = p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
    report = json.loads(out.read_text())
    assert rc == 143 and report["stopped"] == "SIGTERM" and not report.get("finished")
    assert report["rows"][0]["row"] == "naive fp32" and report["rows"][0]["median_ms"] > 0


def test_only_the_missing_wheels_are_installed(tmp_path):
    import pytest as installed

    for name in (f"pytest-{installed.__version__}-py3-none-any.whl",
                 "surely_not_installed_pkg-1.0-py3-none-any.whl", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [os.path.basename(w) for w in gpu_check.missing_wheels(str(tmp_path))] == [
        "surely_not_installed_pkg-1.0-py3-none-any.whl"]
