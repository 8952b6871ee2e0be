"""benchmarks/ablation.py: the rows' budgets, the summary, and one tiny run end to end (kept)."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import ablation  # noqa: E402

from train_helpers import make_synth  # noqa: E402


def _args(*extra):
    return ablation.parse_args(["--data", "d", "--out", "o", *extra])


def _flag(argv, name):
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # the last occurrence wins


def test_every_row_gets_the_same_budget():
    args = _args("--steps", "300", "--ohem-steps", "100")
    for row in ablation.ROWS:
        argv = ablation.train_args(row, 0, args, "out")
        stage1, stage2 = int(_flag(argv, "--iters")), int(_flag(argv, "--stage2-iters"))
        assert stage1 + stage2 == 300, row
        assert _flag(argv, "--set") == f"model={ablation.ROWS[row][1]}"
    ohem = ablation.train_args("tbn_ohem", 0, args, "out")
    assert _flag(ohem, "--stage2-loss") == "ohem"
    # the paper's stage-2 lrs relative to its stage-1 lr (0.0002 / 0.002, 0.0005 / 0.002)
    assert float(_flag(ohem, "--stage2-lr-context")) == pytest.approx(0.1 * ablation.BASE_LR)
    assert float(_flag(ohem, "--stage2-lr-rest")) == pytest.approx(0.25 * ablation.BASE_LR)


def test_summary_and_table():
    runs = [{"mIoU": 40.0, "mVC8": 80.0, "mVC16": None}, {"mIoU": 44.0, "mVC8": 90.0,
                                                          "mVC16": None}]
    s = ablation.summarize(runs)
    assert s["mIoU"]["mean"] == 42.0 and s["mIoU"]["std"] == pytest.approx(2 ** 0.5 * 2)
    assert s["mVC8"]["min"] == 80.0 and s["mVC8"]["max"] == 90.0 and s["mVC16"]["n"] == 0
    report = {"config": {"steps": 10, "ohem_steps": 4, "seeds": [0, 1], "split": "test"},
              "rows": [{"row": "tbn", "summary": s}]}
    assert re.search(r"\|\s*42\.00 ± 2\.83\s*\|\s*85\.00 ± 7\.07\s*\|\s*-\s*\|",
                     ablation.table(report))


def test_bad_flags_are_refused():
    for bad in (["--rows", "tbn,resnet"], ["--steps", "10", "--ohem-steps", "10"],
                ["--seeds", "a"]):
        with pytest.raises(SystemExit):
            _args(*bad)


def test_one_tiny_run_end_to_end_then_kept(tmp_path, monkeypatch):
    data = make_synth(tmp_path / "synth")  # 2 train videos, 1 val, no test: score 'val'
    argv = ["--data", str(data), "--out", str(tmp_path / "runs"), "--seeds", "0", "--rows",
            "bisenet", "--steps", "2", "--ohem-steps", "1", "--split", "val"]
    assert ablation.main(argv) == 0
    report = json.loads((tmp_path / "runs" / "ablation.json").read_text())
    (run,) = report["rows"][0]["runs"]
    assert run["row"] == "bisenet" and run["mIoU"] is not None and 0 <= run["mIoU"] <= 100
    assert (tmp_path / "runs" / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert "Bilateral" in (tmp_path / "runs" / "ablation.md").read_text()
    from tbn_train import train
    monkeypatch.setattr(train, "main", lambda *a: pytest.fail("a kept run was trained again"))
    assert ablation.main(argv) == 0
