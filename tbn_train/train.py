"""tbn-train: train TBN-ViT or any Table 1 variant, in the paper's two stages.

    tbn-train --preset demo                                  # tbn_tiny on data/synth, CPU minutes
    tbn-train --preset tbn_swin_l --data /data/VSPW --stage all
    torchrun --nproc-per-node 8 -m tbn_train.train --preset tbn_swin_l --data /data/VSPW
    tbn-train --resume [--out runs/tbn]                      # continue OUT/stage*/last.*

Stage 1: cross-entropy (ignore 255), SGD with momentum, poly decay, one lr. Stage 2 starts from
stage 1's best weights (last if no eval improved) with OHEM and two lrs (context path /
the rest). Outputs: OUT/stage{1,2}/{best,last}.safetensors, last.state.pt (optimizer,
scheduler, step, RNG, best mIoU: what --resume needs), metrics.jsonl; OUT/best.safetensors and
OUT/last.safetensors are copies of the last stage run's (tbn-export reads OUT/best); the
settings in OUT/config.json.

A run directory is never deleted or overwritten unasked: training into one that holds a run
needs --resume (continue it) or --overwrite (start again); the same command again, after the
run has finished, says so and does nothing. --resume without --preset/--config
continues with the run's own settings; flags given with it may change what does not change the
results (a longer --iters, intervals, workers, device: listed when they differ), anything else
is refused with the list of differences.

Stopping: Ctrl-C, SIGTERM (kill, timeout, Slurm, Kubernetes, torchrun) and SIGUSR1 end the
current step, save it and exit; so does a data error (a corrupt image or mask, a label beyond
--num-classes), whose line names the file. last.* is also saved every --save-minutes, which
bounds what a kill -9 loses. Under torchrun every process stops at the same step and rank 0
saves (tbn_train.preemption, tbn_train.engine).

Memory: --no-past-grad runs the 3 past frames of each clip without autograd, so only the
current frame's activations are kept for the backward pass: about three quarters of the
backbone's activation memory saved, at the price of no gradient through the past frames'
features (the temporal head still learns from them). --grad-checkpointing recomputes Swin's
blocks in the backward pass instead of storing them.
"""

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from tbn_runtime import console as cli
from tbn_runtime.files import FolderLock, atomic_write, disk_full

from .config import (FIELDS, TrainConfig, add_override_args, list_presets, make_config,
                     overrides_from_args)
from .errors import CheckpointError

# torch and everything built on it are imported in main() after the arguments are parsed, so
# --help and argument mistakes answer at once.

PROG = "tbn-train"
EXIT_CODES = ("exit codes: 0 done; 1 an I/O error (a full disk: the saves so far are whole); "
              "2 a mistake in the command, config or data (one line names "
              "it and the fix); 3 the loss became NaN/inf (the last good state is kept); "
              "128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1) with the last "
              "step saved: continue with --resume")
RUN_FILES = ("last.safetensors", "last.state.pt", "best.safetensors", "metrics.jsonl")

log = logging.getLogger("tbn_train.train")  # not __main__ under python -m


# -- the run directory ----------------------------------------------------------------------------
def stage_files(stage_dir: Path) -> List[str]:
    """The files of a training run in a stage directory."""
    return [n for n in RUN_FILES if (stage_dir / n).exists()]


