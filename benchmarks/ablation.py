"""Table 1 of the TBN-ViT paper in miniature: its ablation rows trained on tbn-synth data at one
equal budget, several seeds each; mean and spread of mIoU, mVC8 and mVC16.

    python benchmarks/ablation.py                           # 4 rows x 3 seeds, 2 CPU cores
    python benchmarks/ablation.py --seeds 0 --steps 20 --ohem-steps 10   # a smoke run

Rows (tiny random-init models in place of Swin-L and ResNet-101; paper's VSPW test mIoU):
  stppm     Spatial-Temporal PPM (stppm_tiny)                           rows 1-2: 37.46 / 43.63
  bisenet   Bilateral Network, image only (bisenet_tiny)                row 3: 45.73
  tbn       Temporal Bilateral Network, stage 1, CE (tbn_tiny)          row 4: 47.17
  tbn_ohem  the same, CE for steps - ohem_steps, then OHEM stage 2      row 5: 49.85

One budget for every row: --steps optimizer steps of the `demo` preset's batch (4 clips of
128 x 128, SGD lr 0.05, poly decay, aux weight 0.4); tbn_ohem spends its last --ohem-steps in
stage 2 (OHEM, the paper's stage-2 lr ratios: context path 0.1 x, other layers 0.25 x the
stage-1 lr; min_kept scaled from 100000 per 480 x 480 image to the crop). Every temporal row
reads past frames t-3, t-6, t-9, so the rows differ in architecture and loss only. Each run is
scored once, at its end, on the held-out --split (never used to pick a checkpoint).

The data (--data, made with tbn-synth's generator if missing): 12 training videos, 4 test
videos, 1 val video (the training loop's own end-of-run check), 40 frames of 160 x 224 each.
Each run's scores are kept in OUT/<row>/seed<k>/result.json, so an interrupted run continues
where it stopped (--fresh retrains). Outputs: JSON, a markdown table, a PNG chart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

METRICS = ("mIoU", "mVC8", "mVC16")
ROWS = {  # name: (label, model, paper mIoU)
    "stppm": ("ST-PPM", "stppm_tiny", "37.46 / 43.63"),
    "bisenet": ("Bilateral (image only)", "bisenet_tiny", "45.73"),
    "tbn": ("TBN, stage 1", "tbn_tiny", "47.17"),
    "tbn_ohem": ("TBN + OHEM, stage 2", "tbn_tiny", "49.85"),
}
SYNTH = dict(seed=0, height=160, width=224, videos_train=12, videos_val=1, videos_test=4,
             frames=40, classes=5)
CROP = 128
BASE_LR = 0.05  # the demo preset's


class AblationError(RuntimeError):
    """A run that cannot go on; the message says what to do."""


def train_args(row: str, seed: int, args: argparse.Namespace, out: Path) -> List[str]:
    """tbn-train's command line for one run."""
    label, model, _ = ROWS[row]
    steps = args.steps - args.ohem_steps if row == "tbn_ohem" else args.steps
    argv = ["--preset", "demo", "--data", str(args.data), "--out", str(out),
            "--set", f"model={model}", "--crop-size", str(CROP), str(CROP), "--lr", str(BASE_LR),
            "--iters", str(steps), "--seed", str(seed), "--eval-interval", str(args.steps),
            "--log-interval", str(max(1, args.steps // 10)), "--device", "cpu"]
    if row != "tbn_ohem":
        argv += ["--stage2-iters", "0"]
    else:
        argv += ["--stage2-iters", str(args.ohem_steps), "--stage2-loss", "ohem",
                 "--stage2-lr-context", str(BASE_LR * 0.0002 / 0.002),
                 "--stage2-lr-rest", str(BASE_LR * 0.0005 / 0.002),
                 "--ohem-min-kept", str(round(100000 * CROP * CROP / (480 * 480)))]
    return argv


def run_one(row: str, seed: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Train one row with one seed (or read its kept result) and score it on --split."""
    out = Path(args.out) / row / f"seed{seed}"
    argv = train_args(row, seed, args, out)
    kept = out / "result.json"
    if kept.is_file() and not args.fresh:
        result = json.loads(kept.read_text())
        if result.get("command") == "tbn-train " + " ".join(argv) and result["split"] == args.split:
            return result
    import torch
    from tbn_train import train
    from tbn_train.checkpoint import load_model
    from tbn_train.evaluate import evaluate_model

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "train.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        rc = train.main(argv)
    if rc != 0:
        raise AblationError(f"training {row} seed {seed} failed (exit {rc}); see "
                            f"{out / 'train.log'}")
    train_seconds = time.time() - t0
    model, _ = load_model(str(out / "last.safetensors"))
    with torch.no_grad():
        scores = evaluate_model(model, args.data, args.split, torch.device("cpu"))
    result = {"row": row, "seed": seed, "split": args.split, "train_seconds": train_seconds,
              "eval_seconds": time.time() - t0 - train_seconds,
              "command": "tbn-train " + " ".join(argv),
              **{m: scores[m] for m in METRICS}, "pixel_acc": scores["pixel_acc"]}
    common.write_json(str(kept), result)
    return result


def summarize(results: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Per metric: mean, sample standard deviation (n - 1), min, max over the seeds."""
    out = {}
    for m in METRICS:
        v = np.array([r[m] for r in results if r[m] is not None], dtype=np.float64)
        out[m] = {"mean": float(v.mean()) if v.size else None,
                  "std": float(v.std(ddof=1)) if v.size > 1 else None,
                  "min": float(v.min()) if v.size else None,
                  "max": float(v.max()) if v.size else None, "n": int(v.size)}
    return out


def table(report: Dict[str, Any]) -> str:
    cfg = report["config"]
    rows = []
    for r in report["rows"]:
        cells = [ROWS[r["row"]][0], f"`{ROWS[r['row']][1]}`"]
        for m in METRICS:
            s = r["summary"][m]
            cells.append("-" if s["mean"] is None else f"{s['mean']:.2f}" + (
                "" if s["std"] is None else f" ± {s['std']:.2f}"))
        cells.append(ROWS[r["row"]][2])
        rows.append(cells)
    head = ["row", "model"] + [f"{m} (mean ± sd)" for m in METRICS] + ["paper mIoU"]
    return (f"Table 1 in miniature: {cfg['steps']} steps each ({cfg['ohem_steps']} of them OHEM "
            f"for TBN + OHEM), seeds {', '.join(map(str, cfg['seeds']))}, tbn-synth "
            f"'{cfg['split']}' split\n\n" + common.markdown_table(head, rows))


def plot(path: str, report: Dict[str, Any]) -> None:
    """Three panels (mIoU, mVC8, mVC16): a bar per row at the mean, sd whiskers, seeds as dots."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise AblationError("--plot needs matplotlib (pip install matplotlib)") from e
    from tbn_runtime.files import atomic_write

    rows = report["rows"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 4))
    xs = np.arange(len(rows))
    for ax, m in zip(axes, METRICS):
        means = [r["summary"][m]["mean"] or 0.0 for r in rows]
        sds = [r["summary"][m]["std"] or 0.0 for r in rows]
        ax.bar(xs, means, yerr=sds, capsize=4, color="#4c72b0")
        for x, r, mean, sd in zip(xs, rows, means, sds):
            seeds = [s[m] for s in r["runs"] if s[m] is not None]
            ax.plot([x] * len(seeds), seeds, "k.", ms=4)
            top = max([mean + sd, *seeds])  # the value above the whisker and the dots
            ax.annotate(f"{mean:.1f}", (x, top), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")
        ax.set_xticks(xs)
        ax.set_xticklabels([ROWS[r["row"]][0] for r in rows], rotation=25, ha="right",
                           fontsize=8)
        ax.set_title(m, fontsize=10)
        ax.set_ylim(0, 108)
    cfg = report["config"]
    n = len(cfg["seeds"])
    fig.suptitle(f"Table 1 in miniature (tbn-synth '{cfg['split']}', {cfg['steps']} steps each, "
                 f"{n} seed{'s' if n > 1 else ''}: mean, sd, each seed)", fontsize=10)
    fig.text(0.5, 0.005, common.machine_line(report["machine"]), ha="center", va="bottom",
             fontsize=6.5)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def ensure_data(root: Path) -> Dict[str, Any]:
    """The dataset's synth.json, generating the data first when the folder is missing."""
    if not (root / "synth.json").is_file():
        if root.exists() and any(root.iterdir()):
            raise AblationError(f"{root} exists but is not tbn-synth data (no synth.json); "
                                f"pass another --data or remove it")
        from tbn_train.data.synth import generate
        print(f"ablation: generating tbn-synth data in {root}", file=sys.stderr)
        generate(root, **SYNTH)
    return json.loads((root / "synth.json").read_text())


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ablation.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--data", default="data/ablation", help="tbn-synth root, generated if "
                                                           "missing (default: %(default)s)")
    p.add_argument("--out", default="runs/ablation", help="runs and outputs (default: "
                                                          "%(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run "
                                                          "(default: %(default)s)")
    p.add_argument("--ohem-steps", type=int, default=100, help="of them, OHEM stage 2 steps "
                                                               "of tbn_ohem (default: %(default)s)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated among "
                                                          f"{', '.join(ROWS)}")
    p.add_argument("--split", default="test", help="the split scored (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--fresh", action="store_true", help="retrain runs whose result is kept")
    p.add_argument("--json", help="default: OUT/ablation.json")
    p.add_argument("--markdown", help="default: OUT/ablation.md")
    p.add_argument("--plot", help="default: OUT/ablation.png")
    a = p.parse_args(argv)
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got '{a.seeds}'")
    a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in a.rows if r not in ROWS]
    if bad or not a.rows or not a.seeds:
        p.error(f"choose rows among {', '.join(ROWS)} and at least one seed")
    if not 0 < a.ohem_steps < a.steps:
        p.error("--ohem-steps must be between 0 and --steps (exclusive)")
    a.data = Path(a.data)
    for key, ext in (("json", "json"), ("markdown", "md"), ("plot", "png")):
        if getattr(a, key) is None:
            setattr(a, key, os.path.join(a.out, f"ablation.{ext}"))
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    t_start = time.time()
    try:
        synth = ensure_data(args.data)
        rows = []
        for row in args.rows:
            runs = []
            for seed in args.seeds:
                r = run_one(row, seed, args)
                print(f"ablation: {row} seed {seed}: " + ", ".join(
                    f"{m} {common.fmt(r[m], 2)}" for m in METRICS) +
                      f" ({r['train_seconds']:.0f} s training)", file=sys.stderr)
                runs.append(r)
            rows.append({"row": row, "label": ROWS[row][0], "model": ROWS[row][1],
                         "paper_mIoU": ROWS[row][2], "runs": runs, "summary": summarize(runs)})
        report = {
            "benchmark": "ablation",
            "config": {"steps": args.steps, "ohem_steps": args.ohem_steps, "seeds": args.seeds,
                       "split": args.split, "data": str(args.data), "synth": synth,
                       "crop": CROP, "lr": BASE_LR, "preset": "demo"},
            "machine": common.machine_info(),
            "seconds": time.time() - t_start,
            "command": " ".join(["python", "benchmarks/ablation.py"] + list(
                argv if argv is not None else sys.argv[1:])),
            "rows": rows,
        }
        text = table(report)
        print(text)
        common.write_json(args.json, report)
        from tbn_runtime.files import atomic_write
        atomic_write(args.markdown, lambda tmp: Path(tmp).write_text(text + "\n"))
        plot(args.plot, report)
        return 0
    except (AblationError, FileExistsError, ValueError) as e:
        print(f"ablation.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