def prepare_out(out: Path, stages: List[int], resume: bool, overwrite: bool, info) -> None:
    """Refuse what would lose a run; with --overwrite, delete the stages this run trains.

    Without --resume or --overwrite, a stage to train must hold no run. With --resume, some
    stage must have a state to resume, and a stage to train holds either a state or nothing.
    """
    from . import distributed as dist_utils

    if resume and overwrite:
        raise ValueError("pass --resume (continue the run) or --overwrite (start it again), "
                         "not both")
    held = {s: stage_files(out / f"stage{s}") for s in stages}
    if resume:
        if not any((out / f"stage{s}" / "last.state.pt").is_file() for s in (1, 2)):
            raise ValueError(f"--resume: nothing to resume in {out} (no stage1/last.state.pt or "
                             f"stage2/last.state.pt); start the run without --resume, or pass "
                             f"the run's --out")
        for s, files in held.items():
            if files and "last.state.pt" not in files:
                raise ValueError(f"--resume: {out / f'stage{s}'} holds {', '.join(files)} but "
                                 f"no last.state.pt to resume from; start it again with "
                                 f"--overwrite, or choose another --out")
    elif any(held.values()):
        s = next(s for s, files in held.items() if files)
        if not overwrite:
            raise ValueError(f"{out / f'stage{s}'} already holds a training run "
                             f"({', '.join(held[s])}); continue it with --resume, start it "
                             f"again with --overwrite (deletes it), or choose another --out")
        if info.is_main:
            for s in stages:
                shutil.rmtree(out / f"stage{s}", ignore_errors=True)
            for name in ("best.safetensors", "last.safetensors"):
                (out / name).unlink(missing_ok=True)
            log.info(f"--overwrite: deleted the previous run's stage "
                     f"{' and '.join(str(s) for s in stages)} in {out}")
    dist_utils.barrier(info)


def already_trained(out: Path, stages: List[int], cfg: TrainConfig) -> Optional[float]:
    """The best val mIoU of a finished run in `out` that these settings would train again (each
    stage done, nothing that changes the results differs), else None."""
    from .checkpoint import load_train_state
    from .config import resume_changes
    from .stage import finished

    if not (out / "best.safetensors").is_file():
        return None
    best = None
    for s in stages:
        try:
            state = load_train_state(out / f"stage{s}")
        except CheckpointError:
            return None
        if state is None or not finished(state, cfg, s) or resume_changes(state["config"],
                                                                           cfg, s)[1]:
            return None
        best = state["best_miou"]
    return best


def publish(stage_dir: Path, out: Path) -> None:
    """Copy a stage's best (else last) and last checkpoints to OUT/."""
    best = stage_dir / "best.safetensors"
    last = stage_dir / "last.safetensors"
    for src, dst in ((best if best.is_file() else last, out / "best.safetensors"),
                     (last, out / "last.safetensors")):
        atomic_write(str(dst), lambda tmp, src=src: shutil.copyfile(src, tmp))


def run(cfg: TrainConfig, stage_arg: str, resume: bool, overwrite: bool, info,
        progress: bool) -> None:
    out = Path(cfg.out)
    if stage_arg == "2" and cfg.stage2_iters <= 0:
        raise ValueError("this config has no stage 2 (stage2_iters is 0); pass --stage2-iters N")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    # one training run per folder: a second tbn-train into it is refused, naming the holder
    # (rank 0 holds it for the whole job; the kernel drops it however the process ends)
    lock = FolderLock(str(out), " ".join([PROG] + sys.argv[1:])) if info.is_main else None
    if lock is not None:
        lock.acquire()
    try:
        _run(cfg, out, stage_arg, resume, overwrite, info, progress)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: TrainConfig, out: Path, stage_arg: str, resume: bool, overwrite: bool, info,
         progress: bool) -> None:
    from .checkpoint import load_train_state
    from .data.vspw import check_data_root
    from .preemption import StopRequest
    from .engine import train_stage
    from .stage import check_resume_settings

    stages = [1, 2] if stage_arg == "all" else [int(stage_arg)]
    stages = [s for s in stages if s == 1 or cfg.stage2_iters > 0]
    if not (resume or overwrite):
        best = already_trained(out, stages, cfg)
        if best is not None:  # the same run again (make demo, then the README's commands)
            log.info(f"{out} already holds this run, finished (best val mIoU {best:.2f}); "
                     f"nothing to do (--overwrite trains it again)")
            return
    check_data_root(cfg.data)
    prepare_out(out, stages, resume, overwrite, info)
    states = {s: load_train_state(out / f"stage{s}") if resume else None for s in stages}
    for s, state in states.items():
        if state is not None:
            check_resume_settings(state, cfg, s, out / f"stage{s}")
    if info.is_main:
        text = json.dumps(cfg.to_dict(), indent=1) + "\n"
        atomic_write(str(out / "config.json"), lambda tmp: Path(tmp).write_text(text))
    stage_dir = None
    with StopRequest(force_on_second_sigint=not info.distributed) as stop:
        for s in stages:
            stage_dir = train_stage(cfg, s, out, info, states[s], stop, progress)
    if info.is_main and stage_dir is not None:
        publish(stage_dir, out)
        log.info(f"done; best checkpoint {out / 'best.safetensors'}")


# -- command line ---------------------------------------------------------------------------------
def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    p = cli.OneLineParser(prog=PROG, description=__doc__.split("\n")[0], epilog=EXIT_CODES)
    p.add_argument("--preset", help=f"a packaged config: {', '.join(list_presets())}")
    p.add_argument("--config", help="a YAML file of config fields")
    p.add_argument("--stage", default="all", choices=["1", "2", "all"],
                   help="all: stage 1, then stage 2 when stage2_iters > 0 (default: all)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last save, with its settings")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a run (deletes its stages)")
    cli.add_verbosity_flags(p)
    # --help shows the defaults of the preset or config file named on the same line
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    named = pre.parse_known_args(argv)[0]
    try:
        defaults = make_config(named.preset, named.config)
        source = (f"preset {named.preset}" if named.preset else
                  f"config {named.config}" if named.config else "")
    except ValueError:  # reported when the full command is parsed
        defaults, source = None, ""
    add_override_args(p, defaults, source)
    return p


def load_config(args: argparse.Namespace) -> TrainConfig:
    """The preset or config file with the flags over it; on --resume without either, the
    config the run was trained with (its latest last.safetensors) with the flags over it."""
    overrides = overrides_from_args(args)
    if args.resume and not (args.preset or args.config):
        from .checkpoint import read_metadata  # torch

        out = Path(str(overrides.get("out", TrainConfig.out)))
        for s in (2, 1):
            last = out / f"stage{s}" / "last.safetensors"
            if last.is_file():
                saved = {k: v for k, v in read_metadata(str(last))["config"].items()
                         if k in FIELDS}
                return make_config(None, None, {**saved, "out": str(out), **overrides})
    return make_config(args.preset, args.config, overrides)


def main(argv: Optional[List[str]] = None) -> int:
    dist_utils = None

    def body() -> int:
        nonlocal dist_utils
        args = build_parser(argv).parse_args(argv)
        cli.setup_logging(PROG, args.verbose, args.quiet)
        cfg = load_config(args)
        from . import distributed as dist_utils  # torch from here on

        info = dist_utils.setup(cfg.device)
        cli.setup_logging(PROG, args.verbose, args.quiet, rank=info.rank)
        try:
            run(cfg, args.stage, args.resume, args.overwrite, info,
                cli.show_progress(args.quiet))
        except OSError as e:  # a full disk, a quota, an unwritable --out: the saves are whole
            cause = str(e) if disk_full(e) else f"{e.filename + ': ' if e.filename else ''}" \
                                                f"{e.strerror or e}"
            log.error(f"{cause}. Training stopped; what it saved before in {cfg.out} is whole "
                      f"(written to a temporary, then renamed): fix that, then continue with "
                      f"--resume")
            return 1
        # every rank done before any tears the process group down: a rank whose peer has gone
        # can abort in gloo's threads at exit ("terminate called without an active exception")
        dist_utils.barrier(info)
        return 0

    try:
        # signals are tbn_train.preemption's (the step is saved first); ValueError: the
        # model's and data's own checks of a config
        return cli.run_command(PROG, body, sigterm=False, user_errors=(ValueError,),
                               interrupted="interrupted before training started; nothing "
                                           "was saved")
    finally:
        if dist_utils is not None:
            dist_utils.cleanup()


if __name__ == "__main__":
    sys.exit(main())
